"""Hooks as configured by ``[[hooks]]``, through HTTP: early answers,
rewrites, failures, and the error hooks told of every error once."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth import hash_api_key
from gateway.errors import UpstreamError
from gateway.testing import Script
from gateway.testing.inprocess import InProcessGateway

from .conftest import Start
from .plugins import ErrorRecorder
from .support import (
    ENDPOINTS,
    MODEL,
    USER,
    all_calls,
    body_for,
    chat_body,
    config,
    error_of,
    pool,
    sse_json,
    stream_events,
)

pytestmark = pytest.mark.anyio

KEY = "sk-in-process-test"


def hook(gw: InProcessGateway, index: int = 0) -> Any:
    return gw.runtime.plan.hooks[index].hook


def recorder(gw: InProcessGateway) -> ErrorRecorder:
    found = [b.hook for b in gw.runtime.plan.hooks if isinstance(b.hook, ErrorRecorder)]
    assert len(found) == 1
    return found[0]


def text_of(events: list[dict[str, Any]]) -> str:
    parts = []
    for event in events:
        for choice in event["choices"]:
            parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(parts)


# ------------------------------------------------------------- request hooks


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_an_early_answer_skips_the_backend(start: Start, path: str) -> None:
    hooks = [{"type": "answer-early", "options": {"text": "cached!"}}]
    async with start(pool("a", hooks=hooks)) as gw:
        response = await gw.http.post(path, json=body_for(path))
        body = response.json()
        assert gw.backend("a").calls == []
    choice = body["choices"][0]
    assert (choice.get("text") or choice.get("message", {}).get("content")) == "cached!"


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("path", ENDPOINTS)
async def test_an_early_answer_is_streamed_when_asked(
    start: Start, path: str, include_usage: bool
) -> None:
    hooks = [{"type": "answer-early", "options": {"text": "cached!"}}]
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with start(pool("a", hooks=hooks)) as gw:
        _, events, done = await stream_events(gw, path, body_for(path, **options))
        assert gw.backend("a").calls == []
    assert done and text_of(events) == "cached!"
    assert (events[-1]["choices"] == [] and "usage" in events[-1]) is include_usage


async def test_a_request_hook_may_send_the_request_to_another_model(start: Start) -> None:
    text = config(
        {"a": {}, "z": {}},
        {MODEL: {"deployments": [{"backend": "a"}]}, "n": {"deployments": [{"backend": "z"}]}},
        hooks=[{"type": "rename", "options": {"model": "n"}}],
    )
    async with start(text) as gw:
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert gw.backend("a").calls == []
        [call] = gw.backend("z").calls
        assert call.target.deployment == "n/0" and call.request.model == "n"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_hook_rejects_the_request_naming_it(start: Start, stream: bool) -> None:
    hooks = [{"type": "explode", "name": "audit"}]
    async with start(pool("a", hooks=hooks)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
        error = error_of(response, 500)
        assert gw.backend("a").calls == []
    assert error["code"] == "hook_failed" and "'audit'" in error["message"]
    assert "a bug" not in response.text


async def test_a_fail_open_hook_is_skipped_and_counted(start: Start) -> None:
    hooks = [{"type": "explode", "name": "audit", "fail_open": True}]
    async with start(pool("a", hooks=hooks)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        metrics = (await gw.http.get("/metrics")).text
        assert response.status_code == 200 and len(gw.backend("a").calls) == 1
    assert 'nomoat_hook_failures_total{hook="audit"} 1' in metrics


# ------------------------------------------------------ response and stream hooks


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_response_hook_changes_the_answer(start: Start, path: str) -> None:
    async with start(pool("a", hooks=[{"type": "shout"}])) as gw:
        body = (await gw.http.post(path, json=body_for(path))).json()
        reply = gw.backend("a").config.reply
    choice = body["choices"][0]
    assert (choice.get("text") or choice.get("message", {}).get("content")) == reply.upper()


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_stream_hook_changes_the_chunks(start: Start, path: str) -> None:
    async with start(pool("a", hooks=[{"type": "shout"}])) as gw:
        _, events, done = await stream_events(gw, path, body_for(path))
        reply = gw.backend("a").config.reply
    assert done and text_of(events) == reply.upper()


@pytest.mark.parametrize("fail_open", [False, True])
async def test_a_failing_stream_hook_ends_the_stream_with_an_error(
    start: Start, fail_open: bool
) -> None:
    hooks = [{"type": "explode-stream", "name": "tap", "fail_open": fail_open}]
    async with start(pool("a", hooks=hooks)) as gw:
        _, events, done = await stream_events(gw, "/v1/chat/completions", chat_body())
    assert not done
    assert events[-1]["error"]["code"] == "hook_failed"
    assert "'tap'" in events[-1]["error"]["message"]


# ----------------------------------------------------------------- error hooks


async def test_error_hooks_hear_nothing_of_a_success(start: Start) -> None:
    async with start(pool("a", hooks=[{"type": "errors"}])) as gw:
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert recorder(gw).errors == []


@pytest.mark.parametrize("stream", [False, True])
async def test_error_hooks_hear_of_an_upstream_error_once(start: Start, stream: bool) -> None:
    async with start(pool("a", "b", retries=1, hooks=[{"type": "errors"}])) as gw:
        for name in ("a", "b"):
            gw.backend(name).default = Script(error=UpstreamError("unreachable"))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
        error_of(response, 502)
        assert len(all_calls(gw)) == 3  # a, b, then a again (b is cooling down)
        seen = recorder(gw).errors
    assert [(request is not None, error.status_code) for request, error in seen] == [(True, 502)]


async def test_error_hooks_hear_of_an_unknown_model_once(start: Start) -> None:
    async with start(pool("a", hooks=[{"type": "errors"}])) as gw:
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body(model="x")), 404)
        assert recorder(gw).statuses == [404]


async def test_error_hooks_hear_of_a_hooks_refusal_once(start: Start) -> None:
    async with start(pool("a", hooks=[{"type": "errors"}, {"type": "refuse"}])) as gw:
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 403)
        assert recorder(gw).statuses == [403]


async def test_error_hooks_hear_of_no_deployment_once(start: Start) -> None:
    async with start(pool("a", policy="nobody", retries=0, hooks=[{"type": "errors"}])) as gw:
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 503)
        assert recorder(gw).statuses == [503]


def keyed(hooks: list[dict[str, object]], **limits: object) -> str:
    server = {"api_key_hashes": [hash_api_key(KEY)]}
    return pool("a", server=server, limits=limits or None, hooks=hooks)


async def test_error_hooks_hear_of_an_authentication_failure(start: Start) -> None:
    async with start(keyed([{"type": "errors"}])) as gw:
        headers = {"Authorization": "Bearer sk-wrong-0123456789abcdef"}
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body(), headers=headers), 401)
        assert recorder(gw).statuses == [401]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[]"], ids=["broken", "empty", "array"])
async def test_error_hooks_hear_of_an_undecodable_body_without_a_request(
    start: Start, body: bytes
) -> None:
    async with start(keyed([{"type": "errors"}])) as gw:
        error_of(await gw.http.post("/v1/chat/completions", content=body), 400)
        [(request, error)] = recorder(gw).errors
    assert request is None and error.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        chat_body(colour="red"),
        chat_body(temperature=9),
        chat_body(messages=[]),
        chat_body(stream_options={"include_usage": True}),
    ],
    ids=["unknown-field", "out-of-range", "no-messages", "stream-options-without-stream"],
)
async def test_error_hooks_hear_of_an_invalid_body(start: Start, body: dict[str, Any]) -> None:
    async with start(keyed([{"type": "errors"}])) as gw:
        error_of(await gw.http.post("/v1/chat/completions", json=body), 400)
        assert recorder(gw).statuses == [400]


async def test_error_hooks_hear_of_a_limit_error(start: Start) -> None:
    async with start(keyed([{"type": "errors"}], max_n=1)) as gw:
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body(n=2)), 400)
        assert recorder(gw).statuses == [400]


async def test_error_hooks_hear_of_a_body_too_large(start: Start) -> None:
    async with start(keyed([{"type": "errors"}], max_body_bytes=2048)) as gw:
        body = chat_body(messages=[{"role": "user", "content": "x" * 4096}])
        error_of(await gw.http.post("/v1/chat/completions", json=body), 413)
        assert recorder(gw).statuses == [413]


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_error_hooks_hear_of_an_error_after_the_first_byte(start: Start, path: str) -> None:
    async with start(pool("a", hooks=[{"type": "errors"}])) as gw:
        gw.backend("a").script(Script(error=UpstreamError("cut"), error_after=2))
        response = await gw.http.post(path, json=body_for(path, stream=True))
        _, done = sse_json(response.content)
        assert not done
        [(request, error)] = recorder(gw).errors
    assert request is not None and error.message == "cut"


async def test_error_hooks_hear_of_a_stream_hook_failure(start: Start) -> None:
    hooks = [{"type": "errors"}, {"type": "explode-stream", "name": "tap"}]
    async with start(pool("a", hooks=hooks)) as gw:
        _, _, done = await stream_events(gw, "/v1/chat/completions", chat_body())
        assert not done
        assert [e.code for _, e in recorder(gw).errors] == ["hook_failed"]
