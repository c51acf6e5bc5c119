"""The key cache's poll on PostgreSQL (gateway/accounting/key_changes.py):
no query while nothing is written (LISTEN), a write through another
replica's store read within a poll (NOTIFY), and polling as before while
the listening connection is down, until it listens again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import pytest
from sqlalchemy import text

from gateway.accounting.db import async_url, migrate, open_engine
from gateway.accounting.key_changes import PostgresNotifications
from gateway.accounting.keys import ManagedKeys
from gateway.accounting.store import Changes, KeyStore, NewKey
from gateway.auth import hash_api_key
from gateway.errors import AuthenticationError

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


class _CountingStore(KeyStore):
    """The real store, counting the full reads of the poll."""

    reads = 0

    async def changed_since(self, since: datetime | None) -> Changes:
        self.reads += 1
        return await super().changed_since(since)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[tuple[KeyStore, _CountingStore]]:
    """The admin's store and a replica's counting store, on two engines."""
    url = async_url(postgres_url)
    await asyncio.to_thread(migrate, url)
    admin, replica = open_engine(url), open_engine(url)
    yield KeyStore(admin), _CountingStore(replica)
    await admin.dispose()
    await replica.dispose()


async def _until_refused(cache: ManagedKeys, secret: str) -> None:
    for _ in range(100):
        try:
            cache.lookup(hash_api_key(secret))
        except AuthenticationError:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the revocation did not reach the replica within 1 s")


@asynccontextmanager
async def _replica(store: _CountingStore) -> AsyncIterator[ManagedKeys]:
    """A replica's key cache on ``store``, polling every 10 ms while open."""
    replica = ManagedKeys(store, refresh_seconds=0.01)
    await replica.start()
    try:
        yield replica
    finally:
        await replica.aclose()


async def _idle(store: _CountingStore) -> int:
    """Its reads so far, once 0.1 s (ten polls) added none."""
    reads = store.reads
    await asyncio.sleep(0.1)
    assert store.reads == reads
    return reads


async def test_an_idle_replica_reads_nothing_and_hears_a_revocation(
    stores: tuple[KeyStore, _CountingStore],
) -> None:
    admin, replica_store = stores
    record, secret = await admin.create_key(NewKey("pg-idle"))
    async with _replica(replica_store) as replica:
        assert isinstance(replica.signal, PostgresNotifications)
        await asyncio.sleep(0.1)  # ten polls; the first may still read once
        assert replica_store.reads <= 2
        reads = await _idle(replica_store)
        await admin.revoke_key(record.id)
        await _until_refused(replica, secret)
        assert replica_store.reads > reads


async def test_a_lost_listener_polls_until_it_listens_again(
    stores: tuple[KeyStore, _CountingStore],
) -> None:
    admin, replica_store = stores
    record, secret = await admin.create_key(NewKey("pg-lost"))
    async with _replica(replica_store) as replica:
        async with admin.engine.begin() as connection:
            killed = await connection.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            )
        assert killed == 1
        await admin.revoke_key(record.id)
        await _until_refused(replica, secret)
        signal = replica.signal
        assert isinstance(signal, PostgresNotifications)
        for _ in range(100):  # listening again, and then idle again
            if signal.listening:
                break
            await asyncio.sleep(0.01)
        assert signal.listening
        await asyncio.sleep(0.05)
        await _idle(replica_store)
