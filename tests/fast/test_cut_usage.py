"""A stream the client cuts is recorded with the usage the engine reports,
even though the engine reports it after the stream has ended.

The embedded engine stops a cancelled generation on its worker thread, a
batch step after the client left; only then does it know the prompt tokens
it evaluated and the tokens it generated (``RequestContext.usage_report``).
The exchange is priced and recorded once that report comes (or after a
bounded wait, with the estimate), never before, and without blocking the
event loop. Here the test plays the engine: the fake backend's call holds
the request's report, and the test delivers it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import wire
from gateway.accounting.money import to_nano
from gateway.exchange import Exchange
from gateway.metrics import NoMetrics
from gateway.observer import Observer
from gateway.testing import FakeCall, Script
from gateway.testing.inprocess import InProcessGateway

from .conftest import Start
from .support import chat_body, pool
from .test_ledger import SERVER, rows

pytestmark = pytest.mark.anyio

# The deployment's prices: the row's cost must follow the reported usage.
INPUT_USD, OUTPUT_USD = 2.0, 8.0
PRICED = [
    {"backend": "a", "input_usd_per_million": INPUT_USD, "output_usd_per_million": OUTPUT_USD}
]
SPENT = wire.Usage(
    prompt_tokens=41,
    completion_tokens=17,
    total_tokens=58,
    prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=0),
)


def recorded(gw: InProcessGateway) -> int:
    accounting = gw.runtime.accounting
    assert accounting is not None
    return accounting.ledger.pending + accounting.ledger.written


async def cut_stream(gw: InProcessGateway) -> FakeCall:
    """A stream the client leaves after its first event; the backend
    promised its exact usage when it started (as the engine does)."""
    gw.backend("a").script(Script(stall_after=2))
    async with gw.http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
        [call] = await gw.backend("a").wait_for_calls(1)
        assert call.ctx.usage_report is not None
        call.ctx.usage_report.expect()
        assert (await anext(r.aiter_lines())).startswith("data: {")
    assert await call.wait_ended(within=2) in ("cancelled", "closed")
    return call


async def test_a_cut_stream_is_recorded_with_the_usage_reported_after_it_ended(
    start: Start,
) -> None:
    async with start(pool("a", server=SERVER, deployments=PRICED)) as gw:
        call = await cut_stream(gw)
        # The stream is over; the engine has not reported yet: nothing is
        # recorded (nor priced, nor settled) with a guess.
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert recorded(gw) == 0
        report = call.ctx.usage_report
        assert report is not None
        report.deliver(SPENT)
        [row] = await rows(gw)
    assert row["status"] == 499
    assert (row["prompt_tokens"], row["completion_tokens"]) == (41, 17)
    assert row["cost_nano"] == to_nano((41 * INPUT_USD + 17 * OUTPUT_USD) / 1e6)


async def test_a_report_that_never_comes_leaves_the_estimate_after_a_bounded_wait(
    start: Start,
) -> None:
    async with start(pool("a", server=SERVER)) as gw:
        gw.runtime.observer.report_wait_seconds = 0.05
        await cut_stream(gw)
        for _ in range(100):
            if recorded(gw):
                break
            await asyncio.sleep(0.01)
        [row] = await rows(gw)
    assert row["status"] == 499 and row["prompt_tokens"] == 0
    assert row["completion_tokens"] >= 1  # the chunks relayed, as before


def observed() -> tuple[Observer, list[tuple[Exchange, int]]]:
    ended: list[tuple[Exchange, int]] = []

    def ledger(exchange: Exchange, status: int, error: str | None) -> None:
        ended.append((exchange, status))

    return Observer(NoMetrics(), None, ended=ledger), ended


async def test_the_exchange_is_recorded_on_the_report_not_before() -> None:
    observer, ended = observed()
    exchange = observer.open("chat", "/v1/chat/completions")
    exchange.estimated_output_tokens = 3
    exchange.reported.expect()
    exchange.reported.expect()  # two attempts' work, say
    observer.close(exchange, 499, "client_closed_request")
    assert exchange.closed and not ended
    exchange.reported.deliver(SPENT)
    assert not ended
    exchange.reported.deliver(SPENT)
    assert [(e.usage, status) for e, status in ended] == [(exchange.usage, 499)]
    assert exchange.usage is not None and exchange.usage.prompt_tokens == 82
    assert exchange.output_tokens() == 34
    # A late timer or a shutdown does not record it twice.
    observer.record_awaiting()
    assert len(ended) == 1


async def test_a_report_delivered_before_the_close_is_used_at_once() -> None:
    observer, ended = observed()
    exchange = observer.open("chat", "/v1/chat/completions")
    exchange.reported.expect()
    exchange.reported.deliver(SPENT)
    observer.close(exchange, 499, None)
    assert [e.usage for e, _ in ended] == [SPENT]


async def test_an_answer_with_its_own_usage_does_not_wait() -> None:
    observer, ended = observed()
    exchange = observer.open("chat", "/v1/chat/completions")
    exchange.reported.expect()
    own = wire.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    exchange.usage = own
    observer.close(exchange, 200, None)
    assert [e.usage for e, _ in ended] == [own]


async def test_shutdown_records_what_still_waits_for_a_report() -> None:
    observer, ended = observed()
    exchanges: list[Any] = []
    for _ in range(3):
        exchange = observer.open("chat", "/v1/chat/completions")
        exchange.reported.expect()
        observer.close(exchange, 499, None)
        exchanges.append(exchange)
    assert not ended
    observer.record_awaiting()
    assert [e for e, _ in ended] == exchanges
    exchanges[0].reported.deliver(SPENT)  # too late: already recorded once
    assert len(ended) == 3
