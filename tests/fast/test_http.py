"""What a client sees on the wire: SSE framing, usage, ids, headers, the SDK."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.auth import hash_api_key
from gateway.errors import UpstreamError
from gateway.testing import Script

from .conftest import Start
from .support import (
    ENDPOINTS,
    MODEL,
    USER,
    body_for,
    chat_body,
    error_of,
    pool,
    sse_json,
    sse_payloads,
    stream_events,
)

pytestmark = pytest.mark.anyio

KEY = "sk-in-process-test"


# ------------------------------------------------------------------ SSE framing


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_sse_framing_is_exact(start: Start, path: str) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post(path, json=body_for(path, stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    payloads = sse_payloads(response.content)
    assert payloads[-1] == b"[DONE]"
    # Compact JSON, one object per event.
    for payload in payloads[:-1]:
        assert payload == json.dumps(json.loads(payload), separators=(",", ":")).encode()


async def test_chat_chunks_share_the_id_and_start_with_the_role(start: Start) -> None:
    async with start(pool("a")) as gw:
        _, events, done = await stream_events(gw, "/v1/chat/completions", chat_body())
    assert done
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert events[0]["id"].startswith("chatcmpl-")
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert {e["model"] for e in events} == {MODEL}
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events)


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("include", [True, False, None])
async def test_include_usage(start: Start, path: str, include: bool | None) -> None:
    options = {} if include is None else {"stream_options": {"include_usage": include}}
    async with start(pool("a")) as gw:
        _, events, done = await stream_events(gw, path, body_for(path, **options))
    assert done
    if include:
        # As OpenAI: "usage": null on every chat chunk (absent on a text
        # completion's: its description allows an object or nothing), the
        # totals on a last one without choices.
        if path.endswith("chat/completions"):
            assert all(e["usage"] is None for e in events[:-1])
        else:
            assert all("usage" not in e for e in events[:-1])
        assert events[-1]["choices"] == []
        assert events[-1]["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
        }
    else:
        assert all("usage" not in e and e["choices"] for e in events)


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_stream_options_without_stream_is_a_400(start: Start, path: str) -> None:
    async with start(pool("a")) as gw:
        body = body_for(path, stream_options={"include_usage": True})
        error = error_of(await gw.http.post(path, json=body), 400)
        assert error["param"] == "stream_options"
        assert gw.backend("a").calls == []


async def test_the_sdk_streams_with_usage(start: Start) -> None:
    async with start(pool("a")) as gw:
        stream = await gw.sdk.chat.completions.create(
            model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == gw.backend("a").config.reply
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8


async def test_the_sdk_gets_json_answers(start: Start) -> None:
    async with start(pool("a")) as gw:
        chat = await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        text = await gw.sdk.completions.create(model=MODEL, prompt="Hi")
    assert chat.choices[0].message.content == gw.backend("a").config.reply
    assert chat.id.startswith("chatcmpl-") and text.id.startswith("cmpl-")
    assert text.choices[0].text == gw.backend("a").config.reply
    assert [call.kind for call in gw.backend("a").calls] == ["chat", "completion"]


async def test_the_json_answer_is_what_the_backend_made(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(text="exactly this", finish_reason="length"))
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
    body = response.json()
    assert response.headers["content-type"] == "application/json"
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "exactly this", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]


# --------------------------------------------------------------- route header


@pytest.mark.parametrize("stream", [False, True])
async def test_the_route_header_names_the_deployment(start: Start, stream: bool) -> None:
    async with start(pool("a", "b", server={"route_header": True})) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
    route = response.headers["x-nomoat-route"]
    assert route == "deployment=m/0; backend=a; score=2; policy=ordered; tried=1"


async def test_the_route_header_counts_the_attempts(start: Start) -> None:
    async with start(pool("a", "b", server={"route_header": True})) as gw:
        gw.backend("a").script(Script(error=UpstreamError("unreachable")))
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
    assert response.headers["x-nomoat-route"].startswith("deployment=m/1; backend=b;")
    assert response.headers["x-nomoat-route"].endswith("tried=2")


async def test_a_fallbacks_answer_says_so_in_the_route_header(start: Start) -> None:
    config = pool("a", server={"route_header": True}, fallbacks=["f"], retries=0)
    config += '\n[backends.z]\ntype = "fake"\n[models.f]\ndeployments = [{ backend = "z" }]\n'
    async with start(config) as gw:
        gw.backend("a").script(Script(error=UpstreamError("unreachable")))
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
    assert response.headers["x-nomoat-route"] == "deployment=f/0; fallback=true; tried=2"


@pytest.mark.parametrize("stream", [False, True])
async def test_no_route_header_unless_configured(start: Start, stream: bool) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
    assert response.status_code == 200
    assert "x-nomoat-route" not in response.headers


# ------------------------------------------------------- keys, models, limits


def keyed(**limits: object) -> str:
    return pool("a", server={"api_key_hashes": [hash_api_key(KEY)]}, limits=limits or None)


@pytest.mark.parametrize(
    "authorization", ["", "Bearer", "Bearer sk-wrong-key-0123456789", "Basic x"]
)
async def test_a_missing_or_wrong_key_is_a_401(start: Start, authorization: str) -> None:
    async with start(keyed()) as gw:
        headers = {"Authorization": authorization}
        response = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        error_of(response, 401)
        assert gw.backend("a").calls == []


async def test_the_sdk_with_the_key_is_served_and_without_it_refused(start: Start) -> None:
    async with start(keyed()) as gw:
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        stranger = gw.sdk.with_options(api_key="sk-not-the-key-0123456789")
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model=MODEL, messages=USER)


async def test_an_unknown_model_is_a_404_from_the_sdk(start: Start) -> None:
    async with start(pool("a")) as gw:
        with pytest.raises(openai.NotFoundError) as raised:
            await gw.sdk.chat.completions.create(model="nope", messages=USER)
    assert raised.value.code == "model_not_found"


async def test_models_are_listed(start: Start) -> None:
    config = pool("a", aliases=["m-alias"])
    async with start(config) as gw:
        models = await gw.sdk.models.list()
        model = await gw.sdk.models.retrieve(MODEL)
    assert [m.id for m in models.data] == [MODEL]
    assert model.owned_by == "nomoat"


async def test_an_alias_reaches_the_model_and_is_echoed(start: Start) -> None:
    async with start(pool("a", aliases=["m-alias"])) as gw:
        answer = await gw.sdk.chat.completions.create(model="m-alias", messages=USER)
    assert gw.backend("a").calls[0].target.deployment == "m/0"
    assert answer.model == MODEL


@pytest.mark.parametrize(
    ("limits", "body", "param"),
    [
        ({"max_n": 2}, chat_body(n=3), "n"),
        ({"max_messages": 1}, chat_body(messages=USER * 2), "messages"),
        ({"max_stop_sequences": 1}, chat_body(stop=["a", "b"]), "stop"),
    ],
    ids=["n", "messages", "stop"],
)
async def test_limits_are_400s_before_any_backend(
    start: Start, limits: dict[str, int], body: dict[str, object], param: str
) -> None:
    async with start(keyed(**limits)) as gw:
        error = error_of(await gw.http.post("/v1/chat/completions", json=body), 400)
        assert error["param"] == param
        assert gw.backend("a").calls == []


async def test_a_body_over_the_limit_is_a_413(start: Start) -> None:
    async with start(keyed(max_body_bytes=2048)) as gw:
        body = chat_body(messages=[{"role": "user", "content": "x" * 4096}])
        error_of(await gw.http.post("/v1/chat/completions", json=body), 413)
        assert gw.backend("a").calls == []


async def test_status_lists_every_deployment_and_its_health(start: Start) -> None:
    async with start(pool("a", "b", fakes={"b": {"ready": False, "detail": "warming"}})) as gw:
        status = (await gw.http.get("/status")).json()
        ready = (await gw.http.get("/ready")).json()
    assert [(d["deployment"], d["ready"], d["detail"]) for d in status["models"][MODEL]] == [
        ("m/0", True, ""),
        ("m/1", False, "warming"),
    ]
    assert ready == {"status": "ready"}


async def test_the_stream_ends_with_done_only_when_complete(start: Start) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post(
            "/v1/completions", json=body_for("/v1/completions", stream=True)
        )
    events, done = sse_json(response.content)
    assert done and [e["choices"][0]["text"] for e in events[:-1]]
