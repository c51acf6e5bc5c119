"""The response of a relayed stream (:mod:`gateway.relay`), as a plain ASGI
application: each network read's events go from the upstream's generator
straight to the ASGI ``send``.

A typed stream reaches the client through a chain of async iterators (the
request span's watch, the observer's, :func:`gateway.sse.sse_events`, the
span made current), each resumed on every chunk. What they do happens once a
stream here, not once a chunk: the request's span is current for the whole
response (log records written meanwhile carry its ids), and when the stream
ends the relay's listeners (the stats, the exchange, the attempt's span),
the request's span and the observer hear how, in that order, as they do for a
typed stream. The client's bytes are the same: a failure after the first
byte is the last event (no ``[DONE]``); the last event and the end of the
body leave in one ``send``.
"""

from __future__ import annotations

import asyncio
import logging

from litestar.types import Receive, Scope, Send

from gateway.backends.relay_stream import RelayStream
from gateway.chunk_write import chunk_writer
from gateway.errors import GatewayError, InternalError
from gateway.exchange import Exchange, error_type
from gateway.observer import CLIENT_CLOSED, Observer
from gateway.relay import Relayed
from gateway.responses import SSE_HEADERS, HangUp, Headers
from gateway.sse import DONE, event
from gateway.telemetry.spans import RequestSpan

_log = logging.getLogger(__name__)


class RelayedEvents:
    """Sends a :class:`~gateway.relay.Relayed` stream; a client that
    disconnects cancels it (the upstream's connection is dropped)."""

    __slots__ = ("_exchange", "_headers", "_observer", "_span", "_stream")

    def __init__(
        self,
        stream: Relayed,
        headers: Headers,
        observer: Observer,
        exchange: Exchange,
        span: RequestSpan | None,
    ) -> None:
        self._stream = stream
        self._headers = [*SSE_HEADERS, *headers]
        self._observer = observer
        self._exchange = exchange
        self._span = span

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self._stream
        span = self._span
        token = span.attach() if span is not None else None
        hang_up: HangUp | None = None
        status, error = 200, None
        failure: Exception | None = None
        try:
            first = stream.first or b""
            stream.first = None
            # The connection's writer, if the server offers one (no ASGI
            # message per read: gateway.chunk_write); send when it declines.
            writer = chunk_writer(scope)
            if writer is None or not writer.start(200, self._headers, first):
                await send({"type": "http.response.start", "status": 200, "headers": self._headers})
                await send({"type": "http.response.body", "body": first, "more_body": True})
            # Watched from the first event on (before it, the handler's own
            # watch stopped the work of a client that left).
            hang_up = HangUp(receive, scope)
            rest = stream.rest
            last = DONE
            try:
                # The own client's stream sends each read's events itself,
                # from the upstream connection's callback (no task wake-up
                # per chunk); any other is awaited read by read.
                pumped = rest.pump(send, writer) if isinstance(rest, RelayStream) else None
                if pumped is not None:
                    last = await pumped + DONE
                else:
                    while True:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": await anext(rest),
                                "more_body": True,
                            }
                        )
            except StopAsyncIteration:
                pass
            except GatewayError as gateway_error:
                failure, status = gateway_error, gateway_error.status_code
                last = event(gateway_error.body())
            except Exception as other:
                _log.exception("stream failed after its first byte")
                failure, status = other, 500
                last = event(InternalError("The stream failed; the answer is incomplete.").body())
            if failure is not None:
                error = error_type(failure)
            await send({"type": "http.response.body", "body": last, "more_body": False})
        except asyncio.CancelledError:
            status, error = CLIENT_CLOSED, "client_closed_request"
            if hang_up is None or not hang_up.absorb():
                raise
        finally:
            if hang_up is not None:
                hang_up.close()
            try:
                await stream.aclose(failure)
            finally:
                if span is not None:
                    # The status line (200) went out with the first event.
                    span.finish(200, failure)
                    span.detach(token)
                self._observer.close(self._exchange, status, error)
