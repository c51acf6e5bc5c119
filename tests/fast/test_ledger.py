"""The usage ledger in the fast layer: the real gateway in process, fake
backends, a real SQLite database in a temporary directory.

Every request, whatever became of it, is exactly one row; the rows say what
the client was told."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.accounting import ledger
from gateway.accounting.db import async_url, migrate_async, open_engine
from gateway.accounting.ledger import (
    Ledger,
    LedgerOptions,
    UsageRecord,
    decode_records,
    encode_record,
    insert_ignoring_duplicates,
    row,
    sqlite_row,
    write_records,
)
from gateway.accounting.tables import usage
from gateway.accounting.transfer import read_spill
from gateway.app import create_app, shed_recorder
from gateway.auth import hash_api_key, key_fingerprint
from gateway.contract import Adapter, AdapterUse, Target
from gateway.errors import KeyOverloadedError, UpstreamError
from gateway.exchange import Exchange
from gateway.shedding import RequestShedder
from gateway.testing import Script
from gateway.testing.inprocess import ASGIStreamTransport, InProcessGateway

from .conftest import Start
from .support import MODEL, USER, chat_body, completion_body, error_of, pool

pytestmark = pytest.mark.anyio

KEY = "sk-in-process-test"  # what in_process_gateway's clients send
ADMIN_KEY = "sk-admin-0123456789abcdef"
SERVER = {"api_key_hashes": [hash_api_key(KEY)], "admin_key_hashes": [hash_api_key(ADMIN_KEY)]}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def rows(gw: InProcessGateway) -> list[dict[str, Any]]:
    """The ledger's rows, once everything queued so far is written."""
    accounting = gw.runtime.accounting
    assert accounting is not None
    await accounting.ledger.flush()
    async with accounting.engine.connect() as connection:
        result = await connection.execute(select(usage).order_by(usage.c.id))
        return [dict(row) for row in result.mappings()]


async def settled(gw: InProcessGateway, count: int) -> list[dict[str, Any]]:
    """The rows once ``count`` requests have closed (a stream the client left
    closes as the app notices, a moment after the client has gone)."""
    for _ in range(200):
        accounting = gw.runtime.accounting
        assert accounting is not None
        if accounting.ledger.pending + accounting.ledger.written >= count:
            break
        await asyncio.sleep(0.01)
    return await rows(gw)


async def test_every_kind_of_request_is_exactly_one_record(start: Start) -> None:
    config = pool("a", server=SERVER, limits={"max_body_bytes": 4096}, retries=0)
    async with start(config) as gw:
        fake = gw.backend("a")
        http = gw.http
        # Answered: JSON and streamed, chat and completion.
        assert (await http.post("/v1/chat/completions", json=chat_body(user="ada"))).is_success
        assert (await http.post("/v1/completions", json=completion_body())).is_success
        streamed = await http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert streamed.is_success
        # A stream the client leaves after its first event.
        fake.script(Script(stall_after=2))
        async with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as cut:
            lines = cut.aiter_lines()
            assert (await anext(lines)).startswith("data: {")
        # The backend fails: before the first byte (502), and mid-stream.
        fake.script(Script(error=UpstreamError("down")))
        error_of(await http.post("/v1/chat/completions", json=chat_body()), 502)
        fake.script(Script(error=UpstreamError("cut"), error_after=2))
        broken = await http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert b'"error"' in broken.content
        # Refused before routing: no key, bad body, unknown model, too large, overloaded.
        error_of(
            await http.post(
                "/v1/chat/completions",
                json=chat_body(),
                headers={"Authorization": "Bearer sk-wrong-key-000000000"},
            ),
            401,
        )
        error_of(await http.post("/v1/chat/completions", json={"model": MODEL}), 400)
        error_of(await http.post("/v1/chat/completions", json=chat_body(model="nope")), 404)
        huge = chat_body(messages=[{"role": "user", "content": "x" * 8000}])
        error_of(await http.post("/v1/chat/completions", json=huge), 413)
        fake.script(Script(error=KeyOverloadedError("too many for this key")))
        error_of(await http.post("/v1/chat/completions", json=chat_body()), 429)

        written = await settled(gw, 11)
    assert len(written) == 11
    assert len({row["request_id"] for row in written}) == 11
    by_status = Counter(row["status"] for row in written)
    assert by_status[200] == 3
    # A stream that fails after its head is recorded with the error's status
    # (the client saw 200, then an error event), as the metrics count it.
    assert by_status[499] == 1 and by_status[502] == 2
    assert {by_status[s] for s in (401, 400, 404, 413, 429)} == {1}
    first = written[0]
    assert first["user"] == "ada" and first["model"] == MODEL and first["deployment"] == "m/0"
    assert first["backend"] == "a" and first["finish_reason"] == "stop"
    assert first["prompt_tokens"] == 5 and first["completion_tokens"] > 0
    assert first["key_id"] and first["endpoint"] == "/v1/chat/completions"
    assert written[2]["stream"] and written[2]["ttft_seconds"] is not None
    cut_row = next(row for row in written if row["status"] == 499)
    # The tokens generated before the client left (two chunks, one content chunk).
    assert cut_row["completion_tokens"] >= 1 and cut_row["error_type"] == "client_closed_request"
    refused = next(row for row in written if row["status"] == 401)
    assert refused["key_id"] is None and refused["model"] is None
    assert refused["error_type"] == "invalid_api_key"


async def test_usage_is_summed_by_group_and_window(start: Start) -> None:
    async with start(pool("a", server=SERVER)) as gw:
        for user in ("ada", "bob", "ada"):
            reply = await gw.sdk.chat.completions.create(model=MODEL, messages=USER, user=user)
            assert reply.usage is not None
        answer = await gw.http.get("/admin/usage?group_by=model", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        [group] = answer.json()["data"]
        assert group["group"] == MODEL and group["requests"] == 3
        assert group["prompt_tokens"] == 3 * reply.usage.prompt_tokens
        assert group["completion_tokens"] == 3 * reply.usage.completion_tokens
        assert set(group) >= {"cached_tokens", "cost_usd", "compute_cost_usd"}
        today = datetime.now(UTC).date().isoformat()
        by_day = (await gw.http.get("/admin/usage?group_by=day", headers=ADMIN)).json()["data"]
        assert [g["group"] for g in by_day] == [today]
        later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        empty = await gw.http.get("/admin/usage", params={"since": later}, headers=ADMIN)
        assert empty.json()["data"] == []
        error = error_of(await gw.http.get("/admin/usage?group_by=colour", headers=ADMIN), 400)
        assert error["param"] == "group_by"
        # An ordinary key may not read everyone's usage.
        error_of(await gw.http.get("/admin/usage"), 403)


async def test_streams_are_recorded_with_metrics_and_access_log_off(start: Start) -> None:
    async with start(pool("a") + "\n[metrics]\nenabled = false\n") as gw:
        assert gw.runtime.metrics is None
        stream = await gw.sdk.chat.completions.create(model=MODEL, messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
        [row] = await rows(gw)
    assert row["stream"] and row["completion_tokens"] == len(
        [c for c in chunks if c.choices and c.choices[0].delta.content]
    )
    assert row["finish_reason"] == "stop" and row["status"] == 200


async def test_accounting_off_means_no_ledger(start: Start) -> None:
    async with start(pool("a") + "\n[accounting]\nenabled = false\n") as gw:
        assert gw.runtime.accounting is None
        assert (await gw.http.post("/v1/chat/completions", json=chat_body())).is_success
        error_of(await gw.http.get("/admin/usage"), 404)


async def test_a_batch_is_written_as_soon_as_it_is_full(tmp_path: Path) -> None:
    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    ledger = Ledger(engine, LedgerOptions(batch_size=3, flush_seconds=60))
    await ledger.start()
    try:
        for index in range(3):
            ledger.record(record(f"r{index}"))
        await _until_written(ledger, 3)
        assert ledger.written == 3 and ledger.pending == 0
    finally:
        await ledger.aclose()
        await engine.dispose()


async def test_records_that_arrive_while_a_batch_is_written_wait_for_a_full_batch(
    tmp_path: Path,
) -> None:
    # Under load records keep arriving while a batch is written: they must
    # not wake the writer into a small transaction right after it (before,
    # the batch still queued counted towards the next one: every full batch
    # was followed by one of the few that came during its write).
    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    arrivals = iter(range(2))

    class Busy(Ledger):
        async def _write(self, batch: Sequence[UsageRecord]) -> None:
            for index in arrivals:  # two arrive during the first write only
                self.record(record(f"late{index}"))
            await super()._write(batch)

    ledger = Busy(engine, LedgerOptions(batch_size=3, flush_seconds=60))
    await ledger.start()
    try:
        for index in range(3):
            ledger.record(record(f"r{index}"))
        await _until_written(ledger, 3)
        for _ in range(5):  # a few turns of the loop: no small batch follows
            await asyncio.sleep(0.01)
        assert (ledger.written, ledger.pending) == (3, 2)
        ledger.record(record("third"))  # a full batch: written at once
        await _until_written(ledger, 6)
        assert (ledger.written, ledger.pending) == (6, 0)
    finally:
        await ledger.aclose()
        await engine.dispose()


async def test_a_record_written_twice_counts_once(tmp_path: Path) -> None:
    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    ledger = Ledger(engine)
    try:
        ledger.record(record("same"))
        await ledger.flush()
        ledger.record(record("same"))
        ledger.record(record("other"))
        await ledger.flush()
        assert await count(engine) == 2
    finally:
        await engine.dispose()


async def test_an_unreachable_database_keeps_records_until_it_is_back(tmp_path: Path) -> None:
    # The database's directory is a file: SQLite cannot open it.
    blocker = tmp_path / "db"
    blocker.write_text("not a directory")
    url = async_url(f"sqlite:///{blocker / 'ledger.db'}")
    engine = open_engine_unchecked(url)
    ledger = Ledger(engine, LedgerOptions(spill_path=tmp_path / "spill.jsonl"))
    try:
        ledger.record(record("kept"))
        with pytest.raises(Exception, match="unable to open"):
            await ledger.flush()
        assert ledger.pending == 1
        blocker.unlink()
        await migrate_async(url)
        await ledger.flush()
        assert ledger.pending == 0 and await count(engine) == 1
    finally:
        await engine.dispose()


async def test_records_the_database_refuses_at_shutdown_are_spilled(tmp_path: Path) -> None:
    blocker = tmp_path / "db"
    blocker.write_text("not a directory")
    engine = open_engine_unchecked(async_url(f"sqlite:///{blocker / 'ledger.db'}"))
    spill = tmp_path / "spill.jsonl"
    ledger = Ledger(engine, LedgerOptions(flush_timeout_seconds=0.05, spill_path=spill))
    await ledger.start()
    for name in ("one", "two"):
        ledger.record(record(name))
    await ledger.aclose()
    await engine.dispose()
    assert [r.request_id for r in read_spill(spill)] == ["one", "two"]


async def test_a_full_queue_drops_and_counts_rather_than_block(tmp_path: Path) -> None:
    engine = open_engine_unchecked(async_url(f"sqlite:///{tmp_path / 'x.db'}"))
    ledger = Ledger(engine, LedgerOptions(max_pending=2))
    for name in ("a", "b", "c"):
        ledger.record(record(name))
    assert ledger.pending == 2 and ledger.dropped == 1
    await engine.dispose()


def adapter(name: str) -> Adapter:
    return Adapter(name, MODEL, "0" * 64, "gguf", Path(name), name)


def record(request_id: str) -> UsageRecord:
    exchange = Exchange(request_id, "chat", 0.0, path="/v1/chat/completions")
    return UsageRecord.of(exchange, 200, None, now=1.0)


def open_engine_unchecked(url: Any) -> Any:
    """An engine on a path whose directory may not exist (open_engine makes it)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(url)


async def count(engine: Any) -> int:
    async with engine.connect() as connection:
        return len((await connection.execute(select(usage.c.id))).all())


async def test_sqlite_rows_are_stored_as_sqlalchemy_would_store_them(tmp_path: Path) -> None:
    # The SQLite writer hands plain tuples to the driver: what it stores must
    # equal SQLAlchemy's own insert of the same record, byte for byte, and
    # read back as the same values.
    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    # A stack of two adapters: the label says "stack", the JSON column which.
    exchange = Exchange("fast", "chat", 0.0, path="/v1/chat/completions")
    exchange.answered_by(
        Target(
            MODEL, MODEL, f"{MODEL}/0", (AdapterUse(adapter("x"), 0.5), AdapterUse(adapter("y")))
        ),
        "b",
    )
    full = UsageRecord.of(exchange, 200, None, now=1.0)
    assert full.adapter == "stack"
    assert full.adapters == [{"name": "x", "scale": 0.5}, {"name": "y", "scale": 1.0}]
    full.user, full.key_id, full.stream, full.ttft_seconds = "u", "k", True, 0.25
    # Every other column distinct, so that two swapped columns show.
    full.team_id, full.model, full.deployment, full.backend = "t", "m", "d", "b"
    full.prompt_tokens, full.cached_tokens, full.completion_tokens = 11, 3, 7
    full.cost_nano, full.compute_cost_nano, full.status = 13, 17, 429
    full.error_type, full.finish_reason, full.trace_id = "e", "f", "0" * 32
    full.at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # no microseconds: still six digits
    full.day = full.at.date()
    twin = copy.copy(full)
    twin.request_id = "core"
    try:
        async with engine.begin() as connection:
            await write_records(connection, [full])
            await connection.execute(insert_ignoring_duplicates(engine), [row(twin)])
        async with engine.connect() as connection:
            raw = (await connection.exec_driver_sql(RAW_ROWS)).all()
            typed = (await connection.execute(select(usage).order_by(usage.c.id))).all()
        assert raw[0][1:] == raw[1][1:] and raw[0][0] == "fast"
        assert typed[0]._mapping["at"] == datetime(2026, 1, 2, 3, 4, 5)
        assert typed[0]._mapping["stream"] is True
        assert typed[0]._mapping["adapters"] == full.adapters
        assert raw[0][-8:-5] == (11, 3, 7)
        assert [dict(r._mapping) | {"id": 0, "request_id": ""} for r in typed[:1]] == [
            dict(r._mapping) | {"id": 0, "request_id": ""} for r in typed[1:]
        ]
    finally:
        await engine.dispose()


def test_a_sqlite_rows_time_is_sqlalchemys_text_to_the_microsecond() -> None:
    # (The writer builds it from a cached text of its second.)
    base = UsageRecord.of(Exchange("t", "chat", 0.0), 200, None, now=1.0)
    start = datetime(2026, 12, 31, 23, 59, 58, 999_998, tzinfo=UTC)
    for step in range(0, 4_000_000, 1_999):
        at = start + timedelta(microseconds=step)
        base.at, base.day = at, at.date()
        text, day = sqlite_row(base)[1:3]
        assert (text, day) == (at.isoformat(" ", "microseconds")[:26], at.date().isoformat())


RAW_ROWS = (
    "SELECT request_id, at, typeof(at), day, typeof(day), stream, typeof(stream), user,"
    " key_id, ttft_seconds, latency_seconds, status, endpoint, team_id, model, deployment,"
    " backend, adapter, adapters, prompt_tokens, cached_tokens, completion_tokens, cost_nano,"
    " compute_cost_nano, error_type, finish_reason, trace_id FROM usage ORDER BY id"
)


async def test_a_request_shed_before_the_app_is_one_row(start: Start) -> None:
    """Past limits.max_requests the shedder answers 503 without calling the
    app (gateway/shedding.py): the request still gets its ledger row, with
    the key it named; other paths (GET /v1/models) get none, as unshed."""
    async with start(pool("a", server=SERVER)) as gw:
        # Every request is shed (max_requests 0): the app is never called.
        app = create_app(gw.runtime)
        shedder = RequestShedder(app, 0, shed_recorder(gw.runtime, app))
        transport = ASGIStreamTransport(shedder)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            keyed = await client.post(
                "/v1/chat/completions",
                json=chat_body(),
                headers={"Authorization": f"Bearer {KEY}"},
            )
            anonymous = await client.post("/v1/completions", json=completion_body())
            listing = await client.get("/v1/models")
        assert keyed.status_code == anonymous.status_code == listing.status_code == 503
        written = await rows(gw)
    assert [(r["endpoint"], r["status"], r["error_type"]) for r in written] == [
        ("/v1/chat/completions", 503, "server_overloaded"),
        ("/v1/completions", 503, "server_overloaded"),
    ]
    assert written[0]["key_id"] == key_fingerprint(hash_api_key(KEY))
    assert written[1]["key_id"] is None and written[0]["model"] is None


async def test_spill_lines_written_before_the_adapters_column_still_load() -> None:
    line = json.loads(encode_record(record("old")))
    del line["adapters"]
    [loaded] = decode_records([json.dumps(line).encode()])
    assert loaded.request_id == "old" and loaded.adapters is None


async def test_a_batchs_rows_are_built_a_few_at_a_time_between_turns_of_the_loop() -> None:
    # The rows are built on the event loop's thread: 500 at once held it for
    # about 2 ms, a stall every request of that moment waited out.
    exchanges = [Exchange(f"r{i}", "chat", 0.0) for i in range(500)]
    records = [UsageRecord.of(exchange, 200, None, now=1.0) for exchange in exchanges]
    built: list[int] = []

    def make(record: UsageRecord) -> tuple[object, ...]:
        built.append(1)
        return sqlite_row(record)

    seen: list[int] = []
    done = False

    async def ticker() -> None:
        while not done:
            seen.append(len(built))
            await asyncio.sleep(0)

    watching = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    made = await ledger.rows_of(records, make)
    done = True
    await watching
    assert made == [sqlite_row(r) for r in records]
    turns = [*seen, len(built)]
    assert max(b - a for a, b in itertools.pairwise(turns)) <= ledger.ROWS_PER_TURN


async def test_a_sqlite_batch_is_written_whole_and_duplicates_are_skipped(tmp_path: Path) -> None:
    # A batch of 125 rows (more than one turn of rows_of) stored whole, in order;
    # rows already written, and twice in the batch, are skipped.
    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    records = []
    for index in range(123):
        record = UsageRecord.of(Exchange(f"r{index}", "chat", 0.0), 200, None, now=1.0)
        record.prompt_tokens, record.completion_tokens = index, 1000 + index
        records.append(record)
    columns = ", ".join(ledger.COLUMNS)
    try:
        async with engine.begin() as connection:
            await write_records(connection, records[:7])
        async with engine.begin() as connection:
            await write_records(connection, [*records, *records[:2]])
        async with engine.connect() as connection:
            stored = await connection.exec_driver_sql(f"SELECT {columns} FROM usage ORDER BY id")
            assert [tuple(r) for r in stored.all()] == [sqlite_row(r) for r in records]
    finally:
        await engine.dispose()


async def _until_written(ledger: Ledger, count: int) -> None:
    """Waits (at most 2 s) until ``ledger`` has written ``count`` rows."""
    for _ in range(200):
        if ledger.written == count:
            return
        await asyncio.sleep(0.01)
