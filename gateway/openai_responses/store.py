"""Where stored Responses live: the accounting database's ``responses``
table (SQLite or PostgreSQL, every replica sees them), or, with accounting
off, a bounded store in this process's memory.

Each stored Response belongs to the key that created it (its ``owner``, the
principal's key id): another key is told it does not exist (404). Created
without keys (the gateway runs with none), its owner is null and anyone who
can reach the gateway may read it. Reads and writes go through SQLAlchemy's
async engine (aiosqlite, asyncpg): nothing blocks the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import ColumnElement, delete, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.accounting.tables import responses
from gateway.errors import GatewayError

# How many Responses the in-memory store keeps (the oldest go first).
MEMORY_CAPACITY = 1000


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


class ResponseStore(Protocol):
    async def save(self, record: StoredResponse) -> None: ...

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The Response if ``owner`` may see it, else None."""
        ...

    async def delete(self, response_id: str, owner: str | None) -> bool:
        """Deleted (True), or not there for ``owner`` (False)."""
        ...


def visible(record_owner: str | None, owner: str | None) -> bool:
    """Whether a Response stored by ``record_owner`` is ``owner``'s to see."""
    return record_owner is None or record_owner == owner


class MemoryResponseStore:
    """The last :data:`MEMORY_CAPACITY` Responses of this process (accounting off)."""

    def __init__(self, capacity: int = MEMORY_CAPACITY) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, StoredResponse] = OrderedDict()

    async def save(self, record: StoredResponse) -> None:
        self._records[record.id] = record
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        record = self._records.get(response_id)
        if record is None or not visible(record.owner, owner):
            return None
        return record

    async def delete(self, response_id: str, owner: str | None) -> bool:
        if await self.find(response_id, owner) is None:
            return False
        del self._records[response_id]
        return True


class SqlResponseStore:
    """The ``responses`` table of the accounting database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def save(self, record: StoredResponse) -> None:
        async with _database(), self.engine.begin() as connection:
            await connection.execute(
                insert(responses).values(
                    id=record.id,
                    owner=record.owner,
                    created_at=datetime.fromtimestamp(record.created_at, UTC),
                    model=record.model,
                    previous_response_id=record.previous_response_id,
                    conversation=record.conversation.decode(),
                    response=record.response.decode(),
                )
            )

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        async with _database(), self.engine.connect() as connection:
            row = (
                await connection.execute(select(responses).where(responses.c.id == response_id))
            ).first()
        if row is None:
            return None
        fields = row._mapping
        if not visible(fields["owner"], owner):
            return None
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
        mine: ColumnElement[bool] = responses.c.owner.is_(None)
        if owner is not None:
            mine |= responses.c.owner == owner
        condition = (responses.c.id == response_id) & mine
        async with _database(), self.engine.begin() as connection:
            result = await connection.execute(delete(responses).where(condition))
        return bool(result.rowcount)
