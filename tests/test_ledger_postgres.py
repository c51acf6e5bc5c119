"""The ledger on a real PostgreSQL: a gateway writing to it, and a SQLite
ledger moved to it by ``nomoat ledger copy`` with nothing lost."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import MODEL, Cli, free_port, running_server
from sqlalchemy import insert, select
from test_ledger_live import (
    NO_END,
    USER,
    config,
    every_kind,
    fed_tokens,
    sdk,
    settled_decoded,
    usage_report,
    warm_up,
)

from gateway.accounting.db import async_url, migrate_async, open_engine
from gateway.accounting.ledger import (
    Ledger,
    LedgerOptions,
    UsageRecord,
    insert_ignoring_duplicates,
    row,
    write_records,
)
from gateway.accounting.tables import api_keys, node_costs, responses, teams, usage
from gateway.exchange import Exchange

pytestmark = pytest.mark.e2e


async def _rows(url: str) -> list[dict[str, Any]]:
    engine = open_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            result = await connection.execute(select(usage).order_by(usage.c.request_id))
            return [dict(row) for row in result.mappings()]
    finally:
        await engine.dispose()


def rows(url: str) -> list[dict[str, Any]]:
    return asyncio.run(_rows(url))


def test_a_gateway_on_postgresql_records_every_request(tmp_path: Path, postgres_url: str) -> None:
    with running_server(tmp_path, config(postgres_url)) as server:
        warm_up(server)  # a fresh engine's first counts are 2 short
        before = settled_decoded(server)
        seen = every_kind(server)
        decoded = settled_decoded(server) - before
        [group] = [g for g in usage_report(server) if g["group"] == MODEL]
    # After SIGTERM: everything flushed. The first row is the warm-up's.
    warming, *written = sorted(rows(postgres_url), key=lambda row: row["at"])
    assert warming["completion_tokens"] > 1
    assert len(written) == sum(seen.values()) == 10
    statuses = Counter(row["status"] for row in written)
    assert statuses == Counter({200: 3, 499: 1, 429: 1, 502: 1, 401: 1, 400: 1, 404: 1, 413: 1})
    assert fed_tokens(written) == decoded
    assert group["completion_tokens"] == warming["completion_tokens"] + sum(
        r["completion_tokens"] for r in written
    )
    assert all(row["at"].tzinfo is not None for row in written)


def test_an_unreachable_database_spills_at_shutdown_then_loads(
    tmp_path: Path, postgres_url: str, cli: Cli
) -> None:
    """PostgreSQL down (nothing listens at its address): the gateway serves,
    keeps the rows, writes them to its spill file at SIGTERM; `nomoat ledger
    load` puts them in the database once it is there."""
    nowhere = f"postgresql://nomoat:secret@127.0.0.1:{free_port()}/ledger"
    spill = tmp_path / "unwritten.jsonl"
    text = config(nowhere, max_per_key=0).replace(
        f'database = "{nowhere}"',
        f'database = "{nowhere}"\nmigrate_on_start = false\nledger_spill = "{spill}"',
    )
    with running_server(tmp_path, text) as server:
        client = sdk(server)
        for tokens in (3, 4, 5):
            client.chat.completions.create(
                model=MODEL, messages=USER, max_tokens=tokens, logit_bias=NO_END
            )
        assert "cannot write to the accounting database" in server.log()
        # Managed keys cannot be loaded: any other key is a 503 (retry), never
        # let in and never told it is wrong; static keys work on.
        with pytest.raises(openai.InternalServerError) as unloaded:
            sdk(server, "sk-maybe-a-managed-key-000000").chat.completions.create(
                model=MODEL, messages=USER, max_tokens=3
            )
        assert unloaded.value.status_code == 503
        assert unloaded.value.code == "keys_unavailable"
    assert len(spill.read_text().splitlines()) == 4  # the 503 is a row too
    config_file = tmp_path / "reachable.toml"
    config_file.write_text(f'[accounting]\ndatabase = "{postgres_url}"\n')
    assert cli("migrate", "--config", str(config_file)).returncode == 0
    loaded = cli("ledger", "load", str(spill), "--config", str(config_file))
    assert loaded.returncode == 0, loaded.stderr
    written = rows(postgres_url)
    assert sorted(row["completion_tokens"] for row in written) == [0, 3, 4, 5]
    assert Counter(row["status"] for row in written) == Counter({200: 3, 503: 1})


async def _write_with_a_bad_row(url: str, spill: Path) -> Ledger:
    engine_url = async_url(url)
    await migrate_async(engine_url)
    engine = open_engine(engine_url)
    ledger = Ledger(engine, LedgerOptions(spill_path=spill))
    try:
        for index in range(5):
            exchange = Exchange(f"chatcmpl-{index}", "chat", 0.0, path="/v1/chat/completions")
            exchange.user = "nul\x00inside"  # PostgreSQL's text takes no NUL: stripped
            exchange.model = "m" * (300 if index == 2 else 1)  # past the column's 200
            ledger.record(UsageRecord.of(exchange, 200, None, now=0.1))
        await ledger.flush()
    finally:
        await engine.dispose()
    return ledger


def test_a_row_the_database_refuses_does_not_hold_up_the_others(
    tmp_path: Path, postgres_url: str
) -> None:
    spill = tmp_path / "refused.jsonl"
    ledger = asyncio.run(_write_with_a_bad_row(postgres_url, spill))
    written = rows(postgres_url)
    assert [row["request_id"] for row in written] == [f"chatcmpl-{i}" for i in (0, 1, 3, 4)]
    assert {row["user"] for row in written} == {"nulinside"}
    assert ledger.refused == 1 and ledger.written == 4 and ledger.pending == 0
    assert b"chatcmpl-2" in spill.read_bytes()


RECORDS = 2345


async def _fill_sqlite(url: str) -> None:
    """A SQLite ledger as a gateway leaves it: a team, a key, usage rows
    over several days, node-cost windows."""
    engine_url = async_url(url)
    await migrate_async(engine_url)
    engine = open_engine(engine_url)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                insert(teams).values(id="team-1", name="research", created_at=now, updated_at=now)
            )
            await connection.execute(
                insert(api_keys).values(
                    id="key-1",
                    key_hash="sha256:" + "0" * 64,
                    name="ci",
                    team_id="team-1",
                    models=["m"],
                    created_at=now,
                    updated_at=now,
                )
            )
            await connection.execute(
                insert(node_costs),
                [
                    {
                        "backend": "embedded",
                        "started_at": now - timedelta(minutes=i + 1),
                        "ended_at": now - timedelta(minutes=i),
                        "busy_seconds": 12.5,
                        "busy_nano": 1000 + i,
                        "idle_nano": 7,
                    }
                    for i in range(5)
                ],
            )
            await connection.execute(
                insert(responses),
                [
                    {
                        "id": f"resp_{i}",
                        "owner": "key-1",
                        "created_at": now,
                        "model": "m",
                        "previous_response_id": f"resp_{i - 1}" if i else None,
                        "conversation": "[]",
                        "response": "{}",
                    }
                    for i in range(3)
                ],
            )
        ledger = Ledger(engine)
        for index in range(RECORDS):
            exchange = Exchange(f"chatcmpl-{index}", "chat", 0.0, path="/v1/chat/completions")
            exchange.model, exchange.key_id, exchange.team_id = "m", "key-1", "team-1"
            exchange.user = f"user-{index % 7}"
            exchange.charged_nano, exchange.compute_nano = 1_000 + index, index
            record = UsageRecord.of(exchange, 200 if index % 10 else 429, None, now=0.5)
            ledger.record(record)
        await ledger.flush()
    finally:
        await engine.dispose()


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the database's own id, its time in UTC."""
    values = {k: v for k, v in row.items() if k != "id"}
    at = values["at"]
    values["at"] = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return values


def test_a_sqlite_ledger_moves_to_postgresql_with_nothing_lost(
    tmp_path: Path, postgres_url: str, cli: Cli
) -> None:
    source = f"sqlite:///{tmp_path / 'ledger.db'}"
    asyncio.run(_fill_sqlite(source))
    copied = cli("ledger", "copy", "--from", source, "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    [line] = [line for line in copied.stdout.splitlines() if line.split()[0] == "usage"]
    numbers = [word for word in line.split() if word.isdigit()]
    assert numbers == [str(RECORDS)] * 3, line  # in the source, written, in the target
    before, after = rows(source), rows(postgres_url)
    assert len(after) == RECORDS
    assert [comparable(r) for r in before] == [comparable(r) for r in after]
    # Run again (an interrupted copy is simply restarted): nothing is doubled.
    again = cli("ledger", "copy", "--from", source, "--to", postgres_url)
    assert again.returncode == 0, again.stderr
    assert len(rows(postgres_url)) == RECORDS
    counts = asyncio.run(_counts(postgres_url))
    assert counts == {"teams": 1, "api_keys": 1, "node_costs": 5, "responses": 3}
    # The copy's sums are the source's.
    config_file = tmp_path / "pg.toml"
    config_file.write_text(f'[accounting]\ndatabase = "{postgres_url}"\n')
    summed = cli("usage", "--config", str(config_file), "--group-by", "key", "--json")
    assert summed.returncode == 0, summed.stderr
    assert '"requests":2345' in summed.stdout


async def _counts(url: str) -> dict[str, int]:
    engine = open_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            return {
                table.name: len((await connection.execute(select(table))).all())
                for table in (teams, api_keys, node_costs, responses)
            }
    finally:
        await engine.dispose()


async def _written_both_ways(url: str) -> list[dict[str, Any]]:
    await migrate_async(async_url(url))
    engine = open_engine(async_url(url))
    at = datetime(2026, 1, 2, 3, 4, 5, 123_456, tzinfo=UTC)
    # Every column distinct, so that two swapped columns show.
    fast = UsageRecord(
        "fast", at, at.date(), "/v1/chat/completions", "k", "t", "u", "m", "d", "b", "stack",
        True, 11, 3, 7, 13, 17, 0.5, 0.25, 429, "e", "f", "0" * 32,
        [{"name": "x", "scale": 0.5}, {"name": "y", "scale": 1.0}],
    )  # fmt: skip
    core = copy.copy(fast)
    core.request_id = "core"
    try:
        async with engine.begin() as connection:
            await write_records(connection, [fast])
            await connection.execute(insert_ignoring_duplicates(engine), [row(core)])
            await write_records(connection, [fast])  # already there: skipped
        async with engine.connect() as connection:
            result = await connection.execute(select(usage).order_by(usage.c.id))
            return [dict(found) for found in result.mappings()]
    finally:
        await engine.dispose()


def test_rows_are_stored_as_sqlalchemy_core_would_store_them(postgres_url: str) -> None:
    # The writer hands asyncpg plain tuples: what it stores must equal Core's
    # own insert of the same record, column for column.
    fast, core = rows_ = asyncio.run(_written_both_ways(postgres_url))
    assert len(rows_) == 2 and (fast["request_id"], core["request_id"]) == ("fast", "core")
    assert fast["at"] == datetime(2026, 1, 2, 3, 4, 5, 123_456, tzinfo=UTC)
    assert fast["adapters"] == [{"name": "x", "scale": 0.5}, {"name": "y", "scale": 1.0}]
    assert fast | {"id": 0, "request_id": ""} == core | {"id": 0, "request_id": ""}
