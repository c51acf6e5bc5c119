"""Whether the managed keys and teams may have changed: what lets the key
cache's poll (:mod:`gateway.accounting.keys`) skip its queries when nothing
was written.

The cache polls every ``key_refresh_seconds`` (0.5 s), so that a revocation
reaches every replica within a second. Reading the two tables each time cost
an idle gateway two queries twice a second (about a million instructions a
poll through SQLAlchemy). A signal here answers "may a refresh find
anything?" for almost nothing, and the cache reads the tables only then:

- SQLite: ``PRAGMA data_version``, which changes when any other connection
  (another worker, the admin API, the CLI, a hand-made write) commits to
  the file. A few microseconds, no lock taken in
  WAL mode, so it runs on the event loop. It is read on the ledger's own
  connection (:mod:`gateway.accounting.sqlite_file`), so the ledger's
  batches do not move it: before, a busy gateway read the keys again after
  each of them.
- PostgreSQL: ``LISTEN`` on a connection of its own; every write of the key
  store sends a ``NOTIFY`` in its transaction (delivered at commit). While
  that connection is down (or before it is up), every poll reads the tables,
  as before.

A signal may say "changed" when nothing did (a refresh then finds nothing);
it must never miss a change. As a further safety, the cache reads the tables
at least every ``safety_seconds`` of its signal whatever the signal says:
10 s on PostgreSQL (a write made by hand in SQL sends no NOTIFY), 60 s on
SQLite, whose counter sees every commit, by hand or not (it would miss only
a database file replaced under a running gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.accounting.sqlite_file import SqliteFile, sqlite_path

_log = logging.getLogger(__name__)
POSTGRES_SAFETY_SECONDS = 10.0
SQLITE_SAFETY_SECONDS = 60.0
# The PostgreSQL channel the key store notifies on every write.
CHANNEL = "nomoat_keys"


class ChangeSignal(Protocol):
    # The longest the cache goes without reading the tables.
    safety_seconds: float

    async def start(self) -> None:
        """Watching from now on (call it before the first full read)."""

    def changed(self) -> bool:
        """Whether anything may have been written since the previous call
        (True on the first call)."""

    async def aclose(self) -> None: ...


class AlwaysChanged:
    """No cheap signal (an in-memory SQLite database): read every poll."""

    safety_seconds = 0.0

    async def start(self) -> None:
        return None

    def changed(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class SqliteDataVersion:
    """``PRAGMA data_version`` of a connection to the file: the ledger's own
    (:class:`~gateway.accounting.sqlite_file.SqliteFile`), whose batches then
    do not count as changes."""

    safety_seconds = SQLITE_SAFETY_SECONDS

    def __init__(self, file: SqliteFile, owned: bool = False) -> None:
        self.file = file
        # Whether closing the signal closes the file (not the ledger's).
        self.owned = owned
        self._version: tuple[int, int] | None = None

    async def start(self) -> None:
        self.changed()

    def changed(self) -> bool:
        version = self.file.data_version()
        if version is None:
            # Being written (or unreadable): may have changed; the value
            # read next is compared with the last one read.
            return True
        changed = version != self._version
        self._version = version
        return changed

    async def aclose(self) -> None:
        # (The ledger's file is closed after its last flush.)
        if self.owned:
            self.file.close()


class PostgresNotifications:
    """``LISTEN nomoat_keys`` on a connection held from the engine's pool."""

    safety_seconds = POSTGRES_SAFETY_SECONDS

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._connection: AsyncConnection | None = None
        # True until listening, and again whenever a notification came or
        # the listening connection was lost.
        self._pending = True
        self._listening = False
        self._attempt: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._listen()

    @property
    def listening(self) -> bool:
        return self._listening

    def changed(self) -> bool:
        if not self._listening:
            # Down: read every poll, and try to listen again meanwhile.
            if self._attempt is None or self._attempt.done():
                self._attempt = asyncio.get_running_loop().create_task(self._listen())
            return True
        pending, self._pending = self._pending, False
        return pending

    async def _listen(self) -> None:
        if self._listening or self._connection is not None:
            return
        connection: AsyncConnection | None = None
        try:
            connection = await self.engine.connect()
            self._connection = connection
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.add_listener(CHANNEL, self._notified)
            driver.add_termination_listener(self._lost)
        except Exception as error:
            _log.debug("managed keys: cannot listen for changes: %s", error)
            self._connection = None
            if connection is not None:
                await _close_quietly(connection)
            return
        self._listening = True
        # Anything written before LISTEN took effect was not notified.
        self._pending = True

    def _notified(self, *_args: object) -> None:
        self._pending = True

    def _lost(self, *_args: object) -> None:
        self._listening = False
        self._pending = True
        connection, self._connection = self._connection, None
        if connection is not None and (self._attempt is None or self._attempt.done()):
            self._attempt = asyncio.get_running_loop().create_task(_close_quietly(connection))

    async def aclose(self) -> None:
        self._listening = False
        if self._attempt is not None:
            self._attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._attempt
        connection, self._connection = self._connection, None
        if connection is not None:
            await _close_quietly(connection)


async def _close_quietly(connection: AsyncConnection) -> None:
    try:
        await connection.invalidate()
        await connection.close()
    except Exception as error:  # closing a dead connection: nothing to keep
        _log.debug("managed keys: closing the listening connection: %s", error)


def change_signal(engine: AsyncEngine, file: SqliteFile | None = None) -> ChangeSignal:
    """The cheapest signal the engine's database offers (for a SQLite file,
    through ``file``, the ledger's connection, else one of its own)."""
    url: URL = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        if file is not None:
            return SqliteDataVersion(file)
        path = sqlite_path(url)
        if path is not None:
            return SqliteDataVersion(SqliteFile(path), owned=True)
        return AlwaysChanged()
    if backend == "postgresql" and url.get_driver_name() == "asyncpg":
        return PostgresNotifications(engine)
    return AlwaysChanged()
