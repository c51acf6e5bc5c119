"""The real PostgreSQL and Redis the accounting tests use, and the schema's
migrations on PostgreSQL."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis

from gateway.accounting.db import async_url, migrate
from tests.fast.test_accounting_db import TABLES

pytestmark = pytest.mark.e2e


async def _tables(url: str) -> set[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("select tablename from pg_tables where schemaname = 'public'")
    finally:
        await connection.close()
    return {row[0] for row in rows}


def test_migrations_create_the_schema_on_postgresql(postgres_url: str) -> None:
    assert not asyncio.run(_tables(postgres_url)) & TABLES
    migrate(async_url(postgres_url))
    migrate(async_url(postgres_url))
    assert asyncio.run(_tables(postgres_url)) >= TABLES


def test_each_test_gets_an_empty_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set("written", 1)
        assert client.get("written") == b"1"
    finally:
        client.close()


def _migrate(url: str) -> None:
    migrate(async_url(url))


def _migrate_together(url: str, processes: int = 4) -> list[int | None]:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_migrate, args=(url,)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    return [worker.exitcode for worker in workers]


def test_replicas_migrating_one_new_postgresql_together_all_start(postgres_url: str) -> None:
    """One migrates under an advisory lock; the others wait and find it done
    (without the lock, the losers fail on tables that now exist)."""
    assert _migrate_together(postgres_url) == [0, 0, 0, 0]
    assert asyncio.run(_tables(postgres_url)) >= TABLES


def test_workers_migrating_one_new_sqlite_file_together_all_start(tmp_path: Path) -> None:
    assert _migrate_together(f"sqlite:///{tmp_path / 'shared.db'}") == [0, 0, 0, 0]
