"""Moving accounting data between databases: a SQLite ledger to PostgreSQL
(``nomoat ledger copy``), and records spilled at shutdown back into the
database (``nomoat ledger load``).

Both can be run again safely: keys and teams are matched by id, usage rows by
request id, node-cost windows by backend and start; what the target already
has is skipped, so nothing is counted twice and nothing is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Column, Insert, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.accounting.db import migrate_async, open_engine
from gateway.accounting.ledger import UsageRecord, decode_records, write_records
from gateway.accounting.tables import api_keys, node_costs, responses, teams, usage

BATCH = 1000


@dataclass
class TableCopy:
    table: str
    source_rows: int = 0
    written: int = 0
    target_rows: int = 0


@dataclass
class CopyReport:
    tables: list[TableCopy] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every source row is in the target (it may hold more of its own)."""
        return all(t.target_rows >= t.source_rows for t in self.tables)


def _insert(connection: AsyncConnection, table: Table, conflict: Sequence[str]) -> Insert:
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(conflict))
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(conflict))


def _utc(row: RowMapping, skip: str | None) -> dict[str, object]:
    """A row to insert elsewhere: SQLite gives its times back without a zone
    (all are UTC); the target's autoincrement id is its own."""
    values: dict[str, object] = {}
    for name, value in row.items():
        if name == skip:
            continue
        values[name] = _as_utc(value)
    return values


async def _count(connection: AsyncConnection, table: Table) -> int:
    return int((await connection.execute(select(func.count()).select_from(table))).scalar_one())


async def _copy_table(
    source: AsyncConnection,
    target: AsyncEngine,
    table: Table,
    order: Column[object],
    conflict: Sequence[str],
    skip: str | None,
) -> TableCopy:
    report = TableCopy(table.name, source_rows=await _count(source, table))
    async with target.connect() as connection:
        already = await _count(connection, table)
    known = await _windows(target) if table is node_costs else set()
    result = await source.stream(select(table).order_by(order))
    async for partition in result.mappings().partitions(BATCH):
        rows = [_utc(row, skip) for row in partition]
        if table is node_costs:
            # No unique key to conflict on: windows already there are skipped.
            rows = [r for r in rows if (r["backend"], r["started_at"]) not in known]
        if not rows:
            continue
        async with target.begin() as connection:
            statement = (
                node_costs.insert() if table is node_costs else _insert(connection, table, conflict)
            )
            await connection.execute(statement, rows)
    async with target.connect() as connection:
        report.target_rows = await _count(connection, table)
    # (Drivers do not all count the rows an INSERT ... ON CONFLICT DO NOTHING wrote.)
    report.written = report.target_rows - already
    return report


async def _windows(target: AsyncEngine) -> set[tuple[object, object]]:
    async with target.connect() as connection:
        rows = await connection.execute(select(node_costs.c.backend, node_costs.c.started_at))
        return {(row[0], _as_utc(row[1])) for row in rows}


def _as_utc(value: object) -> object:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


async def copy_database(source_url: URL, target_url: URL) -> CopyReport:
    """Every team, key, usage record, node-cost window and stored Response
    of ``source`` into ``target`` (migrated to the schema's head first)."""
    await migrate_async(target_url)
    source, target = open_engine(source_url), open_engine(target_url)
    report = CopyReport()
    try:
        async with source.connect() as connection:
            # Foreign keys first: teams before the keys that name them.
            for table, order, conflict, skip in (
                (teams, teams.c.id, ["id"], None),
                (api_keys, api_keys.c.id, ["id"], None),
                (usage, usage.c.id, ["request_id"], "id"),
                (node_costs, node_costs.c.id, [], "id"),
                # Stored Responses: a conversation continues after the move.
                (responses, responses.c.id, ["id"], None),
            ):
                report.tables.append(
                    await _copy_table(connection, target, table, order, conflict, skip)
                )
    finally:
        await source.dispose()
        await target.dispose()
    return report


def read_spill(path: Path) -> list[UsageRecord]:
    """The records of a spill file (see gateway/accounting/ledger.py)."""
    return decode_records(path.read_bytes().splitlines())


async def load_records(records: Sequence[UsageRecord], url: URL) -> int:
    """Write ``records`` into the database (those already there are skipped)."""
    engine = open_engine(url)
    try:
        for start in range(0, len(records), BATCH):
            async with engine.begin() as connection:
                await write_records(connection, records[start : start + BATCH])
    finally:
        await engine.dispose()
    return len(records)
