"""Self-hosted nodes' cost over time: busy (charged to requests) and idle.

Each backend that has a ``usd_per_hour`` and knows its busy time
(:class:`~gateway.contract.BusyClock`) is followed from the moment the
gateway starts: its price over the elapsed time is split into the busy part
(what the requests it served were charged, through their compute share) and
the idle rest, never charged to anyone. /metrics shows the running totals;
``node_costs`` gets one row per backend per window
(``[accounting] node_cost_window_seconds``) and a last one at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.accounting.compute import NodeWindow, nano_for
from gateway.accounting.prices import PriceBook
from gateway.accounting.tables import node_costs
from gateway.contract import Backend, BusyClock

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Node:
    name: str
    clock: BusyClock
    usd_per_hour: float
    # Where tracking began (monotonic and wall), and the busy total then.
    began: float
    began_wall: float
    busy_at_start: float
    # Where the last window ended.
    window_from: float
    window_from_wall: float
    window_busy: float


@dataclass(frozen=True, slots=True)
class NodeTotal:
    """One node since tracking began."""

    backend: str
    usd_per_hour: float
    elapsed_seconds: float
    busy_seconds: float

    @property
    def idle_seconds(self) -> float:
        return max(self.elapsed_seconds - self.busy_seconds, 0.0)


class NodeCosts:
    """The priced, self-timed backends of one gateway, followed over time."""

    def __init__(self, backends: Mapping[str, Backend], book: PriceBook) -> None:
        now, wall = time.monotonic(), time.time()
        self._nodes: list[_Node] = []
        for name, backend in sorted(backends.items()):
            rate = book.usd_per_hour(name)
            if rate is None or not isinstance(backend, BusyClock):
                continue
            busy = backend.busy_seconds()
            self._nodes.append(_Node(name, backend, rate, now, wall, busy, now, wall, busy))

    @property
    def tracked(self) -> bool:
        return bool(self._nodes)

    def totals(self) -> list[NodeTotal]:
        now = time.monotonic()
        return [
            NodeTotal(
                node.name,
                node.usd_per_hour,
                now - node.began,
                node.clock.busy_seconds() - node.busy_at_start,
            )
            for node in self._nodes
        ]

    def window(self) -> list[NodeWindow]:
        """Each node's cost since the last window (or the start); the next
        window starts now."""
        now, wall = time.monotonic(), time.time()
        windows = []
        for node in self._nodes:
            busy_total = node.clock.busy_seconds()
            busy = busy_total - node.window_busy
            elapsed = now - node.window_from
            windows.append(
                NodeWindow(
                    node.name,
                    node.window_from_wall,
                    wall,
                    busy,
                    nano_for(busy, node.usd_per_hour),
                    nano_for(max(elapsed - busy, 0.0), node.usd_per_hour),
                )
            )
            node.window_from, node.window_from_wall, node.window_busy = now, wall, busy_total
        return windows

    def collect(self) -> Iterator[Metric]:
        """The running totals, as /metrics families."""
        busy = CounterMetricFamily(
            "nomoat_node_busy_seconds",
            "Seconds a self-hosted node (a backend with usd_per_hour) spent working, "
            "since the gateway started.",
            labels=["backend"],
        )
        elapsed = CounterMetricFamily(
            "nomoat_node_tracked_seconds",
            "Seconds a self-hosted node has been followed (since the gateway started).",
            labels=["backend"],
        )
        cost = CounterMetricFamily(
            "nomoat_node_cost_usd",
            "A self-hosted node's price over its tracked time: state busy is charged to "
            "requests (their compute cost), idle to nobody.",
            labels=["backend", "state"],
        )
        price = GaugeMetricFamily(
            "nomoat_node_price_usd_per_hour",
            "A self-hosted node's configured price (usd_per_hour).",
            labels=["backend"],
        )
        for total in self.totals():
            name = total.backend
            busy.add_metric([name], total.busy_seconds)
            elapsed.add_metric([name], total.elapsed_seconds)
            rate = total.usd_per_hour / 3600
            cost.add_metric([name, "busy"], total.busy_seconds * rate)
            cost.add_metric([name, "idle"], total.idle_seconds * rate)
            price.add_metric([name], total.usd_per_hour)
        yield from (busy, elapsed, cost, price)


async def record(engine: AsyncEngine, windows: list[NodeWindow]) -> None:
    """Write ``windows`` as node_costs rows."""
    if not windows:
        return
    rows = [
        {
            "backend": w.backend,
            "started_at": datetime.fromtimestamp(w.started_at, UTC),
            "ended_at": datetime.fromtimestamp(w.ended_at, UTC),
            "busy_seconds": w.busy_seconds,
            "busy_nano": w.busy_nano,
            "idle_nano": w.idle_nano,
        }
        for w in windows
    ]
    async with engine.begin() as connection:
        await connection.execute(node_costs.insert(), rows)


class NodeCostRecorder:
    """Writes a window of every node every ``interval`` seconds, and a last
    one when stopped. A window that cannot be written (the database is
    unreachable) is logged and dropped: the next one starts where it ended,
    so /metrics keeps the totals, the table lacks that window's rows."""

    def __init__(self, nodes: NodeCosts, engine: AsyncEngine, interval: float) -> None:
        self.nodes = nodes
        self._engine = engine
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="node-costs")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        try:
            await record(self._engine, self.nodes.window())
        except Exception:
            _log.exception("could not write node costs")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
