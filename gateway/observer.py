"""Opens and closes each request's :class:`~gateway.exchange.Exchange` for
the HTTP handlers: the request metrics hear of it, the access log writes it.

A JSON answer is closed when the handler returns or fails; a stream when its
last event is sent, when it fails after its first byte (its status class is
then the error's, though the client saw 200), or when the client leaves (499).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from opentelemetry import trace

from gateway.access_log import AccessLog
from gateway.errors import GatewayError
from gateway.exchange import OPERATIONS, Exchange, error_type
from gateway.metrics import NoMetrics, RequestMetrics
from gateway.streams import closing

T = TypeVar("T")
CLIENT_CLOSED = 499
# The longest a request without a usage of its own waits, once it has ended,
# for the exact usage an engine promised (UsageReport): a cancelled generation
# stops within one batch step. Past it, the estimate is recorded.
REPORT_WAIT_SECONDS = 5.0
# Told once of each closed exchange, with its status and error type (the
# accounting's ledger: gateway/accounting/runtime.py).
Ended = Callable[[Exchange, int, "str | None"], None]


class Observer:
    """What the HTTP handlers tell of each request: the metrics, the access log."""

    def __init__(
        self,
        metrics: RequestMetrics,
        access_log: AccessLog | None,
        active: bool = True,
        ended: Ended | None = None,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.ended = ended
        # False: neither metrics nor a log nor the ledger hear of requests,
        # so streams are not watched (one generator less per chunk).
        self.active = active or ended is not None
        # Prices each exchange as it closes, before anything reads it
        # (gateway/accounting/compute.py); None: accounting is off.
        self.pricer: Callable[[Exchange], None] | None = None
        # Closed exchanges waiting for an engine's usage report, each with
        # the call that records it (see close).
        self._awaiting: dict[int, Callable[[], None]] = {}
        self.report_wait_seconds = REPORT_WAIT_SECONDS

    def open(self, endpoint: str, path: str) -> Exchange:
        """A request arrived (with the span that is current, if any: the
        access log names it)."""
        self.metrics.request_started()
        exchange = Exchange("", OPERATIONS.get(endpoint, endpoint), time.monotonic(), path=path)
        if self.access_log is not None or self.ended is not None:
            note_trace(exchange)
        return exchange

    def close(self, exchange: Exchange, status: int, error: str | None) -> None:
        """The request ended. If it has no usage of its own and a backend
        promised its exact usage (a cut stream: the engine is still stopping
        the generation on its thread), it is recorded when that usage comes
        or after ``report_wait_seconds``, whichever is first: nothing here
        blocks the event loop."""
        if exchange.closed:
            return
        exchange.closed = True
        if exchange.usage is None and exchange.reported.pending:
            self._await_report(exchange, status, error)
            return
        self._record(exchange, status, error)

    def _await_report(self, exchange: Exchange, status: int, error: str | None) -> None:
        def record() -> None:
            if self._awaiting.pop(id(exchange), None) is None:
                return  # recorded already (the report, the timer or shutdown)
            timer.cancel()
            self._record(exchange, status, error)

        timer = asyncio.get_running_loop().call_later(self.report_wait_seconds, record)
        self._awaiting[id(exchange)] = record
        exchange.reported.when_delivered(record)

    def record_awaiting(self) -> None:
        """Record now the requests still waiting for a usage report (at
        shutdown, after the backends stopped and before the ledger's last
        flush): no record is lost for a report that never came."""
        for record in list(self._awaiting.values()):
            record()

    def _record(self, exchange: Exchange, status: int, error: str | None) -> None:
        if exchange.usage is None and exchange.reported.usage is not None:
            # The engine's exact counts, in preference to the estimate.
            exchange.usage = exchange.reported.usage
        if self.pricer is not None:
            self.pricer(exchange)
        if exchange.finish is not None:
            exchange.finish(exchange)
        self.metrics.request_ended(exchange, status, error)
        if self.ended is not None:
            self.ended(exchange, status, error)
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


class Unobserved(Observer):
    """Request metrics and the access log both off: nothing hears of
    requests, so nothing is recorded (as :class:`~gateway.metrics.NoMetrics`).

    Every request gets the same scratch exchange: the pipeline still writes
    where a request went into it (a few attribute stores, cheaper than
    asking each time whether anyone listens), and nothing reads it."""

    def __init__(self) -> None:
        super().__init__(NoMetrics(), None, active=False)
        self._scratch = Exchange("", "", 0.0)

    def open(self, endpoint: str, path: str) -> Exchange:
        return self._scratch

    def close(self, exchange: Exchange, status: int, error: str | None) -> None:
        return

    def failed(self, exchange: Exchange, error: BaseException) -> None:
        return

    def watching(self, chunks: AsyncIterator[T], exchange: Exchange) -> AsyncIterator[T]:
        return chunks


def observing(
    metrics: RequestMetrics,
    access_log: AccessLog | None,
    listening: bool,
    ended: Ended | None = None,
) -> Observer:
    """The observer for the request metrics, the access log and the ledger
    (``ended``); a no-op one when none is on (``listening`` False and no
    ledger)."""
    if not listening and ended is None:
        return Unobserved()
    return Observer(metrics, access_log, listening, ended)


def note_trace(exchange: Exchange) -> None:
    """The current span's ids on the exchange, if there is a span (read
    through the OpenTelemetry API: without an SDK set up, there never is)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        exchange.trace_id = format(context.trace_id, "032x")
        exchange.span_id = format(context.span_id, "016x")
