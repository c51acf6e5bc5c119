"""The Responses store on a real PostgreSQL (what replicas share): migrated
by Alembic to head (0002 creates the table), then written and read through
the same store the gateway uses, with key ownership."""

from __future__ import annotations

import asyncio

import pytest

from gateway.accounting.db import async_url, migrate_async, open_engine
from gateway.openai_responses.store import SqlResponseStore, StoredResponse

pytestmark = pytest.mark.e2e


def stored(response_id: str, owner: str | None) -> StoredResponse:
    return StoredResponse(
        id=response_id,
        owner=owner,
        created_at=1_796_000_000,
        model="m",
        previous_response_id=None,
        conversation=b'[{"role":"user","content":"Hi \\u00e9"}]',
        response=b'{"id":"%s","object":"response"}' % response_id.encode(),
    )


async def exercise(url: str) -> None:
    await migrate_async(async_url(url))
    engine = open_engine(async_url(url))
    try:
        store = SqlResponseStore(engine)
        await store.save(stored("resp_a", "key-a"))
        await store.save(stored("resp_open", None))
        found = await store.find("resp_a", "key-a")
        assert found == stored("resp_a", "key-a")
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
    finally:
        await engine.dispose()


def test_the_store_on_postgresql(postgres_url: str) -> None:
    asyncio.run(exercise(postgres_url))
