"""Explaining and replaying routing decisions on a live gateway."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_api_key
from gateway.decision_log import RouteDecision, read_log
from tests.conftest import MODEL, config_with_key, free_port, running_server

ADMIN_KEY = "sk-nomoat-admin-0123456789abcdef"


def nomoat(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_plugins_lists_components_and_their_use() -> None:
    done = nomoat("plugins")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert ["llamacpp", "backend", "llamacpp", "backends.embedded"] in rows
    assert ["builtin-policies", "policy", "ordered", f"models.{MODEL}"] in rows
    assert ["builtin-policies", "policy", "session-affinity", "-"] in rows


def test_route_explain_without_a_gateway_says_so() -> None:
    port = free_port()  # nothing listens there
    done = nomoat("route", "--explain", "--model", MODEL, "--url", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"cannot reach the gateway at http://127.0.0.1:{port}" in done.stderr


# ------------------------------------------------------------- a live log

LOGGED = """
[backends.embedded]
type = "llamacpp"

[models.{model}]
policy = "weighted-round-robin"
deployments = [
  {{ backend = "embedded", model = "{model}" }},
  {{ backend = "embedded", model = "{model}", weight = 2.0 }},
]

[models.sessions]
policy = "session-affinity"
policy_options = {{ key = "header" }}
deployments = [
  {{ backend = "embedded", model = "{model}" }},
  {{ backend = "embedded", model = "{model}" }},
  {{ backend = "embedded", model = "{model}" }},
]
"""


@pytest.mark.e2e
def test_a_live_log_replays_every_ranking_with_the_same_policy(tmp_path: Path) -> None:
    log_path = tmp_path / "decisions.jsonl"
    extra = f'route_header = true\ndecision_log = "{log_path}"\n'
    config = config_with_key(LOGGED.format(model=MODEL)).replace("[server]\n", "[server]\n" + extra)
    with running_server(tmp_path, config) as live:
        client = openai.OpenAI(base_url=live.base_url, api_key=live.api_key, max_retries=0)
        hi = [{"role": "user", "content": "hi"}]
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=hi, max_tokens=2
        )
        assert raw.headers["x-nomoat-route"].startswith(f"deployment={MODEL}/1; backend=embedded")
        stream = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, stream=True)
        assert [chunk for chunk in stream]
        client.completions.create(model=MODEL, prompt="Once", max_tokens=2, user="ann")
        client.chat.completions.create(model=MODEL, messages=hi, max_tokens=2)
        for session in ("s1", "s2", "s1", "s3"):
            client.chat.completions.create(
                model="sessions", messages=hi, max_tokens=1, extra_headers={"X-Session-Id": session}
            )
        records = _records(log_path, 8)
    round_robin = [r for r in records if r.model == MODEL]
    assert [(r.request.endpoint, r.request.stream, r.outcome) for r in round_robin] == [
        ("chat", False, "ok"),
        ("chat", True, "ok"),
        ("completions", False, "ok"),
        ("chat", False, "ok"),
    ]
    # Smooth weighted round-robin, weights 1 and 2: its state moves each time.
    assert [r.chosen for r in round_robin] == [f"{MODEL}/{i}" for i in (1, 0, 1, 1)]
    assert round_robin[2].request.user == "ann"
    sessions = [r for r in records if r.model == "sessions"]
    assert [r.request.headers["x-session-id"] for r in sessions] == ["s1", "s2", "s1", "s3"]
    assert sessions[0].chosen == sessions[2].chosen
    for record in records:
        assert record.version == 3 and not record.request.has_prompt
        assert "authorization" not in record.request.headers
        stats = record.rankings[0].candidates[0].stats
        assert stats.running is not None  # the engine's own load was seen and recorded

    done = nomoat("replay", str(log_path), "--policy", "weighted-round-robin", "--model", MODEL)
    assert done.returncode == 0, done.stderr
    assert "same ranking order: 4 (100.0%)" in done.stdout
    done = nomoat(
        "replay", str(log_path), "--policy", "session-affinity", "--option", "key=header",
        "--model", "sessions",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "same ranking order: 4 (100.0%)" in done.stdout


def _records(path: Path, count: int) -> list[RouteDecision]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return read_log(path)
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} decisions logged in {path}")


# ---------------------------------------------------------- a live dry run

EXPLAINED = """
[backends.embedded]
type = "llamacpp"

[backends.gone]
type = "openai"
base_url = "http://127.0.0.1:{port}/v1"
models = ["{model}"]
probe_interval = 0.2

[models.{model}]
policy = "least-outstanding"
deployments = [
  {{ backend = "embedded", model = "{model}" }},
  {{ backend = "gone", model = "{model}" }},
]
"""


@pytest.fixture
def explained_gateway(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A gateway whose second deployment is down (nothing listens at its
    address), with an admin key; yields its root URL and API key."""
    admin = f'admin_key_hashes = ["{hash_api_key(ADMIN_KEY)}"]\n'
    config = config_with_key(EXPLAINED.format(model=MODEL, port=free_port()))
    with running_server(tmp_path, config.replace("[server]\n", "[server]\n" + admin)) as live:
        yield live.root_url, live.api_key


def explain_json(root: str, key: str | None, body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{root}/admin/route/explain", json=body, headers=headers, timeout=30)


@pytest.mark.e2e
def test_route_explain_shows_live_health_and_load(explained_gateway: tuple[str, str]) -> None:
    root, api_key = explained_gateway
    assert explain_json(root, None, {"model": MODEL}).status_code == 401
    assert explain_json(root, api_key, {"model": MODEL}).status_code == 403

    # Keep the embedded engine busy with one long answer while we look; the
    # client hangs up at the end, which stops the generation.
    with busy_with_one_answer(root, api_key):
        check_explained(root)


@contextlib.contextmanager
def busy_with_one_answer(root: str, api_key: str) -> Iterator[None]:
    body = json.dumps(
        {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 1000, "temperature": 0}
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    host, port = root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(head.encode() + body)
        yield


def check_explained(root: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        answer = explain_json(root, ADMIN_KEY, {"model": MODEL})
        assert answer.status_code == 200, answer.text
        decision = answer.json()
        ranking = decision["rankings"][0]
        embedded = ranking["candidates"][0]
        if embedded["stats"]["in_flight"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert decision["dry_run"] is True and decision["outcome"] == "dry_run"
    assert embedded["deployment"] == f"{MODEL}/0"
    assert embedded["stats"]["in_flight"] == 1 and embedded["stats"]["running"] == 1
    assert embedded["health"] == {"ready": True, "detail": "", "cooldown_seconds": 0.0}
    assert [c["deployment"] for c in ranking["ranked"]] == [f"{MODEL}/0"]
    (gone,) = ranking["excluded"]
    assert gone["deployment"] == f"{MODEL}/1" and gone["backend"] == "gone"
    assert gone["health"]["ready"] is False and gone["health"]["detail"]

    env = {**os.environ, "TEST_ADMIN_KEY": ADMIN_KEY}
    done = nomoat(
        "route", "--explain", "--model", MODEL, "--url", root,
        "--admin-key-env", "TEST_ADMIN_KEY", "--message", "hello", "--header", "x-tier: gold",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"request: chat to {MODEL}, ~1 tokens"
    assert f"model {MODEL}, policy least-outstanding" in lines
    header = next(line for line in lines if line.startswith("rank"))
    row = next(line for line in lines if line.startswith("1 ")).split()
    assert header.split()[:5] == ["rank", "deployment", "backend", "health", "cooldown"]
    assert row[:7] == ["1", f"{MODEL}/0", "embedded", "ready", "-", "1", "1"]
    assert "1 in flight" in done.stdout
    out = next(line for line in lines if line.startswith("out "))
    assert f"{MODEL}/1" in out and "gone" in out and "down:" in out

    without = {k: v for k, v in os.environ.items() if k != "NOMOAT_ADMIN_KEY"}
    done = nomoat("route", "--explain", "--model", MODEL, "--url", root, env=without)
    assert done.returncode == 1
    assert (
        "answered 401" in done.stderr and "$NOMOAT_ADMIN_KEY must hold an admin key" in done.stderr
    )
