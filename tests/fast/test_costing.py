"""Pricing as requests end (fast layer): the exchange's charge, the opt-in
cost header on JSON answers and closing comment on streams, the shared
clock of HTTP engines, the busy-time reports of edge nodes, and the node
cost windows (busy plus idle is the price of the elapsed time)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import wire
from gateway.accounting import compute as compute_module
from gateway.accounting import nodes as nodes_module
from gateway.accounting.compute import (
    Pricer,
    SharedClock,
    busy_of_comment,
    closing_comments,
    reported_busy,
    usd_text,
)
from gateway.accounting.nodes import NodeCosts
from gateway.accounting.prices import PriceBook, TokenPrices
from gateway.contract import Target
from gateway.exchange import Exchange

from .conftest import Start
from .support import chat_body, pool

PRICED = '{ backend = "a", input_usd_per_million = 0.15, output_usd_per_million = 0.6 }'


def priced(cost_header: bool) -> str:
    config = pool("a").replace('{ backend = "a" }', PRICED)
    return config + f"\n[accounting]\ncost_header = {str(cost_header).lower()}\n"


def charge(usage: dict[str, Any]) -> str:
    return usd_text(usage["prompt_tokens"] * 150 + usage["completion_tokens"] * 600)


@pytest.mark.anyio
async def test_a_json_answer_carries_its_charge_when_asked(start: Start) -> None:
    async with start(priced(True)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(max_tokens=5))
        assert response.status_code == 200
        assert response.headers["x-nomoat-cost-usd"] == charge(response.json()["usage"])
    async with start(priced(False)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(max_tokens=5))
        assert "x-nomoat-cost-usd" not in response.headers


@pytest.mark.anyio
async def test_a_stream_ends_with_its_charge_in_a_comment_before_done(start: Start) -> None:
    body = chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True})
    async with start(priced(True)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=body)
        events = response.content.split(b"\n\n")
        assert events[-1] == b"" and events[-2] == b"data: [DONE]"
        usage = json.loads(events[-4][len(b"data: ") :])["usage"]
        assert events[-3] == b": x-nomoat-cost-usd=" + charge(usage).encode()
    async with start(priced(False)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=body)
        assert b"x-nomoat-cost-usd" not in response.content


def exchange_on(deployment: str, backend: str) -> Exchange:
    exchange = Exchange("r", "chat", 0.0)
    exchange.answered_by(Target("m", "m", deployment), backend)
    return exchange


def test_the_pricer_fills_the_exchange_and_its_totals() -> None:
    book = PriceBook({"m/0": TokenPrices.of_usd(1.0, 2.0)}, {}, {"node": 3.6})
    pricer = Pricer(book)
    exchange = exchange_on("m/0", "node")
    exchange.usage = wire.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    exchange.compute.add("node", 2.0)
    exchange.compute.add("unpriced", 5.0)
    pricer(exchange)
    assert exchange.charged_nano == 10 * 1000 + 5 * 2000
    # 2 s at 3.6 USD an hour: 2 millidollars; the unpriced backend costs nothing.
    assert exchange.compute_nano == 2_000_000
    assert pricer.charged_nano == {"m/0": 20_000}
    assert pricer.compute_nano == {("node", "m/0"): 2_000_000}
    # A stream cut before its usage: the counted output tokens.
    cut = exchange_on("m/0", "node")
    cut.estimated_output_tokens = 3
    pricer(cut)
    assert cut.charged_nano == 3 * 2000 and cut.compute_nano == 0


def test_money_and_reports_are_spelled_exactly() -> None:
    assert usd_text(12_345) == "0.000012345"
    assert usd_text(3 * 10**9 + 7) == "3.000000007"
    assert reported_busy("0.25") == 0.25
    for bad in (None, "", "x", "-1", "nan", "inf"):
        assert reported_busy(bad) is None
    assert busy_of_comment(b"nomoat-busy-seconds=1.5") == 1.5
    assert busy_of_comment(b"1.5") is None  # any other comment is not a report
    exchange = exchange_on("m/0", "node")
    exchange.compute.add("engine", 0.5)
    exchange.charged_nano = 42
    assert closing_comments(exchange, busy=True, cost=True) == (
        b": nomoat-busy-seconds=0.500000\n: x-nomoat-cost-usd=0.000000042\n\n"
    )
    assert closing_comments(exchange, busy=False, cost=False) == b""


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000 + self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTime]:
    fake = FakeTime()
    monkeypatch.setattr(compute_module, "time", fake)
    monkeypatch.setattr(nodes_module, "time", fake)
    yield fake


def test_the_shared_clock_splits_each_moment_among_the_requests_in_flight(
    clock: FakeTime,
) -> None:
    shared = SharedClock()
    a = shared.enter()
    clock.now += 1
    b = shared.enter()
    clock.now += 2
    assert shared.leave(a) == pytest.approx(1 + 2 / 2)
    clock.now += 1
    assert shared.leave(b) == pytest.approx(2 / 2 + 1)
    clock.now += 5  # idle: nobody pays, and it is not busy
    c = shared.enter()
    clock.now += 1
    assert shared.leave(c) == pytest.approx(1)
    assert shared.busy_seconds() == pytest.approx(5)


class Node:
    """A backend that knows its busy time (a BusyClock)."""

    def __init__(self) -> None:
        self.busy = 0.0

    def busy_seconds(self) -> float:
        return self.busy


def test_node_windows_split_the_price_into_busy_and_idle(clock: FakeTime) -> None:
    node = Node()
    node.busy = 7.0  # before tracking began: not counted
    book = PriceBook({}, {}, {"gpu": 3.6, "unclocked": 1.0})
    costs = NodeCosts({"gpu": node, "cpu": Node(), "unclocked": object()}, book)  # type: ignore[dict-item]
    assert costs.tracked
    clock.now += 10
    node.busy += 4
    (window,) = costs.window()
    assert (window.backend, window.busy_seconds) == ("gpu", pytest.approx(4))
    assert window.ended_at - window.started_at == pytest.approx(10)
    # 3.6 USD an hour is a millidollar a second: 4 busy, 6 idle.
    assert (window.busy_nano, window.idle_nano) == (4_000_000, 6_000_000)
    clock.now += 5
    (second,) = costs.window()
    assert second.started_at == window.ended_at
    assert (second.busy_nano, second.idle_nano) == (0, 5_000_000)
    (total,) = costs.totals()
    assert (total.elapsed_seconds, total.busy_seconds) == (pytest.approx(15), pytest.approx(4))
    families = {family.name: family for family in costs.collect()}
    cost = {tuple(s.labels.values()): s.value for s in families["nomoat_node_cost_usd"].samples}
    assert cost == {("gpu", "busy"): pytest.approx(0.004), ("gpu", "idle"): pytest.approx(0.011)}


def test_nothing_is_tracked_without_a_price_and_a_clock() -> None:
    book = PriceBook({}, {}, {})
    assert not NodeCosts({"gpu": Node()}, book).tracked  # type: ignore[dict-item]
