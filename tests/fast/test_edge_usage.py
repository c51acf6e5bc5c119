"""An edge node keeps each keyed request's usage for its gateway
(gateway/edge_usage.py): a fetch that comes first waits for it, a key never
kept answers nothing, and the store stays bounded."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway import wire
from gateway.backends.cut_usage import CutUsageAsker
from gateway.backends.upstream import Timeouts, Upstream
from gateway.contract import UsageReport
from gateway.edge_usage import CutUsage
from gateway.exchange import Exchange

pytestmark = pytest.mark.anyio

SPENT = wire.Usage(prompt_tokens=30, completion_tokens=50, total_tokens=80)


def ended(store: CutUsage, key: str | None, usage: wire.Usage | None = SPENT) -> None:
    exchange = Exchange("chatcmpl-1", "chat", 0.0, usage=usage, usage_key=key)
    store.ended(exchange, 499, "client_closed_request")


async def test_a_fetch_waits_for_the_usage_and_unknown_keys_answer_nothing() -> None:
    store = CutUsage(max_kept=2)
    fetch = asyncio.ensure_future(store.usage("k1", wait_seconds=5))
    await asyncio.sleep(0)
    assert not fetch.done()  # the engine has not stopped the generation yet
    ended(store, "k1")
    assert await asyncio.wait_for(fetch, 1) == SPENT
    assert await store.usage("k1", wait_seconds=0) == SPENT
    assert await store.usage("never", wait_seconds=0.01) is None
    ended(store, None)  # a request no gateway asked to keep
    ended(store, "unknown", usage=None)  # the engine could not tell
    assert await store.usage("unknown", wait_seconds=5) is None  # at once: kept as unknown
    ended(store, "k3")
    # At most max_kept: the oldest went.
    assert not store.known("k1") and store.known("unknown") and store.known("k3")


async def test_a_node_that_cannot_tell_withdraws_the_report_at_once() -> None:
    """The gateway's side: a node that is gone (nothing listens) withdraws
    the expected report, so the request is recorded with the estimate now
    rather than after the observer's wait."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens
    upstream = Upstream("node", f"http://127.0.0.1:{port}/v1", timeouts=Timeouts(1.0, 1.0))
    asker = CutUsageAsker(upstream, f"http://127.0.0.1:{port}")
    report = UsageReport()
    withdrawn = asyncio.Event()
    try:
        asker.from_edge(report, "chatcmpl-gone")
        assert report.pending == 1
        report.when_delivered(withdrawn.set)
        await asyncio.wait_for(withdrawn.wait(), 2)
        assert report.pending == 0 and report.usage is None
    finally:
        await asker.aclose()
        await upstream.aclose()
