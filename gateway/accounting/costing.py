"""The prices part of the running gateway: every request priced as it ends,
the opt-in cost header, an edge node's busy-time reports, and self-hosted
nodes' busy and idle cost (on /metrics and in node_costs).

:func:`start_costing` builds it from the settings once the backends run; the
HTTP handlers call :meth:`Costing.answer_headers` for a JSON answer and
:meth:`Costing.ending` around a stream's events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.accounting.compute import (
    BUSY_HEADER,
    COST_HEADER,
    Pricer,
    busy_seconds_text,
    closing_comments,
    usd_text,
)
from gateway.accounting.db import async_url, migrate_async, open_engine
from gateway.accounting.money import to_usd
from gateway.accounting.nodes import NodeCostRecorder, NodeCosts
from gateway.accounting.prices import PriceBook
from gateway.contract import Backend
from gateway.exchange import Exchange
from gateway.observer import Observer
from gateway.settings import Settings
from gateway.sse import DONE
from gateway.streams import closing

Headers = list[tuple[bytes, bytes]]


class Costing:
    def __init__(
        self,
        book: PriceBook,
        nodes: NodeCosts | None,
        *,
        cost_header: bool,
        report_busy: bool,
        pricer: Pricer | None = None,
    ) -> None:
        self.book = book
        self.nodes = nodes
        self.pricer = pricer
        self.cost_header = cost_header
        self.report_busy = report_busy

    @property
    def ends_streams(self) -> bool:
        return self.cost_header or self.report_busy

    def answer_headers(self, exchange: Exchange) -> Headers:
        """What a JSON answer carries once its exchange is closed (priced)."""
        headers: Headers = []
        if self.cost_header:
            headers.append((COST_HEADER.encode(), usd_text(exchange.charged_nano).encode()))
        if self.report_busy:
            headers.append((BUSY_HEADER.encode(), busy_seconds_text(exchange.compute).encode()))
        return headers

    def ending(self, events: AsyncIterator[bytes], exchange: Exchange) -> AsyncIterator[bytes]:
        """A stream's SSE events, with the closing comments (busy seconds,
        cost) just before its [DONE]: its headers left before either was
        known, and an SSE stream has no trailers a browser could read."""
        if not self.ends_streams:
            return events
        return self._ended(events, exchange)

    async def _ended(
        self, events: AsyncIterator[bytes], exchange: Exchange
    ) -> AsyncIterator[bytes]:
        async with closing(events):
            async for event in events:
                if event is DONE:
                    # The chunks are over: the observer closed (priced) the exchange.
                    yield closing_comments(exchange, self.report_busy, self.cost_header)
                yield event

    def collect(self) -> Iterator[Metric]:
        """The requests' costs and the nodes' busy and idle cost, for /metrics."""
        if self.pricer is not None:
            charged = CounterMetricFamily(
                "nomoat_requests_charged_usd",
                "What requests were charged at their deployment's token prices.",
                labels=["deployment"],
            )
            for deployment, nano in sorted(self.pricer.charged_nano.items()):
                charged.add_metric([deployment], to_usd(nano))
            compute = CounterMetricFamily(
                "nomoat_requests_compute_usd",
                "Requests' shares of self-hosted nodes' price (usd_per_hour over their "
                "busy time), by backend and the deployment that answered.",
                labels=["backend", "deployment"],
            )
            for (backend, deployment), nano in sorted(self.pricer.compute_nano.items()):
                compute.add_metric([backend, deployment], to_usd(nano))
            yield from (charged, compute)
        if self.nodes is not None:
            yield from self.nodes.collect()


async def start_costing(
    settings: Settings,
    backends: Mapping[str, Backend],
    observer: Observer,
    stack: AsyncExitStack,
    engine: AsyncEngine | None = None,
) -> Costing | None:
    """Prices on (unless accounting is off), and the node cost recorder for
    the backends that have a usd_per_hour (stopped, with a last window
    written, when ``stack`` closes). ``engine``: the accounting database
    already open (the ledger's); without it, the database is opened (and
    migrated if asked) here, only if there is such a backend."""
    accounting = settings.accounting
    if not accounting.enabled:
        return (
            Costing(PriceBook(), None, cost_header=False, report_busy=True)
            if accounting.report_busy_seconds
            else None
        )
    book = PriceBook.from_settings(settings)
    pricer = observer.pricer = Pricer(book)
    # Streams must be watched for their exchange to close (and be priced).
    observer.active = True
    nodes: NodeCosts | None = NodeCosts(backends, book)
    if nodes is not None and nodes.tracked:
        if engine is None:
            url = async_url(accounting.database)
            if accounting.migrate_on_start:
                await migrate_async(url)
            engine = open_engine(url)
            stack.push_async_callback(engine.dispose)
        recorder = NodeCostRecorder(nodes, engine, accounting.node_cost_window_seconds)
        recorder.start()
        stack.push_async_callback(recorder.aclose)
    else:
        nodes = None
    return Costing(
        book,
        nodes,
        cost_header=accounting.cost_header,
        report_busy=accounting.report_busy_seconds,
        pricer=pricer,
    )
