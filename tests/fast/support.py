"""Helpers of the fast layer: configs as data, SSE parsing, timing."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from gateway.testing import FakeCall
from gateway.testing.inprocess import InProcessGateway

MODEL = "m"
USER = [{"role": "user", "content": "Hello"}]
# A bare TOML key; anything else is quoted.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _table(header: str, values: Mapping[str, object]) -> str:
    lines = [header, *(f"{_key(k)} = {toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def config(
    backends: Mapping[str, Mapping[str, object]],
    models: Mapping[str, Mapping[str, object]],
    *,
    server: Mapping[str, object] | None = None,
    limits: Mapping[str, object] | None = None,
    hooks: Sequence[Mapping[str, object]] = (),
) -> str:
    """A whole config as TOML; every backend is a fake unless it says otherwise."""
    parts = []
    if server:
        parts.append(_table("[server]", server))
    if limits:
        parts.append(_table("[limits]", limits))
    for name, options in backends.items():
        parts.append(_table(f"[backends.{_key(name)}]", {"type": "fake", **options}))
    for name, options in models.items():
        parts.append(_table(f"[models.{_key(name)}]", options))
    parts.extend(_table("[[hooks]]", hook) for hook in hooks)
    return "\n".join(parts)


def pool(
    *names: str,
    name: str = MODEL,
    fakes: Mapping[str, Mapping[str, object]] | None = None,
    server: Mapping[str, object] | None = None,
    limits: Mapping[str, object] | None = None,
    hooks: Sequence[Mapping[str, object]] = (),
    **model: object,
) -> str:
    """Model ``name`` (``m``) on one fake backend per name (deployments m/0,
    m/1, ... in that order). Retries back off 10 ms unless the test says otherwise."""
    names = names or ("a",)
    options: dict[str, object] = {"deployments": [{"backend": backend} for backend in names]}
    options.setdefault("retry_backoff_seconds", 0.01)
    options.update(model)
    backends = {backend: (fakes or {}).get(backend, {}) for backend in names}
    return config(backends, {name: options}, server=server, limits=limits, hooks=hooks)


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", **fields}


def body_for(path: str, **fields: Any) -> dict[str, Any]:
    return chat_body(**fields) if path.endswith("chat/completions") else completion_body(**fields)


ENDPOINTS = ["/v1/chat/completions", "/v1/completions"]


def sse_payloads(body: bytes) -> list[bytes]:
    """The data of each event, checking OpenAI's framing exactly: every event
    is one ``data: ...`` line and a blank line, nothing else."""
    assert body.endswith(b"\n\n"), body[-40:]
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event, event
    return [event[len(b"data: ") :] for event in events]


def sse_json(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The events' JSON objects, and whether the stream ended with [DONE]."""
    payloads = sse_payloads(body)
    done = payloads[-1] == b"[DONE]"
    if done:
        payloads = payloads[:-1]
    assert b"[DONE]" not in payloads
    return [json.loads(p) for p in payloads], done


async def stream_events(
    gw: InProcessGateway, path: str, body: Mapping[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]], bool]:
    response = await gw.http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events, done = sse_json(response.content)
    return response, events, done


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """An OpenAI-shaped error body, its shape checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def deployments(calls: Sequence[FakeCall]) -> list[str]:
    return [call.target.deployment for call in calls]


def all_calls(gw: InProcessGateway) -> list[FakeCall]:
    """Every call to every fake, in the order they started."""
    calls = [call for fake in gw.fakes.values() for call in fake.calls]
    return sorted(calls, key=lambda call: call.started_at)


def gaps(calls: Sequence[FakeCall]) -> list[float]:
    """Seconds between each call's end and the next one's start."""
    pairs = itertools.pairwise(calls)
    return [after.started_at - (before.ended_at or before.started_at) for before, after in pairs]
