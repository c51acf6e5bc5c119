"""Alembic's environment for the accounting schema (async engines)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from gateway.accounting.db import open_engine
from gateway.accounting.tables import metadata

# Any fixed 64-bit number, the same in every process: "nomoat" in ASCII.
_LOCK_KEY = 0x6E6F6D6F6174


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite alters tables by copying them; Alembic's batch mode does it.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together on one database: one migrates, the
            # others wait here, then find nothing left to do (the lock ends
            # with the transaction). SQLite: gateway.accounting.db.migrate
            # holds a file lock instead.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        context.run_migrations()


async def _online() -> None:
    url = make_url(context.config.get_main_option("sqlalchemy.url") or "")
    engine = open_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


asyncio.run(_online())
