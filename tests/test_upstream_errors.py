"""How `Upstream` (the one seam to OpenAI-compatible HTTP upstreams) turns
what an upstream does into typed gateway errors, driven through a scripted
transport: statuses, Retry-After, transport failures, streams cut short or
framed oddly. The upstream's own error text never reaches a client (it can
carry part of a key) and always reaches the operator's log."""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from yarl import URL

from gateway.backends.transport import AiohttpTransport, TransportClosedError, TransportOptions
from gateway.backends.upstream import Timeouts, Upstream
from gateway.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamRateLimitedError,
)
from tests.scripted_transport import Reply, ScriptedTransport, json_reply

# What the pipeline moves on from to the next deployment (tests/test_openai_backend.py
# checks that it does).
RETRYABLE = (EngineOverloadedError, UpstreamError)
# What a hosted API says when it refuses a key: it names part of the key.
LEAKY = "Incorrect API key provided: sk-proj-AbCd************************wxyz."
UPSTREAM_LOG = "gateway.upstream"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def upstream(transport: ScriptedTransport, api_key: str | None = "sk-test-key") -> Upstream:
    return Upstream(
        "hosted",
        "http://upstream.test/v1",
        timeouts=Timeouts(1.0, 5.0),
        api_key=api_key,
        transport=transport,
    )


def error_reply(status: int, message: str = LEAKY, **headers: str) -> Reply:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return json_reply(body, status, {k.replace("_", "-"): v for k, v in headers.items()})


async def answer_error(reply: Reply | BaseException) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await upstream(ScriptedTransport(reply)).answer("/chat/completions", b"{}")
    return caught.value


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


# ---------------------------------------------------------------- statuses


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_is_the_operators_fault_a_502_for_the_client(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=UPSTREAM_LOG):
        error = await answer_error(error_reply(status))
    assert isinstance(error, UpstreamError) and error.status_code == 502
    assert "hosted" in error.message and str(status) in error.message
    assert "sk-" not in error.message and "Incorrect" not in error.message
    # Retryable: another deployment (another key) may serve the request.
    assert isinstance(error, RETRYABLE)
    logged = [r for r in caplog.records if r.name == UPSTREAM_LOG]
    assert logged and logged[-1].levelno == logging.ERROR
    assert "sk-proj-AbCd" in logged[-1].getMessage() and "api_key_env" in logged[-1].getMessage()


@pytest.mark.anyio
async def test_a_429_is_retryable_and_carries_retry_after() -> None:
    error = await answer_error(error_reply(429, "Rate limit reached for requests", retry_after="7"))
    assert isinstance(error, UpstreamRateLimitedError) and isinstance(error, RETRYABLE)
    assert isinstance(error, EngineOverloadedError)
    assert error.status_code == 503 and error.code == "upstream_rate_limited"
    assert error.headers == {"Retry-After": "7"}
    assert "Rate limit reached" not in error.message and "429" in error.message


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, "2"),  # OpenAI's own header, in milliseconds
        ({"retry-after-ms": "1500", "retry-after": "9"}, "2"),
        ({"retry-after": "0.2"}, "1"),  # at least a second
        ({"retry-after": "3.5"}, "4"),
        ({"retry-after": "-5"}, "1"),
        ({"retry-after": "soon"}, "1"),
        ({"retry-after": "nan"}, "1"),
        ({"retry-after": "inf"}, "1"),
        ({"retry-after": "99999999"}, "3600"),  # bounded
        ({}, "1"),
    ],
)
async def test_retry_after_is_read_in_every_form(headers: dict[str, str], seconds: str) -> None:
    error = await answer_error(json_reply({"error": {"message": "slow down"}}, 429, headers))
    assert error.headers["Retry-After"] == seconds


@pytest.mark.anyio
async def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    error = await answer_error(json_reply({"error": {"message": "x"}}, 429, {"Retry-After": when}))
    assert 28 <= int(error.headers["Retry-After"]) <= 31


@pytest.mark.anyio
async def test_a_503_is_an_overloaded_engine_with_its_retry_after() -> None:
    error = await answer_error(error_reply(503, "queue full", retry_after="2"))
    assert type(error) is EngineOverloadedError and error.headers == {"Retry-After": "2"}
    assert "queue full" not in error.message


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 504, 529])
async def test_a_server_error_is_a_502_without_its_text(status: int) -> None:
    error = await answer_error(error_reply(status, "Traceback: at db-7.internal:5432"))
    assert type(error) is UpstreamError and error.status_code == 502
    assert "internal" not in error.message and str(status) in error.message


@pytest.mark.anyio
async def test_a_bad_request_keeps_a_field_path_param_but_not_the_text() -> None:
    body = {"error": {"message": f"bad value; {LEAKY}", "param": "messages[0].content"}}
    error = await answer_error(json_reply(body, 400))
    assert type(error) is InvalidRequestError and error.status_code == 400
    assert error.param == "messages[0].content"
    assert "sk-" not in error.message and "rejected the request" in error.message


@pytest.mark.anyio
async def test_a_param_that_is_not_a_field_path_is_dropped() -> None:
    body = {"error": {"message": "no", "param": "sk-proj-AbCd wxyz, see https://x.example"}}
    error = await answer_error(json_reply(body, 422))
    assert type(error) is InvalidRequestError and error.param is None


@pytest.mark.anyio
async def test_a_context_length_error_keeps_its_class() -> None:
    body = {"error": {"message": "too long", "code": "context_length_exceeded", "param": None}}
    error = await answer_error(json_reply(body, 400))
    assert type(error) is ContextLengthExceededError and error.param == "messages"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, NotFoundError), (413, PayloadTooLargeError), (409, InvalidRequestError)],
)
async def test_other_client_errors(status: int, kind: type[GatewayError]) -> None:
    error = await answer_error(error_reply(status))
    assert type(error) is kind and "sk-" not in error.message and str(status) in error.message


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway sk-proj-AbCd</body></html>",
        b'{"error": "' + LEAKY.encode() + b'"}',
        b'{"detail": "' + LEAKY.encode() + b'"}',
        b"",
    ],
    ids=["html", "error-string", "fastapi-detail", "empty"],
)
async def test_any_error_body_stays_out_of_the_message(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=UPSTREAM_LOG):
        error = await answer_error(Reply(401, [body]))
    assert "sk-" not in error.message and error.status_code == 502
    if body:
        assert "sk-proj-AbCd" in caplog.text


@pytest.mark.anyio
async def test_admin_calls_keep_the_upstreams_message_for_their_callers() -> None:
    # Adapter loads read the engine's own words ("already loaded"); they are
    # the gateway's calls to its own engines, not a client's answer.
    transport = ScriptedTransport(error_reply(400, "adapter already taken"))
    with pytest.raises(InvalidRequestError) as caught:
        await upstream(transport).post("/load_lora_adapter", b"{}")
    assert "already taken" in caught.value.message


# ------------------------------------------------------------ the transport


@pytest.mark.anyio
@pytest.mark.parametrize(
    "failure",
    [
        aiohttp.ClientConnectionError("connection refused"),
        aiohttp.ServerTimeoutError("read timed out"),
        TimeoutError(),
        aiohttp.ClientPayloadError("incomplete body"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_transport_failures_are_retryable_upstream_errors(failure: BaseException) -> None:
    error = await answer_error(failure)
    assert type(error) is UpstreamError and isinstance(error, RETRYABLE)
    assert "unreachable or timed out" in error.message and type(failure).__name__ in error.message


@pytest.mark.anyio
async def test_a_body_cut_while_read_is_a_transport_failure() -> None:
    error = await answer_error(Reply(200, [b'{"id": "x", "cho'], cut=aiohttp.ClientPayloadError()))
    assert type(error) is UpstreamError and "ClientPayloadError" in error.message


@pytest.mark.anyio
async def test_every_request_carries_the_key_and_is_sent_below_the_base_url() -> None:
    transport = ScriptedTransport(json_reply({"ok": True}))
    client = upstream(transport, api_key="sk-secret-42")
    assert await client.answer("/chat/completions", b'{"a": 1}') == b'{"ok":true}'
    assert transport.options is not None
    assert transport.options.headers["Authorization"] == "Bearer sk-secret-42"
    assert transport.options.headers["Content-Type"] == "application/json"
    sent = transport.sent[0]
    assert (sent.method, str(sent.url), sent.body) == (
        "POST",
        "http://upstream.test/v1/chat/completions",
        b'{"a": 1}',
    )
    assert transport.responses[0].released


def test_without_a_key_no_authorization_header_is_sent() -> None:
    transport = ScriptedTransport()
    upstream(transport, api_key=None)
    assert transport.options is not None and "Authorization" not in transport.options.headers


@pytest.mark.anyio
async def test_the_aiohttp_transport_refuses_requests_once_closed() -> None:
    transport = AiohttpTransport(TransportOptions({}, 1.0, 1.0, 4))
    await transport.aclose()
    with pytest.raises(TransportClosedError):
        await transport.send("GET", URL("http://127.0.0.1:9/v1/models"), None, None)
    client = Upstream("hosted", "http://127.0.0.1:9/v1", timeouts=Timeouts(1.0, 1.0))
    await client.aclose()
    with pytest.raises(UpstreamError, match="shut down"):
        await client.answer("/chat/completions", b"{}")


# ------------------------------------------------------------------ streams


def sse(*lines: bytes) -> list[bytes]:
    return list(lines)


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403, 429, 500])
async def test_a_stream_refused_before_its_first_byte(status: int) -> None:
    transport = ScriptedTransport(error_reply(status, retry_after="3"))
    with pytest.raises(GatewayError) as caught:
        await collect(upstream(transport).stream("/chat/completions", b"{}"))
    assert isinstance(caught.value, RETRYABLE) and "sk-" not in caught.value.message
    assert transport.responses[0].closed


@pytest.mark.anyio
async def test_a_stream_cut_mid_chunk_yields_only_whole_events_then_fails() -> None:
    pieces = sse(b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: {"n"')
    transport = ScriptedTransport(Reply(200, pieces, cut=aiohttp.ClientPayloadError("cut")))
    got: list[bytes] = []
    with pytest.raises(UpstreamError, match="unreachable or timed out"):
        async for payload in upstream(transport).stream("/chat/completions", b"{}"):
            got.append(payload)
    assert got == [b'{"n": 1}', b'{"n": 2}']
    # Dropped, not returned to the pool: the upstream sees the close.
    assert transport.responses[0].closed and not transport.responses[0].released


@pytest.mark.anyio
async def test_a_stream_that_ends_without_done_fails() -> None:
    transport = ScriptedTransport(Reply(200, sse(b'data: {"n": 1}\n\n')))
    with pytest.raises(UpstreamError, match="without \\[DONE\\]"):
        await collect(upstream(transport).stream("/chat/completions", b"{}"))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "pieces",
    [
        sse(b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'),
        sse(b'data:{"n": 1}\n\ndata:{"n": 2}\n\ndata:[DONE]'),  # no space, no final newline
        sse(b'data: {"n": 1}\r\n\r\ndata: {"n": 2}\r\n\r\ndata: [DONE]\r\n\r\n'),  # CRLF
        sse(
            b': keep-alive\n\nevent: chunk\ndata: {"n": 1}\n\nid: 7\ndata: {"n": 2}\n\n'
            b"data: [DONE]\n\n"
        ),
        [bytes([b]) for b in b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'],
        sse(b'data: {"n": 1}\n', b'\ndata: {"n"', b": 2}\n\ndata: [DO", b"NE]\n\n"),
    ],
    ids=["plain", "tight", "crlf", "comments-and-fields", "byte-by-byte", "split-anywhere"],
)
async def test_sse_framing_variants(pieces: list[bytes]) -> None:
    transport = ScriptedTransport(Reply(200, pieces))
    got = await collect(upstream(transport).stream("/chat/completions", b"{}"))
    assert got == [b'{"n": 1}', b'{"n": 2}']
    # The whole answer was read: the connection goes back to the pool.
    assert transport.responses[0].released and not transport.responses[0].closed


@pytest.mark.anyio
async def test_closing_a_stream_early_drops_the_connection() -> None:
    pieces = sse(b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n')
    transport = ScriptedTransport(Reply(200, pieces))
    chunks = upstream(transport).stream("/chat/completions", b"{}")
    assert await anext(chunks) == b'{"n": 1}'
    await chunks.aclose()  # type: ignore[attr-defined]
    assert transport.responses[0].closed
