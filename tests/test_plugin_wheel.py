"""A plugin as a user gets it: built as a wheel, installed next to a regular
(non-editable) nomoat in a fresh virtual environment, enabled by the config
alone, and exercised with the official `openai` SDK.

Builds and installs cost about a minute (pip's cache makes reruns faster);
every subprocess and wait is bounded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.testing import MODEL, TEST_KEY, LiveGateway, gateway_config, running_gateway

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plugins" / "nomoat-template"
LLAMA_VERSION = "0.3.36"  # as pinned in pyproject.toml and scripts/bootstrap.sh
STEP_SECONDS = 600

CONFIG = f"""
route_header = true

[backends.embedded]
type = "llamacpp"

[models.{MODEL}]
deployments = [{{ backend = "embedded" }}, {{ backend = "embedded" }}]
policy = "reverse-order"

[[hooks]]
type = "blocklist"
name = "no-mallory"
options = {{ blocked_users = ["mallory"], message = "Mallory may not use this gateway." }}
"""

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3 * STEP_SECONDS)]


def run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=STEP_SECONDS,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def llama_wheel() -> Path:
    """The llama-cpp-python wheel scripts/bootstrap.sh built for this CPU.

    The cache folder is keyed by version and build flags; if several builds
    are cached, the one whose library this test's own environment runs wins.
    """
    cache = Path(os.environ.get("NOMOAT_CACHE", Path.home() / ".cache" / "nomoat"))
    wheels = sorted(cache.glob(f"wheels/llama-cpp-python-{LLAMA_VERSION}-*/llama_cpp_python-*.whl"))
    if not wheels:
        pytest.fail(f"no llama-cpp-python wheel under {cache}/wheels: run scripts/bootstrap.sh")
    if len(wheels) == 1:
        return wheels[0]
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    installed = Path(spec.origin).parent / "lib" / "libggml-cpu.so"
    digest = hashlib.sha256(installed.read_bytes()).hexdigest()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if hashlib.sha256(archive.read("llama_cpp/lib/libggml-cpu.so")).hexdigest() == digest:
                return wheel
    pytest.fail(f"none of {wheels} is the build this environment runs")


def nomoat_source(into: Path) -> Path:
    """What a nomoat sdist holds, so pip builds outside the work tree."""
    into.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, into / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "gateway", into / "gateway", ignore=ignore)
    return into


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment: nomoat (not editable) and the template's wheel."""
    work = tmp_path_factory.mktemp("wheel")
    wheels = work / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, TEMPLATE)
    (template_wheel,) = wheels.glob("nomoat_template-*.whl")
    env = work / "venv"
    run(sys.executable, "-m", "venv", env)
    python = env / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", llama_wheel())
    run(python, "-m", "pip", "install", "--quiet", nomoat_source(work / "nomoat"), template_wheel)
    return env


@pytest.fixture(scope="module")
def gateway(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    directory = tmp_path_factory.mktemp("wheel-gateway")
    config = gateway_config(CONFIG)
    with running_gateway(directory, config, command=[str(venv / "bin" / "nomoat")]) as live:
        yield live


def client(live: LiveGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=TEST_KEY, max_retries=0, timeout=120)


def test_the_environment_is_fresh_and_regular(venv: Path) -> None:
    listing = run(venv / "bin" / "python", "-m", "pip", "list", "--format=freeze")
    assert "nomoat-template==0.1.0" in listing
    assert "nomoat-cache" not in listing  # only what this test installed
    show = run(venv / "bin" / "python", "-m", "pip", "show", "nomoat")
    assert "Editable project location" not in show


def test_the_plugin_is_discovered_and_used_by_the_config(venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "nomoat.toml"
    config.write_text(gateway_config(CONFIG))
    listing = run(venv / "bin" / "nomoat", "plugins", "--config", config)
    rows = [line.split() for line in listing.splitlines()]
    assert ["template", "hook", "blocklist", "hooks[0]"] in rows
    assert ["template", "policy", "reverse-order", f"models.{MODEL}"] in rows


def test_a_blocked_user_gets_403(gateway: LiveGateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(gateway).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], user="mallory"
        )
    assert refused.value.status_code == 403
    assert refused.value.code == "permission_denied"
    assert "Mallory may not use this gateway." in refused.value.message


def test_other_users_are_served_by_the_policy_s_choice(gateway: LiveGateway) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, user="alice"
    )
    reply = raw.parse()
    assert reply.choices[0].message.content
    route = raw.headers["x-nomoat-route"]
    # reverse-order puts the second deployment first.
    assert f"deployment={MODEL}/1;" in route
    assert "policy=reverse-order" in route


def test_config_errors_name_the_plugin_option(venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        textwrap.dedent(
            """
            [[hooks]]
            type = "blocklist"
            options = { blocked = ["mallory"] }
            """
        )
    )
    done = subprocess.run(
        [str(venv / "bin" / "nomoat"), "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "hooks[0].options.blocked: unknown key" in done.stdout + done.stderr
