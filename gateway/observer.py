"""Opens and closes each request's :class:`~gateway.exchange.Exchange` for
the HTTP handlers: the request metrics hear of it, the access log writes it.

A JSON answer is closed when the handler returns or fails; a stream when its
last event is sent, when it fails after its first byte (its status class is
then the error's, though the client saw 200), or when the client leaves (499).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from opentelemetry import trace

from gateway.access_log import AccessLog
from gateway.errors import GatewayError
from gateway.exchange import OPERATIONS, Exchange, error_type
from gateway.metrics import RequestMetrics
from gateway.streams import closing

T = TypeVar("T")
CLIENT_CLOSED = 499


class Observer:
    """What the HTTP handlers tell of each request: the metrics, the access log."""

    def __init__(
        self, metrics: RequestMetrics, access_log: AccessLog | None, active: bool = True
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        # False: neither metrics nor a log hear of requests, so streams are
        # not watched (one generator less per chunk).
        self.active = active

    def open(self, endpoint: str, path: str) -> Exchange:
        """A request arrived (with the span that is current, if any: the
        access log names it)."""
        self.metrics.request_started()
        exchange = Exchange("", OPERATIONS.get(endpoint, endpoint), time.monotonic(), path=path)
        if self.access_log is not None:
            note_trace(exchange)
        return exchange

    def close(self, exchange: Exchange, status: int, error: str | None) -> None:
        if exchange.closed:
            return
        exchange.closed = True
        self.metrics.request_ended(exchange, status, error)
        if self.access_log is None:
            return
        if exchange.trace_id is None:
            note_trace(exchange)
        self.access_log.record(exchange, status, error, time.monotonic())

    def failed(self, exchange: Exchange, error: BaseException) -> None:
        status = error.status_code if isinstance(error, GatewayError) else 500
        self.close(exchange, status, error_type(error))

    def watching(self, chunks: AsyncIterator[T], exchange: Exchange) -> AsyncIterator[T]:
        """``chunks`` watched (see :meth:`watched`), unless nothing listens."""
        return self.watched(chunks, exchange) if self.active else chunks

    async def watched(self, chunks: AsyncIterator[T], exchange: Exchange) -> AsyncIterator[T]:
        """The stream, closing ``exchange`` once it has ended, however it ends
        (the streams it wraps are closed first, so their accounting is in)."""
        status, error = 200, None
        try:
            async with closing(chunks):
                async for chunk in chunks:
                    yield chunk
        except GatewayError as failure:
            status, error = failure.status_code, error_type(failure)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            status, error = CLIENT_CLOSED, "client_closed_request"
            raise
        except Exception:
            status, error = 500, "_OTHER"
            raise
        finally:
            self.close(exchange, status, error)


def note_trace(exchange: Exchange) -> None:
    """The current span's ids on the exchange, if there is a span (read
    through the OpenTelemetry API: without an SDK set up, there never is)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        exchange.trace_id = format(context.trace_id, "032x")
        exchange.span_id = format(context.span_id, "016x")
