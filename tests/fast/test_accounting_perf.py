"""What keeps accounting's per-request cost down (issue 13's overhead
targets), where a regression would only show in a benchmark: the ledger's
batches fill under load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.accounting.db import async_url, migrate_async, open_engine
from gateway.accounting.ledger import Ledger, UsageRecord
from gateway.exchange import Exchange

pytestmark = pytest.mark.anyio


def _record(request_id: str) -> UsageRecord:
    exchange = Exchange(request_id, "chat", 0.0, path="/v1/chat/completions")
    return UsageRecord.of(exchange, 200, None, now=1.0)


async def test_records_queued_during_a_write_wait_for_the_next_batch(tmp_path: Path) -> None:
    """A flush writes what was queued when it began: under load the writer
    would otherwise run on in small transactions (each with its fixed cost)
    instead of letting the next batch fill."""
    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    ledger = Ledger(engine)
    try:
        for index in range(5):
            ledger.record(_record(f"first-{index}"))
        flushing = asyncio.create_task(ledger.flush())
        await asyncio.sleep(0)  # the flush has taken its batch and waits on SQLite
        for index in range(3):
            ledger.record(_record(f"later-{index}"))
        await flushing
        assert (ledger.written, ledger.pending) == (5, 3)
        await ledger.flush()
        assert (ledger.written, ledger.pending) == (8, 0)
    finally:
        await ledger.aclose()
        await engine.dispose()
