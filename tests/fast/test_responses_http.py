"""The Responses API in the fast layer: the real gateway in process, a fake
backend, the official SDK (async) as the client, the accounting database in a
temporary directory.

The fake records the chat requests the gateway sent it: what a model saw of
a conversation continued through ``previous_response_id`` is read there."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import msgspec
import openai
import pytest
from sqlalchemy import select, text

from gateway.accounting.tables import usage
from gateway.auth import hash_api_key
from gateway.errors import UpstreamError
from gateway.registry import Registry
from gateway.telemetry import semconv as names
from gateway.testing import Script
from gateway.testing.inprocess import InProcessGateway, in_process_gateway

from .conftest import Start
from .support import MODEL, pool
from .test_traces import Traced, attrs, child_of, one

pytestmark = pytest.mark.anyio

KEY = "sk-in-process-test"  # what in_process_gateway's clients send
OTHER_KEY = "sk-other-0123456789abcdef"
SERVER = {"api_key_hashes": [hash_api_key(KEY), hash_api_key(OTHER_KEY)]}
NO_ACCOUNTING = "\n[accounting]\nenabled = false\n"


def other(gw: InProcessGateway) -> openai.AsyncOpenAI:
    """The SDK with the other key, over the same in-process app."""
    return gw.sdk.with_options(api_key=OTHER_KEY)


def seen(gw: InProcessGateway, call: int) -> list[Any]:
    """The messages the backend got on its ``call``-th call, as plain data."""
    request = gw.backend("a").calls[call].request
    messages = msgspec.to_builtins(getattr(request, "messages", []))
    return [(m["role"], m.get("content")) for m in messages]


async def test_a_conversation_is_stored_continued_and_belongs_to_its_key(start: Start) -> None:
    async with start(pool("a", server=SERVER)) as gw:
        sdk = gw.sdk
        first = await sdk.responses.create(model=MODEL, input="One", instructions="Be brief.")
        second = await sdk.responses.create(
            model=MODEL, input="Two", previous_response_id=first.id, instructions="Be terse."
        )
        third = await sdk.responses.create(
            model=MODEL, input="Three", previous_response_id=second.id
        )
        # The model saw every earlier turn, its answers included; each
        # turn's instructions only for that turn (as OpenAI does).
        assert seen(gw, 2) == [
            ("user", "One"),
            ("assistant", first.output_text),
            ("user", "Two"),
            ("assistant", second.output_text),
            ("user", "Three"),
        ]
        assert seen(gw, 1)[0] == ("system", "Be terse.")
        assert third.previous_response_id == second.id
        assert first.usage is not None and third.usage is not None

        again = await sdk.responses.retrieve(third.id)
        assert again.id == third.id and again.output_text == third.output_text
        # Another key: as if none of it existed.
        stranger = other(gw)
        with pytest.raises(openai.NotFoundError):
            await stranger.responses.retrieve(third.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            await stranger.responses.create(model=MODEL, input="x", previous_response_id=third.id)
        assert unknown.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await stranger.responses.delete(third.id)

        deleted = await gw.http.delete(f"/v1/responses/{third.id}")
        assert deleted.json() == {"id": third.id, "object": "response", "deleted": True}
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(third.id)
        unstored = await sdk.responses.create(model=MODEL, input="x", store=False)
        assert unstored.store is False
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(unstored.id)


async def test_a_stream_reaches_the_sdk_helpers_final_response_and_is_stored(
    start: Start,
) -> None:
    async with start(pool("a", server=SERVER)) as gw:
        async with gw.sdk.responses.stream(model=MODEL, input="Hi") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed"
        assert final.status == "completed" and final.output_text
        assert final.usage is not None and final.usage.output_tokens > 0
        # Stored before its last event: retrievable at once.
        assert (await gw.sdk.responses.retrieve(final.id)).output_text == final.output_text
        # One ledger row per request, labelled as a Responses request.
        accounting = gw.runtime.accounting
        assert accounting is not None
        await accounting.ledger.flush()
        async with accounting.engine.connect() as connection:
            rows = (await connection.execute(select(usage))).mappings().all()
        assert [(r["endpoint"], r["stream"], r["status"]) for r in rows] == [
            ("/v1/responses", True, 200)
        ]
        assert rows[0]["request_id"] == final.id
        assert rows[0]["completion_tokens"] == final.usage.output_tokens
        # The metrics tell it from chat by its operation.
        metrics = (await gw.http.get("/metrics")).text
        assert 'gen_ai_operation_name="responses"' in metrics
        assert 'gen_ai_operation_name="chat"' not in metrics


async def test_errors_are_the_sdk_exception_classes(start: Start) -> None:
    async with start(pool("a", server=SERVER, limits={"max_body_bytes": 4096})) as gw:
        sdk = gw.sdk
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
        assert refused.value.body["param"] == "tools[0].type"  # type: ignore[index]
        assert "web_search" in refused.value.message
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.create(model=MODEL, input="x", background=True)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.create(model="no-such-model", input="x")
        with pytest.raises(openai.APIStatusError) as too_large:
            await sdk.responses.create(model=MODEL, input="x" * 5000)
        assert too_large.value.status_code == 413
        with pytest.raises(openai.AuthenticationError):
            await sdk.with_options(api_key="sk-wrong").responses.create(model=MODEL, input="x")
        raw = await gw.http.post(
            "/v1/responses", content=b"{", headers={"content-type": "application/json"}
        )
        assert raw.status_code == 400 and set(raw.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }


async def test_without_accounting_responses_are_kept_in_memory(start: Start) -> None:
    async with start(pool("a") + NO_ACCOUNTING) as gw:
        assert gw.runtime.accounting is None
        first = await gw.sdk.responses.create(model=MODEL, input="One")
        second = await gw.sdk.responses.create(
            model=MODEL, input="Two", previous_response_id=first.id
        )
        assert seen(gw, 1)[:2] == [("user", "One"), ("assistant", first.output_text)]
        assert (await gw.sdk.responses.retrieve(second.id)).id == second.id
        missing = await gw.http.get("/v1/responses/resp_nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "Response with id 'resp_nothing' not found."
        # An id of a megabyte is not echoed back (found by the fuzz suite).
        huge = await gw.http.post(
            "/v1/responses",
            json={"model": MODEL, "input": "x", "previous_response_id": "r" * 10**6},
        )
        assert huge.status_code == 404
        assert huge.json()["error"]["param"] == "previous_response_id"
        assert len(huge.json()["error"]["message"]) < 300
        assert isinstance(gw.http, httpx.AsyncClient)


async def test_leaving_a_stream_at_its_first_event_stops_the_generation(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=1))
        body = {"model": MODEL, "input": "Hi", "stream": True}
        async with gw.http.stream("POST", "/v1/responses", json=body) as response:
            first = await anext(response.aiter_lines())
            assert first == "event: response.created"
        left_at = time.monotonic()
        call = gw.backend("a").calls[0]
        assert await call.wait_ended(within=0.5) in ("cancelled", "closed")
        assert call.ended_at is not None and call.ended_at - left_at < 0.5


async def test_a_stream_failing_half_way_ends_with_an_error_event(start: Start) -> None:
    async with start(pool("a")) as gw:
        failing = Script(error=UpstreamError("the engine went away"), error_after=2)
        gw.backend("a").script(failing, failing)
        with pytest.raises(openai.APIError, match="the engine went away"):
            async with gw.sdk.responses.stream(model=MODEL, input="Hi") as stream:
                async for event in stream:
                    last = event
        assert last.type == "response.output_text.delta"
        raw = await gw.http.post(
            "/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True}
        )
        *_, frame = raw.text.strip().split("\n\n")
        kind, data = frame.split("\n")
        error = json.loads(data.removeprefix("data: "))
        assert kind == "event: error" and error["type"] == "error"
        assert error["message"] == error["error"]["message"] == "the engine went away"
        # Nothing was stored: its id is nowhere.
        created = json.loads(raw.text.split("\n\n")[0].split("\n")[1].removeprefix("data: "))
        missing = await gw.http.get(f"/v1/responses/{created['response']['id']}")
        assert missing.status_code == 404


async def test_a_streamed_response_is_traced_like_chat(registry: Registry) -> None:
    traced = Traced()
    async with in_process_gateway(pool("a"), registry=registry, tracing=traced.tracing) as gw:
        stream = gw.sdk.responses.stream(model=MODEL, input="Hi")
        async with stream as events:
            final = await events.get_final_response()
    spans = await traced.wait_for(2)
    server = one(spans, "POST /v1/responses")
    attempt = one(spans, f"chat {MODEL}")
    assert child_of(attempt, server)
    on_attempt = attrs(attempt)
    assert on_attempt[names.OPERATION_NAME] == "chat"
    assert on_attempt[names.REQUEST_STREAM] is True
    assert final.usage is not None
    assert on_attempt[names.USAGE_OUTPUT_TOKENS] == final.usage.output_tokens
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 200


async def test_an_unavailable_store_is_a_503_and_store_false_still_answers(start: Start) -> None:
    async with start(pool("a")) as gw:
        accounting = gw.runtime.accounting
        assert accounting is not None
        async with accounting.engine.begin() as connection:
            await connection.execute(text("drop table responses"))
        with pytest.raises(openai.InternalServerError) as unavailable:
            await gw.sdk.responses.create(model=MODEL, input="Hi")
        assert unavailable.value.status_code == 503
        assert unavailable.value.response.headers["retry-after"] == "1"
        assert unavailable.value.code == "store_unavailable"
        answered = await gw.sdk.responses.create(model=MODEL, input="Hi", store=False)
        assert answered.output_text
        with pytest.raises(openai.InternalServerError):
            await gw.sdk.responses.create(model=MODEL, input="Hi", previous_response_id="resp_x")


async def test_a_keys_rate_limit_is_a_429(start: Start) -> None:
    limited = f'\n[[accounting.static_keys]]\nkey_hash = "{hash_api_key(KEY)}"\nrpm = 1\n'
    async with start(pool("a", server=SERVER) + limited) as gw:
        await gw.sdk.responses.create(model=MODEL, input="Hi")
        with pytest.raises(openai.RateLimitError) as limited_error:
            await gw.sdk.responses.create(model=MODEL, input="Hi")
        assert "retry-after" in limited_error.value.response.headers
        # The other key has no limit.
        assert (await other(gw).responses.create(model=MODEL, input="Hi")).output_text
