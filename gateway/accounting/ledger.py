"""The usage ledger: exactly one row per request, written off the request path.

The request path only appends a :class:`UsageRecord` to a bounded in-memory
queue (:meth:`Ledger.record`, no I/O, no await). A writer task inserts the
queue in batches: every ``flush_seconds``, or as soon as ``batch_size``
records wait. Shutdown (SIGTERM included: the server drains its streams
first, so their records are in) writes what is left.

Each row's ``request_id`` is unique and every insert skips rows already
there, so a batch written again after a lost acknowledgement counts nothing
twice.

When the database is unreachable the gateway keeps serving and records later:
the batch stays at the head of the queue and the writer retries, backing off
up to ``RETRY_CAP_SECONDS``. The queue holds ``max_pending`` records (minutes
to hours of traffic); past that, new records are dropped and counted
(:attr:`Ledger.dropped`, logged). At shutdown, whatever could not be written
within ``flush_timeout_seconds`` goes to a JSON-lines spill file that
``nomoat ledger load`` writes into the database later. A row the database
itself refuses (a data or integrity error, not an outage) is written to that
file at once, and the rows behind it go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import msgspec
from sqlalchemy import Insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import wire
from gateway.accounting.sqlite_file import SqliteFile
from gateway.accounting.tables import usage
from gateway.exchange import Exchange

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

_log = logging.getLogger(__name__)
RETRY_START_SECONDS = 0.5
RETRY_CAP_SECONDS = 10.0
# How long start-up waits for the database before serving without it.
CONNECT_SECONDS = 5.0
# Strings the table bounds (a client's `user` may be anything).
_USER_CHARS = 200


@dataclass(frozen=True, slots=True)
class LedgerOptions:
    batch_size: int = 500
    flush_seconds: float = 0.5
    max_pending: int = 100_000
    flush_timeout_seconds: float = 10.0
    # Where records the database did not take by shutdown are kept (None: lost, logged).
    spill_path: Path | None = None


class AdapterEntry(TypedDict):
    """One adapter of a request, as the ``adapters`` column lists it."""

    name: str
    scale: float


@dataclass(slots=True)
class UsageRecord:
    """One request's row of the ``usage`` table (see gateway/accounting/tables.py).

    Not frozen: a frozen dataclass sets each of its 24 fields through
    ``object.__setattr__``, 3.8 against 1.1 us a record on every request."""

    request_id: str
    at: datetime
    day: date
    endpoint: str
    key_id: str | None
    team_id: str | None
    user: str | None
    model: str | None
    deployment: str | None
    backend: str | None
    adapter: str | None
    stream: bool
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_nano: int
    compute_cost_nano: int
    latency_seconds: float
    ttft_seconds: float | None
    status: int
    error_type: str | None
    finish_reason: str | None
    trace_id: str | None
    # Every adapter it used, with its scale; None for the base model. Last,
    # with a default: spill files written before it was added still load.
    adapters: list[AdapterEntry] | None = None

    @classmethod
    def of(
        cls, exchange: Exchange, status: int, error: str | None, now: float | None = None
    ) -> UsageRecord:
        """The record of a closed exchange; ``now`` a ``time.monotonic()``.

        (Once per request: positional, in the fields' order, with the
        exchange's small getters inline: 13K instructions against 26K with
        keywords and getters.)"""
        arrived = exchange.arrived
        latency = (time.monotonic() if now is None else now) - arrived
        at = datetime.fromtimestamp(time.time() - latency, UTC)
        usage_ = exchange.usage
        if usage_ is not None:
            prompt = usage_.prompt_tokens
            completion = usage_.completion_tokens
            details = usage_.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
        else:
            prompt = cached = 0
            completion = exchange.estimated_output_tokens or 0
        deployment = exchange.deployment
        first = exchange.first_token_at
        return cls(
            # Refused before it had an id (401, 400 on an unreadable body).
            exchange.request_id or f"req-{uuid.uuid4().hex}",
            at,
            at.date(),
            exchange.path or exchange.operation,
            exchange.key_id,
            exchange.team_id,
            bounded_text(exchange.user, _USER_CHARS) if exchange.user else None,
            exchange.model or None,
            deployment or None,
            exchange.backend or None,
            exchange.adapter if deployment else None,
            exchange.stream,
            prompt,
            cached,
            completion,
            exchange.charged_nano,
            exchange.compute_nano,
            latency,
            None if first is None else first - arrived,
            status,
            error,
            exchange.finish_reason,
            exchange.trace_id,
            adapter_entries(exchange) if exchange.adapters else None,
        )


COLUMNS = tuple(f.name for f in fields(UsageRecord))


def adapter_entries(exchange: Exchange) -> list[AdapterEntry] | None:
    """The adapters of the deployment that answered, if one did."""
    if not exchange.deployment:
        return None
    return [AdapterEntry(name=use.adapter.name, scale=use.scale) for use in exchange.adapters]


def bounded_text(text: str | None, limit: int) -> str | None:
    """A client's string as a column takes it: at most ``limit`` characters,
    no NUL (PostgreSQL's text refuses it)."""
    if not text:
        return None
    return text.replace("\x00", "")[:limit]


def cached_tokens(usage_: wire.Usage | None) -> int:
    if usage_ is None or usage_.prompt_tokens_details is None:
        return 0
    return usage_.prompt_tokens_details.cached_tokens or 0


def insert_ignoring_duplicates(engine: AsyncEngine) -> Insert:
    """``INSERT`` into ``usage`` that skips request ids already written."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    return sqlite.insert(usage).on_conflict_do_nothing(index_elements=["request_id"])


# Rows built between two turns of the event loop. A batch of 500 built at
# once held the loop for about 6.5M instructions (2 ms): the stall behind
# sqlite-mem's c=1 p99 of 3.0 ms against 0.8 ms with accounting off.
ROWS_PER_TURN = 50


async def write_records(connection: AsyncConnection, records: Sequence[UsageRecord]) -> None:
    # Plain tuples straight to the driver's executemany: SQLAlchemy Core's
    # per-row parameter processing was about half the writer's CPU (SQLite:
    # 22 against 12 us a row; PostgreSQL: 17 against 6 us a row, batches of
    # 500). Tests check that a row is stored as Core stores it.
    dialect = connection.engine.dialect.name
    if dialect == "sqlite":
        await connection.exec_driver_sql(SQLITE_INSERT, await rows_of(records, sqlite_row))
    elif dialect == "postgresql":
        await connection.exec_driver_sql(POSTGRES_INSERT, await rows_of(records, postgres_row))
    else:
        statement = insert_ignoring_duplicates(connection.engine)
        await connection.execute(statement, [row(record) for record in records])


async def rows_of(
    records: Sequence[UsageRecord], make: Callable[[UsageRecord], tuple[object, ...]]
) -> list[tuple[object, ...]]:
    """``make`` of each record, ``ROWS_PER_TURN`` at a time, the event loop
    let go in between (the rows are built on the loop's thread)."""
    rows: list[tuple[object, ...]] = []
    for start in range(0, len(records), ROWS_PER_TURN):
        if start:
            await asyncio.sleep(0)
        rows.extend(map(make, records[start : start + ROWS_PER_TURN]))
    return rows


# The same statement as insert_ignoring_duplicates() compiles for SQLite.
SQLITE_INSERT = (
    "INSERT INTO usage ("
    + ", ".join(f'"{name}"' for name in COLUMNS)
    + ") VALUES ("
    + ", ".join("?" for _ in COLUMNS)
    + ") ON CONFLICT (request_id) DO NOTHING"
)


# The same for PostgreSQL through asyncpg (its parameters are $1, $2, ...).
POSTGRES_INSERT = (
    "INSERT INTO usage ("
    + ", ".join(f'"{name}"' for name in COLUMNS)
    + ") VALUES ("
    + ", ".join(f"${index}" for index in range(1, len(COLUMNS) + 1))
    + ") ON CONFLICT (request_id) DO NOTHING"
)


def postgres_row(r: UsageRecord) -> tuple[object, ...]:
    """The record's columns in ``COLUMNS`` order for asyncpg: times and days
    as they are (timestamptz, date), JSON as text (SQLAlchemy's codec for
    asyncpg's json type takes text)."""
    return _columns(r, r.at, r.day, r.stream)


def sqlite_row(r: UsageRecord) -> tuple[object, ...]:
    """The record's columns in ``COLUMNS`` order, as SQLAlchemy stores them
    in SQLite: times as ``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC, no offset),
    days as ``YYYY-MM-DD``, booleans as 0 or 1, JSON as text."""
    at = r.at
    # The offset (UTC) left out, as isoformat(" ", "microseconds")[:26]
    # gives it, for less (the row 13K instructions against 19K): the text of
    # a second is the same for every row of that second.
    at_text = (
        f"{_second_text(at.year, at.month, at.day, at.hour, at.minute, at.second)}"
        f".{at.microsecond:06d}"
    )
    return _columns(r, at_text, r.day.isoformat(), 1 if r.stream else 0)


def _columns(r: UsageRecord, at: object, day: object, stream: object) -> tuple[object, ...]:
    """``r``'s columns in ``COLUMNS`` order, with its time, day and stream
    flag as the database's driver takes them; JSON as text (json.dumps, as
    SQLAlchemy's JSON type writes it)."""
    return (
        r.request_id,
        at,
        day,
        r.endpoint,
        r.key_id,
        r.team_id,
        r.user,
        r.model,
        r.deployment,
        r.backend,
        r.adapter,
        stream,
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
        r.cost_nano,
        r.compute_cost_nano,
        r.latency_seconds,
        r.ttft_seconds,
        r.status,
        r.error_type,
        r.finish_reason,
        r.trace_id,
        None if r.adapters is None else json.dumps(r.adapters),
    )


@functools.lru_cache(maxsize=64)
def _second_text(year: int, month: int, day: int, hour: int, minute: int, second: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"


def row(record: UsageRecord) -> dict[str, object]:
    """The record's columns (shallow: dataclasses.asdict deep-copies every
    value, most of the writer's time)."""
    return {name: getattr(record, name) for name in COLUMNS}


class Ledger:
    """The queue and its writer task (see the module's description)."""

    def __init__(
        self,
        engine: AsyncEngine,
        options: LedgerOptions = LedgerOptions(),
        file: SqliteFile | None = None,
    ) -> None:
        self.engine = engine
        self.options = options
        # A SQLite file's batches go through its plain connection (see
        # gateway/accounting/sqlite_file.py); None: through the engine.
        self.file = file
        self._pending: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        self._failing_since: float | None = None
        # Records at the head of the queue being written now.
        self._in_flight = 0
        self.written = 0
        self.dropped = 0
        # Rows the database refused (spilled, not retried).
        self.refused = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, record: UsageRecord) -> None:
        """Queue one record (the request path's whole share of the work)."""
        if len(self._pending) >= self.options.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                _log.error(
                    "ledger: %d records waiting, the database is not taking them; "
                    "%d dropped so far",
                    len(self._pending),
                    self.dropped,
                )
            return
        self._pending.append(record)
        # (The batch being written is still queued: records that arrive
        # meanwhile wait for a batch of their own rather than wake the
        # writer into a small transaction right after it.)
        if len(self._pending) - self._in_flight >= self.options.batch_size:
            self._wake.set()

    async def start(self) -> None:
        """Start the writer, with a connection opened now, while the server
        starts, rather than at the first batch (SQLAlchemy's first connect
        inspects the database): an unreachable database is reported at once,
        and the server starts all the same."""
        try:
            await asyncio.wait_for(self._connect(), CONNECT_SECONDS)
        except Exception as error:
            self._note_failure(error)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def _connect(self) -> None:
        async with self.engine.connect():
            pass

    async def _run(self) -> None:
        delay = RETRY_START_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.flush_seconds)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as error:  # the database is unreachable or refused the batch
                self._note_failure(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_SECONDS)
            else:
                delay = RETRY_START_SECONDS

    def _note_failure(self, error: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            _log.warning(
                "ledger: cannot write to the accounting database (%s); %d records wait, retrying",
                error,
                len(self._pending),
            )

    async def flush(self) -> None:
        """Write every record queued so far, in batches; a batch stays queued
        until the database has taken it. Only the records queued when it
        began: those queued while it writes wait for the next batch, so that
        under load a batch fills to ``batch_size`` (or ``flush_seconds``)
        rather than the writer running on in small transactions, each with
        its fixed cost (it wrote about 35 rows a transaction at 500 requests
        a second)."""
        async with self._writing:
            left = len(self._pending)
            while left > 0 and self._pending:
                batch = [self._pending[i] for i in range(min(self.options.batch_size, left))]
                left -= len(batch)
                self._in_flight = len(batch)
                try:
                    await self._write(batch)
                except Exception:
                    # A row the database refuses (the database answers, but
                    # not to this batch) must not hold up the rows behind it.
                    if not await self._reachable():
                        raise
                    await self._one_by_one(batch)
                finally:
                    self._in_flight = 0
                for _ in batch:
                    self._pending.popleft()
                self.written += len(batch)
                if self._failing_since is not None:
                    _log.warning(
                        "ledger: writing again after %.1f s", time.monotonic() - self._failing_since
                    )
                    self._failing_since = None

    async def _write(self, batch: Sequence[UsageRecord]) -> None:
        """``batch`` in one transaction (rows already there skipped)."""
        if self.file is not None:
            await self.file.write(SQLITE_INSERT, await rows_of(batch, sqlite_row))
            return
        async with self.engine.begin() as connection:
            await write_records(connection, batch)

    async def _reachable(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def _one_by_one(self, batch: Sequence[UsageRecord]) -> None:
        """Write ``batch`` a row at a time; the rows refused go to the spill
        file (a database that fails now fails the whole flush, as usual)."""
        refused = []
        for record in batch:
            try:
                await self._write([record])
            except Exception as error:
                if not await self._reachable():
                    raise  # an outage after all: the batch stays queued
                _log.error("ledger: the database refused %s: %s", record.request_id, error)
                refused.append(record)
        self.written -= len(refused)
        self.refused += len(refused)
        self._spill(refused)

    async def aclose(self) -> None:
        """Stop the writer and write what is left (within the flush timeout);
        spill the rest to a file if the database will not take it."""
        if self._task is not None:
            # A batch being written is let finish (within the timeout) rather
            # than cancelled mid-transaction; cancelled anyway, it is still
            # queued and written again below (rows already in are skipped).
            try:
                await asyncio.wait_for(self._writing.acquire(), self.options.flush_timeout_seconds)
            except TimeoutError:
                self._task.cancel()
            else:
                self._task.cancel()
                self._writing.release()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        deadline = time.monotonic() + self.options.flush_timeout_seconds
        while self._pending and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.1, deadline - time.monotonic()))
            except Exception as error:
                self._note_failure(error)
                await asyncio.sleep(min(RETRY_START_SECONDS, max(0.0, deadline - time.monotonic())))
        if self._pending:
            self._spill(self._pending)
            self._pending.clear()

    def _spill(self, records: Iterable[UsageRecord]) -> None:
        """Append ``records`` to the spill file (see the module's description)."""
        lines = [encode_record(record) + b"\n" for record in records]
        path = self.options.spill_path
        if not lines:
            return
        if path is None:
            _log.error("ledger: %d records not written (no spill file)", len(lines))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as spill:
            spill.writelines(lines)
        _log.error(
            "ledger: %d records not written kept in %s (write them with `nomoat ledger load %s`)",
            len(lines),
            path,
            path,
        )


def encode_record(record: UsageRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_records(lines: Iterable[bytes]) -> list[UsageRecord]:
    return [msgspec.json.decode(line, type=UsageRecord) for line in lines if line.strip()]
