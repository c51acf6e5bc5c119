"""What self-hosted compute costs: a node's ``usd_per_hour`` split among the
requests it served by their share of its busy time, the rest reported as
idle cost (docs/accounting.md has the method and its error).

A request's busy seconds reach its :class:`~gateway.contract.ComputeMeter`
from the backend that served it: the embedded engine measures each batch
step and shares it among the sequences in it by the tokens each fed; an
edge node measures the same on its own engine and reports each request's
share with the answer; any other HTTP backend with a price (vLLM) is timed
from the gateway by :class:`SharedClock`. When the request ends,
:class:`Pricer` turns those seconds, and its tokens, into nano-USD on its
:class:`~gateway.exchange.Exchange`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.accounting.money import NANO_PER_USD
from gateway.accounting.prices import PriceBook
from gateway.contract import ComputeMeter
from gateway.exchange import Exchange

SECONDS_PER_HOUR = 3600
# How an edge node reports a request's busy seconds to the gateway: a header
# on a JSON answer, an SSE comment line (": name=value") just before a
# stream's [DONE]. Comments are ignored by every SSE reader (browsers, SDKs).
BUSY_HEADER = "x-nomoat-busy-seconds"
BUSY_COMMENT = b"nomoat-busy-seconds="
# The opt-in cost of a request (accounting.cost_header): a header on a JSON
# answer, a comment line (": x-nomoat-cost-usd=0.000012345") before a
# stream's [DONE], since a stream's headers leave before its cost is known.
COST_HEADER = "x-nomoat-cost-usd"
COST_COMMENT = b"x-nomoat-cost-usd="


def usd_text(nano: int) -> str:
    """nano-USD as an exact decimal USD string ("0.000012345")."""
    return f"{nano // NANO_PER_USD}.{nano % NANO_PER_USD:09d}"


def busy_seconds_text(meter: ComputeMeter) -> str:
    return f"{sum(meter.seconds.values()):.6f}"


def busy_of_comment(comment: bytes) -> float | None:
    """The busy seconds in an SSE comment's text, if it is an edge node's report."""
    if not comment.startswith(BUSY_COMMENT):
        return None
    return reported_busy(comment[len(BUSY_COMMENT) :].decode("latin-1"))


def reported_busy(text: str | None) -> float | None:
    """The busy seconds in an edge node's header value."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds != float("inf") else None


def closing_comments(exchange: Exchange, busy: bool, cost: bool) -> bytes:
    """The SSE comment lines that end a stream before its [DONE]: the busy
    seconds (an edge node) and the cost (cost_header)."""
    lines = b""
    if busy:
        lines += b": " + BUSY_COMMENT + busy_seconds_text(exchange.compute).encode() + b"\n"
    if cost:
        lines += b": " + COST_COMMENT + usd_text(exchange.charged_nano).encode() + b"\n"
    return lines + b"\n" if lines else b""


def nano_for(seconds: float, usd_per_hour: float) -> int:
    """``seconds`` of a node at ``usd_per_hour``, in nano-USD (rounded)."""
    return round(seconds * usd_per_hour * NANO_PER_USD / SECONDS_PER_HOUR)


def compute_nano(
    meter: ComputeMeter,
    book: PriceBook,
    totals: dict[tuple[str, str], int] | None = None,
    deployment: str = "",
) -> int:
    """A request's share of its nodes' price: its busy seconds on each
    backend that has a price per hour, at that price (added to ``totals``
    too, if given, by (backend, the deployment that answered))."""
    total = 0
    for backend, seconds in meter.seconds.items():
        rate = book.usd_per_hour(backend)
        if rate is not None:
            share = nano_for(seconds, rate)
            total += share
            if totals is not None:
                key = (backend, deployment)
                totals[key] = totals.get(key, 0) + share
    return total


class Pricer:
    """Prices an exchange when its request ends (the observer calls it
    before the metrics, the access log and the ledger hear of it), and keeps
    the running totals /metrics shows: charged per deployment, compute per
    backend (beside each node's busy and idle cost)."""

    def __init__(self, book: PriceBook) -> None:
        self.book = book
        self.charged_nano: dict[str, int] = {}
        self.compute_nano: dict[tuple[str, str], int] = {}

    def __call__(self, exchange: Exchange) -> None:
        if exchange.deployment:
            charged = self.book.charge_nano(
                exchange.deployment, exchange.usage, exchange.estimated_output_tokens
            )
            exchange.charged_nano = charged
            if charged:
                deployment = exchange.deployment
                self.charged_nano[deployment] = self.charged_nano.get(deployment, 0) + charged
        if exchange.compute.seconds:
            exchange.compute_nano = compute_nano(
                exchange.compute, self.book, self.compute_nano, exchange.deployment
            )


class SharedClock:
    """A node's busy time as the gateway sees it, for an HTTP engine that
    does not report each request's share (vLLM): the node counts as busy
    while at least one request of this gateway is in flight on it, and each
    moment's time is shared equally among the requests in flight then
    (processor sharing). O(1) per request: a "virtual time" advances by
    ``dt / n`` while ``n`` are in flight, and a request's share is how far
    it advanced between its start and its end."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._last = time.monotonic()
        self._virtual = 0.0
        self._busy = 0.0

    def _advance(self) -> None:
        now = time.monotonic()
        if self._in_flight:
            elapsed = now - self._last
            self._busy += elapsed
            self._virtual += elapsed / self._in_flight
        self._last = now

    def enter(self) -> float:
        """A request starts; returns its ticket for :meth:`leave`."""
        self._advance()
        self._in_flight += 1
        return self._virtual

    def leave(self, ticket: float) -> float:
        """The request of ``ticket`` ended: its share, in seconds."""
        self._advance()
        self._in_flight -= 1
        return self._virtual - ticket

    def busy_seconds(self) -> float:
        self._advance()
        return self._busy


@dataclass(frozen=True, slots=True)
class NodeWindow:
    """One backend's cost over a window of its clock: a node_costs row."""

    backend: str
    started_at: float  # time.time() instants
    ended_at: float
    busy_seconds: float
    busy_nano: int
    idle_nano: int
