"""Where stored Responses live: the accounting database's ``responses``
table (SQLite or PostgreSQL, every replica sees them), or, with accounting
off, a bounded store in this process's memory. One store per app, built at
start-up (:func:`start_response_store`) and held by its runtime.

Each stored Response belongs to the key that created it (its ``owner``, the
principal's key id): another key is told it does not exist (404). Created
without keys (the gateway runs with none), its owner is null and anyone who
can reach the gateway may read it. Reads and writes go through SQLAlchemy's
async engine (aiosqlite, asyncpg): nothing blocks the event loop.

Both stores keep ``[responses]``'s bounds: a Response expires ``ttl_seconds``
after its creation (not found from then on; a periodic sweep deletes it), and
an owner keeps at most ``max_per_key`` Responses and ``max_bytes_per_key``
bytes of them: storing past a bound deletes that owner's oldest (never the
one being stored, nor another owner's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import ColumnElement, delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.accounting.tables import responses
from gateway.errors import GatewayError
from gateway.settings import ResponsesSettings

_log = logging.getLogger(__name__)

# How many Responses the in-memory store keeps in all (the oldest go first):
# the process's memory, whatever the owners.
MEMORY_CAPACITY = 1000
# Rows one statement of an eviction or a sweep reads or deletes: a sweep
# after a long pause deletes in short transactions, not one long one.
BATCH = 500
Clock = Callable[[], float]


class StoreUnavailableError(GatewayError):
    """The database of stored Responses cannot be reached (or is not
    migrated): a request that must store or continue one is refused, 503
    with Retry-After, rather than answered and forgotten."""

    status_code = 503
    error_type = "server_error"
    default_code = "store_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The store of Responses is unavailable; retry later, or send store: false "
            "without previous_response_id.",
            headers={"Retry-After": "1"},
        )


@asynccontextmanager
async def _database() -> AsyncIterator[None]:
    try:
        yield
    except (SQLAlchemyError, OSError) as error:
        raise StoreUnavailableError() from error


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    owner: str | None
    created_at: int
    model: str
    previous_response_id: str | None
    # The conversation a later turn continues: JSON, a list of input items.
    conversation: bytes
    # The Response as it was sent (JSON).
    response: bytes

    @property
    def size(self) -> int:
        """The bytes it counts against its owner's ``max_bytes_per_key``."""
        return len(self.conversation) + len(self.response)


class ResponseStore(Protocol):
    async def save(self, record: StoredResponse) -> None:
        """Stored; its owner's oldest deleted if it is past a bound."""
        ...

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The Response if ``owner`` may see it and it has not expired, else None."""
        ...

    async def delete(self, response_id: str, owner: str | None) -> bool:
        """Deleted (True), or not there for ``owner`` (False)."""
        ...

    async def sweep(self) -> int:
        """The expired Responses deleted; how many."""
        ...


def visible(record_owner: str | None, owner: str | None) -> bool:
    """Whether a Response stored by ``record_owner`` is ``owner``'s to see."""
    return record_owner is None or record_owner == owner


@dataclass(frozen=True, slots=True)
class Excess:
    """How far an owner would be past its bounds with one more Response."""

    count: int
    size: int

    @classmethod
    def of(cls, count: int, size: int, settings: ResponsesSettings) -> Excess:
        return cls(count - settings.max_per_key, size - settings.max_bytes_per_key)

    def less(self, size: int) -> Excess:
        """What is left once a Response of ``size`` bytes is gone."""
        return Excess(self.count - 1, self.size - size)

    @property
    def over(self) -> bool:
        return self.count > 0 or self.size > 0


class MemoryResponseStore:
    """This process's Responses (accounting off): at most ``capacity`` in all."""

    def __init__(
        self,
        settings: ResponsesSettings,
        capacity: int = MEMORY_CAPACITY,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.capacity = capacity
        self.clock = clock
        # Oldest stored first, in all and per owner (with each one's size).
        self._records: OrderedDict[str, StoredResponse] = OrderedDict()
        self._owned: dict[str | None, OrderedDict[str, int]] = {}
        self._bytes: dict[str | None, int] = {}

    def __len__(self) -> int:
        """How many Responses it holds (the expired among them until swept)."""
        return len(self._records)

    def _expired(self, record: StoredResponse) -> bool:
        return record.created_at <= self.clock() - self.settings.ttl_seconds

    def _drop(self, response_id: str) -> None:
        record = self._records.pop(response_id)
        owned = self._owned[record.owner]
        del owned[response_id]
        self._bytes[record.owner] -= record.size
        if not owned:
            del self._owned[record.owner], self._bytes[record.owner]

    async def save(self, record: StoredResponse) -> None:
        if record.id in self._records:
            self._drop(record.id)
        owned = self._owned.setdefault(record.owner, OrderedDict())
        excess = Excess.of(
            len(owned) + 1, self._bytes.get(record.owner, 0) + record.size, self.settings
        )
        while excess.over and owned:
            oldest, size = next(iter(owned.items()))
            self._drop(oldest)
            excess = excess.less(size)
        self._records[record.id] = record
        self._owned.setdefault(record.owner, owned)[record.id] = record.size
        self._bytes[record.owner] = self._bytes.get(record.owner, 0) + record.size
        while len(self._records) > self.capacity:
            self._drop(next(iter(self._records)))

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        record = self._records.get(response_id)
        if record is None or not visible(record.owner, owner) or self._expired(record):
            return None
        return record

    async def delete(self, response_id: str, owner: str | None) -> bool:
        if await self.find(response_id, owner) is None:
            return False
        self._drop(response_id)
        return True

    async def sweep(self) -> int:
        # All of them: a Response is stored when its answer ends, so the
        # order of storing is not quite that of creation (at most capacity).
        expired = [key for key, record in self._records.items() if self._expired(record)]
        for response_id in expired:
            self._drop(response_id)
        return len(expired)


def _owned_by(owner: str | None) -> ColumnElement[bool]:
    return responses.c.owner.is_(None) if owner is None else responses.c.owner == owner


def _visible_to(owner: str | None) -> ColumnElement[bool]:
    mine: ColumnElement[bool] = responses.c.owner.is_(None)
    if owner is not None:
        mine |= responses.c.owner == owner
    return mine


class SqlResponseStore:
    """The ``responses`` table of the accounting database."""

    def __init__(
        self, engine: AsyncEngine, settings: ResponsesSettings, clock: Clock = time.time
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock

    def _cutoff(self) -> datetime:
        """Created at or before this: expired."""
        return datetime.fromtimestamp(self.clock() - self.settings.ttl_seconds, UTC)

    def _live(self) -> ColumnElement[bool]:
        return responses.c.created_at > self._cutoff()

    async def save(self, record: StoredResponse) -> None:
        async with _database():
            # Read first, on a connection of its own: a SQLite transaction
            # that read, then writes, fails when another writer (the ledger)
            # committed in between; one that only writes waits its turn.
            # Writers of one owner at once may each leave one too many: the
            # next write deletes it.
            async with self.engine.connect() as connection:
                evicted = await self._evicted(connection, record)
            async with self.engine.begin() as connection:
                await connection.execute(
                    insert(responses).values(
                        id=record.id,
                        owner=record.owner,
                        created_at=datetime.fromtimestamp(record.created_at, UTC),
                        model=record.model,
                        previous_response_id=record.previous_response_id,
                        conversation=record.conversation.decode(),
                        response=record.response.decode(),
                        size=record.size,
                    )
                )
                if evicted:
                    await connection.execute(delete(responses).where(responses.c.id.in_(evicted)))

    async def _evicted(self, connection: AsyncConnection, record: StoredResponse) -> list[str]:
        """The owner's oldest Responses to delete to keep its bounds once
        ``record`` is stored (the expired count: the sweep has not been)."""
        mine = _owned_by(record.owner)
        count, size = (
            await connection.execute(
                select(func.count(), func.coalesce(func.sum(responses.c.size), 0)).where(mine)
            )
        ).one()
        excess = Excess.of(int(count) + 1, int(size) + record.size, self.settings)
        evicted: list[str] = []
        while excess.over:
            oldest = (
                await connection.execute(
                    select(responses.c.id, responses.c.size)
                    .where(mine)
                    .order_by(responses.c.created_at, responses.c.id)
                    .offset(len(evicted))
                    .limit(BATCH)
                )
            ).all()
            if not oldest:
                break
            for response_id, row_size in oldest:
                if not excess.over:
                    break
                evicted.append(response_id)
                excess = excess.less(int(row_size))
        return evicted

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        wanted = (responses.c.id == response_id) & _visible_to(owner) & self._live()
        async with _database(), self.engine.connect() as connection:
            row = (await connection.execute(select(responses).where(wanted))).first()
        if row is None:
            return None
        fields = row._mapping
        created: datetime = fields["created_at"]
        return StoredResponse(
            id=fields["id"],
            owner=fields["owner"],
            created_at=int(created.replace(tzinfo=created.tzinfo or UTC).timestamp()),
            model=fields["model"],
            previous_response_id=fields["previous_response_id"],
            conversation=str(fields["conversation"]).encode(),
            response=str(fields["response"]).encode(),
        )

    async def delete(self, response_id: str, owner: str | None) -> bool:
        condition = (responses.c.id == response_id) & _visible_to(owner) & self._live()
        async with _database(), self.engine.begin() as connection:
            result = await connection.execute(delete(responses).where(condition))
        return bool(result.rowcount)

    async def sweep(self) -> int:
        removed = 0
        while True:
            # By ix_responses_created_at, a batch at a time.
            batch = (
                select(responses.c.id)
                .where(responses.c.created_at <= self._cutoff())
                .order_by(responses.c.created_at)
                .limit(BATCH)
                .scalar_subquery()
            )
            async with _database(), self.engine.begin() as connection:
                result = await connection.execute(
                    delete(responses).where(responses.c.id.in_(batch))
                )
            removed += result.rowcount
            if result.rowcount < BATCH:
                return removed


async def _sweeping(store: ResponseStore, every: float) -> None:
    """Expired Responses deleted now, then every ``every`` seconds."""
    while True:
        try:
            removed = await store.sweep()
        except StoreUnavailableError as error:
            _log.warning("Could not delete expired Responses: %s", error.__cause__)
        else:
            if removed:
                _log.info("Deleted %d expired Responses", removed)
        await asyncio.sleep(every)


async def start_response_store(
    settings: ResponsesSettings, engine: AsyncEngine | None, stack: AsyncExitStack
) -> ResponseStore:
    """The app's store (the accounting database's when there is one, every
    replica sees it), its sweep running until ``stack`` closes."""
    store: ResponseStore = (
        SqlResponseStore(engine, settings) if engine is not None else MemoryResponseStore(settings)
    )
    task = asyncio.create_task(_sweeping(store, settings.sweep_seconds), name="responses-sweep")

    async def stop() -> None:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
    return store
