"""Full garbage collections only when the gateway is quiet (gateway/collector.py)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import uvicorn

from gateway.collector import NEVER, QuietCollector


@pytest.fixture
def full_collections() -> Iterator[list[int]]:
    """The generation of every collection CPython runs meanwhile."""
    seen: list[int] = []

    def told(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            seen.append(info["generation"])

    gc.callbacks.append(told)
    try:
        yield seen
    finally:
        gc.callbacks.remove(told)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_collections_wait_for_quiet_or_the_interval(full_collections: list[int]) -> None:
    in_progress = [3]
    clock = Clock()
    collector = QuietCollector(lambda: in_progress[0], max_interval=30.0, clock=clock)
    before = gc.get_threshold()
    collector.take_over()
    try:
        assert gc.get_threshold() == (before[0], before[1], NEVER)
        gc.collect(1)  # something reaches the old generation
        assert gc.get_count()[2] > 0
        clock.now += 29.0
        assert not collector.tick(), "busy and within the interval: no full collection"
        in_progress[0] = 0
        full_collections.clear()
        assert collector.tick(), "quiet: collected"
        assert 2 in full_collections
        assert not collector.tick(), "nothing new in the old generation since"
        in_progress[0] = 5
        gc.collect(1)
        clock.now += 29.9
        assert not collector.tick()
        clock.now += 0.2
        assert collector.tick(), "busy past the interval: collected anyway"
        assert collector.full_collections == 2
    finally:
        collector.give_back()
    assert gc.get_threshold() == before


def test_the_running_collector_gives_the_thresholds_back(full_collections: list[int]) -> None:
    before = gc.get_threshold()

    async def main() -> None:
        collector = QuietCollector(lambda: 0, max_interval=30.0, check_interval=0.001)
        task = asyncio.create_task(collector.run())
        await asyncio.sleep(0)
        assert gc.get_threshold()[2] == NEVER
        gc.collect(1)
        for _ in range(200):
            if collector.full_collections:
                break
            await asyncio.sleep(0.001)
        assert collector.full_collections >= 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert gc.get_threshold() == before


@pytest.mark.e2e
def test_the_server_runs_the_collector_while_it_serves() -> None:
    from gateway.cli import _Server
    from gateway.workers import listening_socket
    from tests.test_lifecycle import _runtime

    before = gc.get_threshold()

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    async def main() -> None:
        config = uvicorn.Config(app=app, lifespan="off")
        collector = QuietCollector(lambda: 0, max_interval=30.0, check_interval=0.001)
        server = _Server(config, _runtime(), collector)
        config.load()  # what uvicorn's serve() does before its startup()
        server.lifespan = config.lifespan_class(config)
        sockets = [listening_socket("127.0.0.1", 0)]
        await server.startup(sockets)
        await asyncio.sleep(0.01)
        assert gc.get_threshold()[2] == NEVER
        await server.shutdown(sockets)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert gc.get_threshold() == before


def test_collection_is_suspended_while_busy_and_back_when_quiet() -> None:
    collector = QuietCollector(lambda: 0, max_interval=30.0, suspend_at=64)
    assert (collector.busy_at, collector.quiet_at) == (64, 16)
    assert gc.isenabled()
    collector.busy()
    assert gc.isenabled(), "not before the collector has taken over"
    collector.take_over()
    try:
        collector.busy()
        collector.busy()  # told again: still one suspension
        assert not gc.isenabled()
        assert collector.suspended and collector.suspensions == 1
        collector.quiet()
        collector.quiet()
        assert gc.isenabled() and not collector.suspended
        collector.busy()
    finally:
        collector.give_back()
    assert gc.isenabled(), "given back enabled, even from suspended"
    assert not collector.suspended


def test_never_suspended_when_suspend_at_is_0() -> None:
    collector = QuietCollector(lambda: 0, max_interval=30.0)
    assert collector.busy_at == -1 and collector.quiet_at == -1


def test_the_tick_collects_the_young_generations_while_suspended(
    full_collections: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.collector.YOUNG_LIMIT", 5_000)
    collector = QuietCollector(lambda: 10, max_interval=30.0, suspend_at=8)
    collector.take_over()
    kept: list[list[int]] = []
    try:
        collector.busy()
        gc.collect(1)
        full_collections.clear()
        kept.extend([i] for i in range(1_000))
        collector.tick()
        assert collector.young_collections == 0, "below the limit: nothing collected"
        assert full_collections == [], "and CPython collected nothing either: suspended"
        kept.extend([i] for i in range(6_000))
        collector.tick()
        assert collector.young_collections == 1
        assert full_collections == [1], "the young generations, not a full collection"
        assert gc.get_count()[0] < 5_000
    finally:
        collector.give_back()
