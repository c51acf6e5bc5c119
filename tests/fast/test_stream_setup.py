"""What a stream's set-up no longer does, and what it still must do
(docs/benchmarks.md, "Streaming at scale", session 6): a hang-up heard from
the connection with no watcher task; the OpenAI POSTs served past Litestar's
routing with Litestar's answers kept for everything else; the decision
record built only when read, still logged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest
from litestar.types import ReceiveMessage, Scope

from gateway.decision_log import read_log
from gateway.hang_up import HANG_UP, HangUpWatch
from gateway.responses import HangUp

from .conftest import Start
from .support import MODEL, chat_body, error_of, pool

pytestmark = pytest.mark.anyio


async def _never() -> ReceiveMessage:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _scope(watch: HangUpWatch) -> Scope:
    return cast(Scope, {"type": "http", "extensions": {HANG_UP: {HANG_UP: watch}}})


async def test_a_hang_up_heard_from_the_connection_cancels_the_work_with_no_task() -> None:
    watch = HangUpWatch()
    tasks_before = len(asyncio.all_tasks())
    started = asyncio.Event()
    outcome: list[str] = []

    async def work() -> None:
        hang_up = HangUp(_never, _scope(watch))
        # No watcher task awaits receive(): the connection tells the watch.
        outcome.append(f"tasks {len(asyncio.all_tasks()) - tasks_before}")
        try:
            started.set()
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append(f"absorbed {hang_up.absorb()}")
        finally:
            hang_up.close()

    task = asyncio.get_running_loop().create_task(work())
    await started.wait()
    watch.lost()
    await task
    # The work's own task only; then cancelled by the hang-up, which absorb
    # takes back (so the handler turns it into a 499, not a cancellation).
    assert outcome == ["tasks 1", "absorbed True"]
    assert not task.cancelled()


async def test_a_client_gone_before_the_watch_is_heard_at_once_and_a_closed_one_never() -> None:
    gone = HangUpWatch()
    gone.lost()

    async def late() -> bool:
        hang_up = HangUp(_never, _scope(gone))
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return hang_up.absorb()
        finally:
            hang_up.close()
        return False

    assert await asyncio.wait_for(late(), 5)

    kept = HangUpWatch()
    closed = HangUp(_never, _scope(kept))
    closed.close()
    kept.lost()  # forgotten on close: nothing is cancelled
    await asyncio.sleep(0)
    assert not closed.hung_up_seen


async def test_direct_routes_keep_litestars_answers_around_the_openai_posts(
    start: Start,
) -> None:
    async with start(pool("a")) as gw:
        served = await gw.http.post("/v1/chat/completions", json=chat_body())
        assert served.status_code == 200 and served.json()["model"] == MODEL
        # Other methods and spellings go to Litestar, as before.
        refused = await gw.http.get("/v1/chat/completions")
        error_of(refused, 405)
        assert "POST" in refused.headers["allow"]
        assert (await gw.http.post("/v1/chat/completions/", json=chat_body())).status_code == 200
        error_of(await gw.http.post("/v1/chat/completion", json=chat_body()), 404)
        bad_host = await gw.http.post(
            "/v1/chat/completions", json=chat_body(), headers={"host": "a b"}
        )
        error_of(bad_host, 400)
        # A failure before the answer: the OpenAI-shaped error, its headers kept.
        missing = error_of(await gw.http.post("/v1/chat/completions", json={"model": MODEL}), 400)
        assert missing["type"] == "invalid_request_error"
        unknown = await gw.http.post("/v1/chat/completions", json=chat_body(model="nope"))
        assert error_of(unknown, 404)["code"] == "model_not_found"
        assert len(unknown.headers["x-request-id"]) == 32
        assert gw.backend("a").calls and len(gw.backend("a").calls) == 2


async def test_a_decision_unread_is_still_logged_and_read_ones_still_sent(
    start: Start, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    async with start(pool("a", "b", server={"decision_log": str(log)})) as gw:
        quiet = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert quiet.status_code == 200 and "x-nomoat-route" not in quiet.headers
    records = list(read_log(log))
    assert [(r.outcome, r.chosen, len(r.rankings)) for r in records] == [("ok", "m/0", 1)]
    assert records[0].request.model == MODEL and records[0].request.stream
    async with start(pool("a", "b", server={"route_header": True})) as gw:
        told = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert told.headers["x-nomoat-route"].startswith("deployment=m/0; backend=a")
