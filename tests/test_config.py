"""Configuration: both validation phases, environment overrides, defaults,
the format of API key hashes, and config.example.toml. Unit level: no server, no model."""

from __future__ import annotations

import os
import re
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.auth import hash_api_key
from gateway.backends.llamacpp import LlamaCppConfig
from gateway.backends.openai_compat import OpenAICompatibleConfig
from gateway.catalog import plan
from gateway.cli import check
from gateway.registry import discover
from gateway.settings import (
    AdapterSettings,
    DeploymentSettings,
    HookSettings,
    LimitSettings,
    LoRASettings,
    ModelSettings,
    PluginSettings,
    ServerSettings,
    StackSettings,
    TelemetrySettings,
    load_settings,
)

MODEL = "smollm2-135m-instruct"
EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
VALID_HASH = hash_api_key("sk-nomoat-test-0123456789abcdef")


@pytest.fixture(autouse=True)
def _no_nomoat_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings read NOMOAT_* variables: start every test from none."""
    for name in list(os.environ):
        if name.startswith("NOMOAT_"):
            monkeypatch.delenv(name)
    yield


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nomoat.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    _, problems = check(write(tmp_path, text))
    return problems


LOCAL_MODEL = """
[backends.local]
type = "llamacpp"

[models.x]
deployments = [{ backend = "local" }]
"""


# ------------------------------------------------------------------ defaults


def test_no_file_serves_the_embedded_model_on_loopback_8000() -> None:
    settings, problems = check(None)
    assert problems == []
    assert settings is not None
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8000)
    assert settings.server.api_key_hashes == ()
    assert list(settings.models) == [MODEL]
    assert list(settings.backends) == ["embedded"]
    assert settings.backends["embedded"].type == "llamacpp"
    entry = plan(settings, discover()).catalog.resolve(MODEL)
    assert [c.backend for c in entry.candidates] == ["embedded"]
    assert entry.candidates[0].target.engine_model == MODEL


def test_a_valid_file_has_no_problems_and_builds_the_catalog(tmp_path: Path) -> None:
    settings, problems = check(write(tmp_path, LOCAL_MODEL))
    assert problems == []
    assert settings is not None
    built = plan(settings, discover())
    [backend] = built.backends
    assert backend.name == "local"
    assert backend.config == LlamaCppConfig()
    candidate = built.catalog.resolve("x").candidates[0]
    # A deployment's engine model defaults to the model's own name.
    assert (candidate.backend, candidate.target.engine_model) == ("local", "x")
    assert candidate.target.deployment == "x/0"


def test_defining_backends_replaces_the_default_backend(tmp_path: Path) -> None:
    # The default model still points at "embedded", which no longer exists.
    problems = problems_of(tmp_path, '[backends.local]\ntype = "llamacpp"\n')
    assert problems == [f'models.{MODEL}.deployments[0].backend: unknown backend "embedded"']


# ------------------------------------------------------- phase one (shape)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "bogus = 1\n") == ["bogus: unknown key"]


def test_unknown_key_in_server(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "[server]\ncolour = 'red'\n") == ["server.colour: unknown key"]


def test_unknown_key_in_a_deployment(tmp_path: Path) -> None:
    text = """
    [backends.local]
    type = "llamacpp"
    [models.x]
    deployments = [{ backend = "local", colour = "red" }]
    """
    assert problems_of(tmp_path, text) == ["models.x.deployments[0].colour: unknown key"]


def test_bad_type_for_server_port(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "[server]\nport = 'eighty'\n")
    assert problem.startswith("server.port: ")
    assert "integer" in problem


def test_out_of_range_port(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "[server]\nport = 70000\n")
    assert problem.startswith("server.port: ")
    assert "65535" in problem


def test_missing_and_empty_required_fields(tmp_path: Path) -> None:
    text = """
    [backends.local]
    threads = 1
    [models.x]
    policy = "ordered"
    [models.y]
    deployments = []
    """
    problems = problems_of(tmp_path, text)
    assert len(problems) == 3, problems
    assert "backends.local.type: Field required" in problems
    assert "models.x.deployments: Field required" in problems
    assert any(p.startswith("models.y.deployments: ") and "at least 1" in p for p in problems)


def test_phase_one_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = """
    bogus = 1
    [server]
    port = "abc"
    colour = "red"
    api_key_hashes = ["md5:abc"]
    [limits]
    max_n = 0
    """
    problems = problems_of(tmp_path, text)
    assert len(problems) == 5, problems
    paths = sorted(problem.split(":", 1)[0] for problem in problems)
    assert paths == [
        "bogus",
        "limits.max_n",
        "server.api_key_hashes",
        "server.colour",
        "server.port",
    ]


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    _, problems = check(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert check(path) == (None, [f"{path}: no such file"])


# ------------------------------------------- phase two (plugins, references)


def test_deployment_naming_an_unknown_backend(tmp_path: Path) -> None:
    text = """
    [backends.local]
    type = "llamacpp"
    [models.x]
    deployments = [{ backend = "local" }, { backend = "y" }]
    """
    assert problems_of(tmp_path, text) == ['models.x.deployments[1].backend: unknown backend "y"']


def test_unknown_key_in_backend_options(tmp_path: Path) -> None:
    text = LOCAL_MODEL.replace('type = "llamacpp"', 'type = "llamacpp"\nfoo = 1')
    # Same format as phase one's unknown keys: "<path>: unknown key".
    assert problems_of(tmp_path, text) == ["backends.local.foo: unknown key"]


def test_bad_backend_option_value(tmp_path: Path) -> None:
    text = LOCAL_MODEL.replace('type = "llamacpp"', 'type = "llamacpp"\nthreads = -1')
    [problem] = problems_of(tmp_path, text)
    assert problem.startswith("backends.local.threads: ")


def test_unknown_backend_type(tmp_path: Path) -> None:
    text = LOCAL_MODEL.replace('type = "llamacpp"', 'type = "no-such-engine"')
    [problem] = problems_of(tmp_path, text)
    # The message lists the installed types, so a typo is easy to fix.
    assert problem.startswith('backends.local.type: unknown type "no-such-engine" (known: ')
    known = problem.split("(known: ", 1)[1].rstrip(")").split(", ")
    assert "llamacpp" in known
    assert known == sorted(discover().backends)


def test_unknown_policy(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, LOCAL_MODEL + 'policy = "fastest"\n')
    assert problem.startswith('models.x.policy: unknown policy "fastest" (known: ')
    assert "ordered" in problem


def test_unknown_policy_option(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, LOCAL_MODEL + "policy_options = { depth = 2 }\n")
    assert problems == ["models.x.policy_options.depth: unknown key"]


def test_unknown_hook_type(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, LOCAL_MODEL + '[[hooks]]\ntype = "nope"\n')
    assert problem.startswith('hooks[0].type: unknown hook "nope"')


def test_phase_two_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = """
    [backends.local]
    type = "llamacpp"
    foo = 1
    threads = -1
    [backends.other]
    type = "no-such-engine"
    [models.x]
    deployments = [{ backend = "y" }]
    policy = "nope"
    [models.z]
    deployments = [{ backend = "local" }]
    policy_options = { a = 1 }
    """
    problems = problems_of(tmp_path, text)
    assert len(problems) == 6, problems
    assert 'models.x.deployments[0].backend: unknown backend "y"' in problems
    assert "backends.local.foo: unknown key" in problems
    assert any(p.startswith("backends.local.threads: ") for p in problems)
    assert any(p.startswith('backends.other.type: unknown type "no-such-engine"') for p in problems)
    assert any(p.startswith('models.x.policy: unknown policy "nope"') for p in problems)
    assert "models.z.policy_options.a: unknown key" in problems


def test_disabling_a_plugin_removes_what_it_offers(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[plugins]\ndisabled = ["llamacpp"]\n')
    [problem] = problems
    assert problem.startswith('backends.embedded.type: unknown type "llamacpp" (known: ')


# ---------------------------------------------------- environment overrides


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[server]\nhost = "127.0.0.2"\nport = 1234\n[limits]\nmax_n = 3\n')
    monkeypatch.setenv("NOMOAT_SERVER__PORT", "9999")
    monkeypatch.setenv("NOMOAT_LIMITS__MAX_N", "5")
    settings = load_settings(path)
    assert settings.server.port == 9999
    assert settings.limits.max_n == 5
    # Keys the environment does not name keep the file's values.
    assert settings.server.host == "127.0.0.2"


def test_environment_overrides_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMOAT_SERVER__PORT", "9999")
    monkeypatch.setenv("NOMOAT_LIMITS__MAX_N", "5")
    settings = load_settings(None)
    assert (settings.server.port, settings.limits.max_n) == (9999, 5)
    assert settings.limits.max_messages == LimitSettings().max_messages


def test_environment_values_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMOAT_SERVER__PORT", "eighty")
    monkeypatch.setenv("NOMOAT_LIMITS__MAX_N", "0")
    _, problems = check(write(tmp_path, "[server]\nport = 1234\n"))
    assert sorted(p.split(":", 1)[0] for p in problems) == ["limits.max_n", "server.port"]


# ------------------------------------------------------------ API key hashes


@pytest.mark.parametrize(
    "entry",
    [
        "md5:" + "a" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "z" * 64,
        "sha256:" + "A" * 64,  # would never equal a computed (lowercase) hash
        "sha256:0x" + "a" * 62,
        "sha256:-" + "a" * 63,
        "sha256:" + "a" * 31 + "_" + "a" * 32,
        "sha256: " + "a" * 63,
        "a" * 64,
        "",
    ],
)
def test_malformed_key_hashes_are_rejected(tmp_path: Path, entry: str) -> None:
    problems = problems_of(tmp_path, f'[server]\napi_key_hashes = ["{VALID_HASH}", "{entry}"]\n')
    assert len(problems) == 1
    assert problems[0].startswith("server.api_key_hashes: ")
    assert "sha256:" in problems[0]


@pytest.mark.parametrize("table", ["server.admin_key_hashes", "models.m.rules[0].api_key_hashes"])
def test_malformed_key_hashes_are_rejected_wherever_keys_are_named(
    tmp_path: Path, table: str
) -> None:
    """A rule's or the admin API's hash spelt otherwise than `nomoat hash-key`
    prints it would silently never match a key."""
    upper = "sha256:" + "A" * 64
    text = {
        "server.admin_key_hashes": f'[server]\nadmin_key_hashes = ["{upper}"]\n',
        "models.m.rules[0].api_key_hashes": (
            '[models.m]\ndeployments = [{ backend = "embedded" }]\n'
            f'rules = [{{ pool = ["embedded"], api_key_hashes = ["{upper}"] }}]\n'
        ),
    }[table]
    problems = problems_of(tmp_path, text)
    assert [problem.split(": ", 1)[0] for problem in problems] == [table]
    assert "lowercase hex" in problems[0]


def test_a_well_formed_key_hash_is_accepted(tmp_path: Path) -> None:
    settings, problems = check(write(tmp_path, f'[server]\napi_key_hashes = ["{VALID_HASH}"]\n'))
    assert problems == []
    assert settings is not None
    assert settings.server.api_key_hashes == (VALID_HASH,)


# ------------------------------------------------------- config.example.toml


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


@pytest.mark.parametrize(
    "model",
    [
        ServerSettings,
        LimitSettings,
        PluginSettings,
        LlamaCppConfig,
        OpenAICompatibleConfig,
        ModelSettings,
        DeploymentSettings,
        HookSettings,
        LoRASettings,
        AdapterSettings,
        StackSettings,
        TelemetrySettings,
    ],
    ids=lambda model: model.__name__,
)
def test_example_config_documents_every_option(model: type[BaseModel]) -> None:
    text = EXAMPLE.read_text()
    missing = [
        name for name in _fields(model) if not re.search(rf"(?m)\b{re.escape(name)}\s*=", text)
    ]
    assert missing == [], f"config.example.toml does not document {model.__name__}: {missing}"


def test_example_config_is_valid_and_spells_out_the_defaults() -> None:
    settings, problems = check(EXAMPLE)
    assert problems == []
    assert settings is not None
    defaults = load_settings(None)
    assert settings.server == defaults.server
    assert settings.limits == defaults.limits
    assert settings.plugins == defaults.plugins
    assert settings.models == defaults.models
    assert settings.hooks == defaults.hooks
    assert settings.lora == defaults.lora
    assert {name: b.type for name, b in settings.backends.items()} == {"embedded": "llamacpp"}
    [backend] = plan(settings, discover()).backends
    assert backend.config == LlamaCppConfig()


def test_example_config_names_the_built_in_plugins_by_their_entry_points() -> None:
    """`[plugins] disabled` takes entry-point names: the ones the example
    offers must be the built-in entry points of pyproject.toml."""
    comment = re.search(r"unwanted plugin\. Built in: ([^;]*);", EXAMPLE.read_text())
    assert comment is not None
    with (EXAMPLE.parent / "pyproject.toml").open("rb") as file:
        entry_points = tomllib.load(file)["project"]["entry-points"]["nomoat.plugins"]
    assert sorted(re.findall(r'"([^"]+)"', comment.group(1))) == sorted(entry_points)


def test_example_configs_commented_out_examples_are_valid(tmp_path: Path) -> None:
    """Uncommenting every `# key = value` and `# [table]` line of the example
    gives a valid config: the optional examples cannot rot either."""
    lines = EXAMPLE.read_text().splitlines()
    uncommented = [re.sub(r"^# (?=\[|[a-z_]+ = )", "", line) for line in lines]
    assert uncommented != lines
    settings, problems = check(write(tmp_path, "\n".join(uncommented) + "\n"))
    # The hook example names a plugin of the reader's; nothing else may fail.
    assert len(problems) == 1, problems
    assert problems[0].startswith('hooks[0].type: unknown hook "my-hook"')
    assert settings is not None
    assert settings.backends["pool"].type == "vllm"
    assert settings.server.decision_log == Path("/var/log/nomoat/decisions.jsonl")
    assert settings.hooks[0].name == "audit"


def test_the_routing_example_is_valid_and_shows_a_gpu_pool_two_edges_and_a_fallback() -> None:
    example = EXAMPLE.parent / "examples" / "routing.toml"
    settings, problems = check(example)
    assert problems == [], problems
    assert settings is not None
    kinds = sorted(backend.type for backend in settings.backends.values())
    assert kinds == ["edge", "edge", "openai", "vllm", "vllm"]
    [fallback] = settings.models["smollm2"].fallbacks
    hosted = settings.models[fallback].deployments[0].backend
    assert settings.backends[hosted].type == "openai"
