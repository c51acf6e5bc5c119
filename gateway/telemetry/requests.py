"""The HTTP side: the request id, tracing started with the server, and the
SERVER span around a handler."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.responses import JsonAnswer
from gateway.settings import Settings
from gateway.telemetry import semconv as names
from gateway.telemetry.logs import correlate_logs
from gateway.telemetry.setup import build_tracing
from gateway.telemetry.spans import RequestSpan, Tracing

AnyRequest = Request[Any, Any, State]
Serve = Callable[[AnyRequest, str, RequestSpan | None], Awaitable[ASGIApp]]
# Backend types whose engine runs in the gateway's process.
IN_PROCESS_TYPES = frozenset({"llamacpp"})
# A client's x-request-id is kept when it is 1-200 visible ASCII characters.
MAX_REQUEST_ID = 200


def accepted_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's ``x-request-id`` if it sent a sensible one, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID and all(0x21 <= b <= 0x7E for b in value):
                return value.decode("ascii")
            break
    return new_request_id()


def new_request_id() -> str:
    """128 random bits in hex, as ``uuid.uuid4().hex`` spells them but a
    quarter of its cost (0.45 against 2 us: no ``UUID`` object; the
    version bits of a UUID mean nothing to a request id)."""
    return os.urandom(16).hex()


def start_tracing(
    settings: Settings, given: Tracing | None, stack: AsyncExitStack, instance_id: str
) -> Tracing | None:
    """The tracing the server runs with: ``given`` (tests), else what
    ``[telemetry]`` and the ``OTEL_*`` variables configure (None: off). A
    provider built here is shut down (its last spans exported) at exit,
    and log records carry the trace context meanwhile."""
    tracing = given
    if tracing is None:
        built = build_tracing(settings.telemetry, instance_id=instance_id)
        if built is None:
            return None
        tracing, provider = built
        stack.push_async_callback(asyncio.to_thread, provider.shutdown)
        trace_filter = correlate_logs()
        stack.callback(_remove_filter, trace_filter)
    types = {name: backend.type for name, backend in settings.backends.items()}
    tracing.know_backends(
        {name: names.provider_name(kind) for name, kind in types.items()},
        frozenset(name for name, kind in types.items() if kind in IN_PROCESS_TYPES),
    )
    return tracing


def _remove_filter(trace_filter: logging.Filter) -> None:
    for handler in logging.getLogger().handlers:
        handler.removeFilter(trace_filter)


async def traced_request(
    tracing: Tracing, route: str, request: AnyRequest, request_id: str, serve: Serve
) -> ASGIApp:
    """``serve`` inside the request's SERVER span (current meanwhile). A
    JSON answer ends it now; a stream when its last chunk is sent."""
    span = tracing.request(request.method, route, request.scope["headers"], request_id)
    token = span.attach()
    try:
        response = await serve(request, request_id, span)
    except GatewayError as error:
        span.finish(error.status_code, error)
        raise
    except BaseException as error:
        span.finish(500, error)
        raise
    finally:
        span.detach(token)
    if isinstance(response, JsonAnswer):
        span.finish(200)
        return response
    return _current_while_sent(span, response)


def _current_while_sent(span: RequestSpan, response: ASGIApp) -> ASGIApp:
    """A stream's response, sent with the request's span current, so what
    is logged while it flows (its failure after the first byte included)
    carries the trace ids: one attach for the whole stream rather than one
    per event (about 0.6 us an event). The response runs in the handler's
    task, as Litestar awaits it, so the token is reset where it was made."""

    async def sent_in_span(scope: Scope, receive: Receive, send: Send) -> None:
        token = span.attach()
        try:
            await response(scope, receive, send)
        finally:
            span.detach(token)

    return sent_in_span
