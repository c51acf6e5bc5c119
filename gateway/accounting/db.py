"""The accounting database: one seam for SQLite and PostgreSQL.

SQLAlchemy Core with an async driver (aiosqlite, asyncpg) reads and writes;
Alembic (gateway/accounting/migrations) owns the schema. ``[accounting]
database`` names it as a user would (``sqlite:///PATH`` or
``postgresql://...``); :func:`async_url` adds the driver. An empty setting is
SQLite in the user's data directory, so one process needs nothing set up.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DATABASE_FILE = "accounting.db"


class DatabaseUrlError(ValueError):
    """A ``database`` setting nomoat cannot use, with what to write instead."""


def default_database_path() -> Path:
    """``$XDG_DATA_HOME/nomoat/accounting.db``, else under ``~/.local/share``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nomoat" / DATABASE_FILE


def async_url(setting: str) -> URL:
    """The SQLAlchemy URL, with its async driver, of a ``database`` setting."""
    if not setting:
        path = default_database_path()
        return make_url(f"sqlite+aiosqlite:///{path}")
    try:
        url = make_url(setting)
    except Exception as error:
        raise DatabaseUrlError(f"accounting.database: not a URL ({error})") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        if importlib.util.find_spec("asyncpg") is None:
            raise DatabaseUrlError(
                "accounting.database: PostgreSQL needs the postgres extra: "
                "pip install 'nomoat[postgres]'"
            )
        return url.set(drivername="postgresql+asyncpg")
    raise DatabaseUrlError(
        f"accounting.database: {backend!r} is not supported; "
        'use "sqlite:///PATH" or "postgresql://USER:PASSWORD@HOST:PORT/DB"'
    )


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def open_engine(url: URL) -> AsyncEngine:
    """An async engine; SQLite in WAL mode with a busy timeout, so several
    worker processes and the ledger's writer can share one file."""
    if is_sqlite(url):
        if url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)


def _sqlite_pragmas(connection: object, _record: object) -> None:
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(url: URL) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config interpolates %; a password may hold one.
    config.set_main_option(
        "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return config


def migrate(url: URL, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (blocking: call it in a thread
    from async code, or from the CLI)."""
    if not (is_sqlite(url) and url.database):
        command.upgrade(alembic_config(url), revision)
        return
    database = Path(url.database)
    database.parent.mkdir(parents=True, exist_ok=True)
    # Workers (`serve --workers N`) starting together on one SQLite file:
    # one migrates, the others wait, then find nothing left to do.
    with (database.parent / f"{database.name}.migrate-lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            command.upgrade(alembic_config(url), revision)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def migrate_async(url: URL) -> None:
    """:func:`migrate` off the event loop (Alembic runs its own loop)."""
    await asyncio.to_thread(migrate, url)
