"""The accounting schema the migrations build is the one
gateway/accounting/tables.py describes, on SQLite and on PostgreSQL.

Revision 0001 spells its tables out rather than creating tables.py's (which
later revisions change), so a change to tables.py without a migration of its
own fails here."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.engine import make_url

from gateway.accounting.db import async_url, migrate, open_engine
from gateway.accounting.tables import metadata
from tests.services import fresh_database

# PostgreSQL runs as a server: not part of the fast layer.
pytestmark = pytest.mark.e2e


def differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def described(connection: Connection) -> dict[str, Any]:
    """What autogenerate does not compare: each column's server default
    (PostgreSQL's sequences behind the ids) and each index's options."""
    inspector = inspect(connection)
    tables = sorted(name for name in inspector.get_table_names() if name != "alembic_version")
    return {
        table: (
            [
                (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                for c in inspector.get_columns(table)
            ],
            sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    bool(i["unique"]),
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in inspector.get_indexes(table)
            ),
            inspector.get_pk_constraint(table),
            sorted(u["name"] for u in inspector.get_unique_constraints(table)),
            inspector.get_foreign_keys(table),
        )
        for table in tables
    }


async def inspected(url: str) -> tuple[list[Any], dict[str, Any]]:
    engine = open_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            return (
                await connection.run_sync(differences),
                await connection.run_sync(described),
            )
    finally:
        await engine.dispose()


async def created(url: str) -> dict[str, Any]:
    """The schema tables.py creates by itself."""
    engine = open_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            return await connection.run_sync(described)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_migrations_build_what_tables_py_describes(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if database == "sqlite":
        migrated, reference = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b"))
    else:
        server = request.getfixturevalue("postgres_server")
        migrated, reference = fresh_database(server), fresh_database(server)
    migrate(async_url(migrated))
    found, shape = asyncio.run(inspected(migrated))
    assert found == []
    assert shape == asyncio.run(created(reference))
    assert make_url(migrated).get_backend_name() == database
