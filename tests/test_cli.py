"""The `nomoat` command line, run as users run it: in a child process."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import Cli, free_port, running_server

from gateway.auth import hash_api_key
from gateway.cli import _open_network_refusal, _with_overrides, parser
from gateway.settings import ServerSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
# A fast-starting server config: one engine thread (the machine is shared),
# no smoke test (test_lifecycle covers the default start-up).
QUICK_BACKEND = """
[backends.embedded]
type = "llamacpp"
threads = 1
smoke_test = false

[models.smollm2-135m-instruct]
deployments = [{ backend = "embedded" }]
"""


def nomoat(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NOMOAT_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**clean, **env},
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nomoat.toml"
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------ check-config


def test_check_config_accepts_the_example_config() -> None:
    done = nomoat("check-config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{EXAMPLE}: ok"


def test_check_config_reports_every_problem_and_exits_1(tmp_path: Path, cli: Cli) -> None:
    path = write(
        tmp_path,
        """
        [backends.local]
        type = "llamacpp"
        foo = 1
        [models.x]
        deployments = [{ backend = "y" }]
        policy = "nope"
        """,
    )
    done = cli("check-config", str(path))
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == f"{path}: 3 problem(s)"
    assert "  backends.local.foo: unknown key" in lines
    assert '  models.x.deployments[0].backend: unknown backend "y"' in lines
    assert any(line.startswith('  models.x.policy: unknown policy "nope"') for line in lines)


def test_check_config_shape_errors_exit_1(tmp_path: Path, cli: Cli) -> None:
    done = cli("check-config", str(write(tmp_path, "[server]\nport = 'x'\ncolour = 1\n")))
    assert done.returncode == 1
    assert "2 problem(s)" in done.stderr
    assert "server.colour: unknown key" in done.stderr
    assert "server.port: " in done.stderr


def test_check_config_missing_file(tmp_path: Path, cli: Cli) -> None:
    done = cli("check-config", str(tmp_path / "absent.toml"))
    assert done.returncode == 1
    assert "no such file" in done.stderr


def test_check_config_sees_environment_overrides(tmp_path: Path, cli: Cli) -> None:
    path = write(tmp_path, "[server]\nport = 8080\n")
    assert cli("check-config", str(path)).returncode == 0
    done = cli("check-config", str(path), NOMOAT_SERVER__PORT="not-a-port")
    assert done.returncode == 1
    assert "server.port: " in done.stderr


# ---------------------------------------------------------------- hash-key


def test_hash_key_prints_the_hash(cli: Cli) -> None:
    key = "sk-nomoat-0123456789abcdef"
    done = cli("hash-key", key)
    assert done.returncode == 0, done.stderr
    assert done.stdout == hash_api_key(key) + "\n"
    # The printed hash is accepted by the config it is meant for.
    server = ServerSettings(api_key_hashes=(done.stdout.strip(),))
    assert server.api_key_hashes == (hash_api_key(key),)


def test_hash_key_refuses_short_keys(cli: Cli) -> None:
    done = cli("hash-key", "short")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "at least 16 characters" in done.stderr


# ------------------------------------------------------------------- serve


@pytest.mark.e2e
def test_serve_refuses_an_open_network_listener_quickly() -> None:
    port = free_port()
    started = time.monotonic()
    done = nomoat("serve", "--host", "0.0.0.0", "--port", str(port))
    elapsed = time.monotonic() - started
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 with no API key configured" in done.stderr
    assert "--allow-unauthenticated-network" in done.stderr
    # Nothing was started or loaded: uvicorn never ran.
    assert "Started server process" not in done.stderr + done.stdout
    assert "startup" not in done.stderr.lower()
    assert elapsed < 30


@pytest.mark.e2e
def test_serve_refuses_a_host_from_the_environment(tmp_path: Path) -> None:
    done = nomoat("serve", "--port", str(free_port()), NOMOAT_SERVER__HOST="0.0.0.0")
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr


@pytest.mark.e2e
def test_serve_reports_configuration_errors_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.x]\ndeployments = [{ backend = "y" }]\n')
    done = nomoat("serve", "--config", str(path), "--port", str(free_port()))
    assert done.returncode == 2
    assert "configuration error" in done.stderr
    assert 'models.x.deployments[0].backend: unknown backend "y"' in done.stderr


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("localhost", False),
        ("::1", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.0.0.5", True),
        ("gateway.example.com", True),
    ],
)
def test_open_network_guard(host: str, refused: bool) -> None:
    assert (_open_network_refusal(ServerSettings(host=host)) is not None) is refused
    # An API key, or the explicit flag, always lets it listen.
    keyed = ServerSettings(host=host, api_key_hashes=(hash_api_key("k" * 20),))
    assert _open_network_refusal(keyed) is None
    assert (
        _open_network_refusal(ServerSettings(host=host, allow_unauthenticated_network=True)) is None
    )


def test_command_line_flags_win_over_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOMOAT_SERVER__HOST", "0.0.0.0")
    settings = load_settings(write(tmp_path, "[server]\nport = 1234\nshutdown_grace_seconds = 5\n"))
    args = parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "4321"])
    assert isinstance(args, argparse.Namespace)
    server = _with_overrides(settings, args).server
    assert (server.host, server.port) == ("127.0.0.1", 4321)
    assert server.allow_unauthenticated_network is False
    assert server.shutdown_grace_seconds == 5
    # No flags: the file and the environment stand.
    plain = _with_overrides(settings, parser().parse_args(["serve"])).server
    assert (plain.host, plain.port) == ("0.0.0.0", 1234)


@pytest.mark.e2e
def test_serve_with_allow_unauthenticated_network_listens_on_all_interfaces(
    tmp_path: Path,
) -> None:
    flags = ("--host", "0.0.0.0", "--allow-unauthenticated-network")
    with running_server(tmp_path, QUICK_BACKEND, *flags) as live:
        health = httpx.get(f"{live.root_url}/health", timeout=30)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        # Open gateway: no key needed.
        models = httpx.get(f"{live.base_url}/models", timeout=30)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["smollm2-135m-instruct"]
        port = live.root_url.rsplit(":", 1)[1]
        assert f"http://0.0.0.0:{port}" in live.log()
        # ...but not its admin API, and the log says both.
        admin = httpx.get(f"{live.root_url}/admin/adapters", timeout=30)
        assert admin.status_code == 403
        assert "server.admin_key_hashes" in admin.json()["error"]["message"]
        assert "with no API key (allow_unauthenticated_network)" in live.log()
        assert "the admin API (/admin/...) is closed" in live.log()


# ------------------------------------------------------------------ doctor


@pytest.mark.e2e
def test_doctor_decodes_with_the_embedded_model() -> None:
    done = nomoat("doctor", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "llama.cpp decodes SmolLM2-135M-Instruct" in done.stdout


@pytest.mark.e2e
def test_doctor_reports_a_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    done = nomoat("doctor", "--model", str(missing))
    assert done.returncode == 1
    assert done.stderr.strip() == f"nomoat doctor: no such file: {missing}"


@pytest.mark.e2e
def test_doctor_reports_a_file_llama_cpp_cannot_load(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file")
    done = nomoat("doctor", "--model", str(garbage), timeout=240)
    assert done.returncode == 1
    assert "failed to decode a token" in done.stderr
