"""The store of Responses (gateway/openai_responses/store.py): who may see
a Response, its expiry, and each owner's bounds, kept alike by the in-memory
store (accounting off) and by the ``responses`` table on real SQLite and
real PostgreSQL (migrated by Alembic to head; migration 0003 sizes the rows
0002 stored). And the app's one store, swept while it runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlalchemy import delete, func, insert, select

from gateway.accounting.db import async_url, migrate, migrate_async, open_engine
from gateway.accounting.tables import responses
from gateway.app import Runtime, create_app
from gateway.catalog import Catalog, Plan
from gateway.openai_responses.store import (
    MemoryResponseStore,
    ResponseStore,
    SqlResponseStore,
    StoredResponse,
)
from gateway.settings import ResponsesSettings, Settings

T0 = 1_796_000_000
BOUNDS = ResponsesSettings(ttl_seconds=100, max_per_key=3, max_bytes_per_key=1024)
STORES = [
    "memory",
    pytest.param("sqlite", marks=pytest.mark.e2e),
    # PostgreSQL runs as a server: not part of the fast layer.
    pytest.param("postgresql", marks=pytest.mark.e2e),
]


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


def stored(
    response_id: str, owner: str | None, created_at: int = T0, size: int = 100
) -> StoredResponse:
    """A Response of ``size`` bytes in all (conversation and response)."""
    response = b'{"id":"%s","object":"response"}' % response_id.encode()
    # Two bytes each: what the table must count is bytes, not characters.
    text_bytes = size - len(response) - len(b'[{"role":"user","content":""}]')
    conversation = b'[{"role":"user","content":"%s"}]' % ("\u00e9" * (text_bytes // 2)).encode()
    conversation += b" " * (text_bytes % 2)
    return StoredResponse(response_id, owner, created_at, "m", None, conversation, response)


def database_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))


@asynccontextmanager
async def opened(
    kind: str, clock: Clock, url: str
) -> AsyncIterator[tuple[ResponseStore, Callable[[], Awaitable[int]]]]:
    """An empty store of ``kind``, and how many Responses it holds."""
    if kind == "memory":
        memory = MemoryResponseStore(BOUNDS, clock=clock)

        async def held() -> int:
            return len(memory)

        yield memory, held
        return
    await migrate_async(async_url(url))
    engine = open_engine(async_url(url))
    async with engine.begin() as connection:
        await connection.execute(delete(responses))

    async def rows() -> int:
        async with engine.connect() as connection:
            count = select(func.count()).select_from(responses)
            return int((await connection.execute(count)).scalar_one())

    try:
        yield SqlResponseStore(engine, BOUNDS, clock), rows
    finally:
        await engine.dispose()


async def ownership(store: ResponseStore) -> None:
    await store.save(stored("resp_a", "key-a"))
    await store.save(stored("resp_open", None))
    assert await store.find("resp_a", "key-a") == stored("resp_a", "key-a")
    # Another key, or no key at all, cannot see key-a's Response.
    assert await store.find("resp_a", "key-b") is None
    assert await store.find("resp_a", None) is None
    assert not await store.delete("resp_a", "key-b")
    assert not await store.delete("resp_a", None)
    # Stored without keys: anyone's.
    assert await store.find("resp_open", "key-b") is not None
    assert await store.delete("resp_a", "key-a")
    assert await store.find("resp_a", "key-a") is None
    assert not await store.delete("resp_a", "key-a")


async def bounds(store: ResponseStore, clock: Clock, held: Callable[[], Awaitable[int]]) -> None:
    async def kept(owner: str | None, *ids: str) -> list[str]:
        return [i for i in ids if await store.find(i, owner) is not None]

    await store.save(stored("resp_b1", "key-b", T0))
    await store.save(stored("resp_n1", None, T0 + 1))
    # max_per_key 3: key-a's fourth deletes its first; key-b's and the
    # keyless one stay.
    for i in range(1, 5):
        await store.save(stored(f"resp_a{i}", "key-a", T0 + i))
    assert await kept("key-a", "resp_a1", "resp_a2", "resp_a3", "resp_a4") == [
        "resp_a2",
        "resp_a3",
        "resp_a4",
    ]
    assert await kept("key-b", "resp_b1", "resp_n1") == ["resp_b1", "resp_n1"]
    # max_bytes_per_key 1024: 100 + 100 + 700 fit (a2 goes by count), then
    # 300 more do not: a3 goes by count, a4 by bytes.
    await store.save(stored("resp_a5", "key-a", T0 + 5, size=700))
    await store.save(stored("resp_a6", "key-a", T0 + 6, size=300))
    assert await kept("key-a", *(f"resp_a{i}" for i in range(1, 7))) == ["resp_a5", "resp_a6"]
    assert await held() == 4
    # ttl_seconds 100: created at T0, gone (to find and to delete) at T0 + 100,
    # before any sweep; the sweep then deletes the row.
    clock.now = T0 + 100
    assert await store.find("resp_b1", "key-b") is None
    assert not await store.delete("resp_b1", "key-b")
    assert await kept("key-a", "resp_n1", "resp_a5") == ["resp_n1", "resp_a5"]
    assert await store.sweep() == 1
    assert await held() == 3
    clock.now = T0 + 106
    assert await store.sweep() == 3
    assert await held() == 0


@pytest.mark.parametrize("kind", STORES)
def test_owners_expiry_and_bounds(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = "" if kind == "memory" else database_url(kind, tmp_path, request)

    async def run() -> None:
        async with opened(kind, Clock(), url) as (store, _):
            await ownership(store)
        clock = Clock()
        async with opened(kind, clock, url) as (store, held):
            await bounds(store, clock, held)

    asyncio.run(run())


def test_the_memory_store_keeps_its_capacity_in_all() -> None:
    async def run() -> None:
        store = MemoryResponseStore(BOUNDS, capacity=4, clock=Clock())
        for i in range(6):
            await store.save(stored(f"resp_{i}", f"key-{i}", T0 + i))
        assert len(store) == 4
        assert await store.find("resp_1", "key-1") is None
        assert await store.find("resp_2", "key-2") is not None

    asyncio.run(run())


@pytest.mark.e2e
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_migration_0003_sizes_the_rows_stored_before(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'before.db'}"
        if database == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    before = stored("resp_old", "key-a", size=300)
    migrate(async_url(url), "0002_responses")

    async def insert_as_0002() -> None:
        engine = open_engine(async_url(url))
        try:
            async with engine.begin() as connection:
                # The columns 0002 has (size comes with 0003).
                await connection.execute(
                    insert(responses).values(
                        id=before.id,
                        owner=before.owner,
                        created_at=datetime.fromtimestamp(before.created_at, UTC),
                        model=before.model,
                        conversation=before.conversation.decode(),
                        response=before.response.decode(),
                    )
                )
        finally:
            await engine.dispose()

    async def sized() -> int:
        engine = open_engine(async_url(url))
        try:
            async with engine.connect() as connection:
                return int((await connection.execute(select(responses.c.size))).scalar_one())
        finally:
            await engine.dispose()

    asyncio.run(insert_as_0002())
    migrate(async_url(url))
    assert asyncio.run(sized()) == 300


def test_the_app_holds_one_store_and_sweeps_it() -> None:
    """Built at start-up, held by the runtime: what the handlers read, and
    what the sweep empties of expired Responses while the app runs."""
    settings = Settings(
        accounting={"enabled": False},  # type: ignore[arg-type]
        responses={"sweep_seconds": 0.01},  # type: ignore[arg-type]
        backends={},
        models={},
    )
    runtime = Runtime(settings, Plan((), Catalog({})))
    with TestClient(create_app(runtime)) as client:
        store = runtime.responses
        assert isinstance(store, MemoryResponseStore)
        now = int(time.time())
        client.blocking_portal.call(store.save, stored("resp_kept", None, now))
        assert client.get("/v1/responses/resp_kept").json()["id"] == "resp_kept"
        expired = now - int(settings.responses.ttl_seconds) - 1
        client.blocking_portal.call(store.save, stored("resp_expired", None, expired))
        deadline = time.monotonic() + 5
        while len(store) > 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(store) == 1
        assert client.get("/v1/responses/resp_expired").status_code == 404
