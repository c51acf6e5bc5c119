"""One plain ``sqlite3`` connection to a SQLite accounting file, shared by the
ledger's writer and the key cache's change signal.

- **The ledger's batches** go through it (:meth:`SqliteFile.write`): one
  prepared ``INSERT`` and the driver's ``executemany`` of plain tuples in one
  transaction, in one hand-off to a thread. Through SQLAlchemy's engine and
  aiosqlite a batch took a pool checkout, a ``BEGIN``, the statement and the
  ``COMMIT``, each a hand-off to aiosqlite's thread and back, and the
  connection's reset on return to the pool. (SQLAlchemy still owns the
  schema through Alembic, and every other query.)
- **The key cache's signal** (:mod:`gateway.accounting.key_changes`) reads
  ``PRAGMA data_version`` on it. That value moves when *another* connection
  commits (the admin API, the CLI, another worker, a hand-made ``UPDATE``),
  never for this connection's own commits: the ledger's batches no longer
  make the cache read the key tables again after each of them.

The connection is used by one thread at a time (a lock): the writer holds it
for its transaction; the signal never waits for it on the event loop, and
answers "may have changed" while a batch is being written. It waits on no
other process's lock either (a busy timeout of 0, as the signal had on its
own connection), except while writing, in the writer's thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from urllib.parse import quote

from sqlalchemy.engine import URL

# How long a batch waits for another connection's write lock (in its thread),
# as the engine's connections do (gateway/accounting/db.py).
WRITE_BUSY_MS = 30_000


def sqlite_path(url: URL) -> str | None:
    """The file of a SQLite URL; None for an in-memory database or a URI."""
    path = url.database
    if path and path != ":memory:" and not path.startswith("file:"):
        return path
    return None


class SqliteFile:
    """The shared connection (opened at first use, never creating the file:
    that is the migration's)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # Connections opened so far: a data_version is only comparable with
        # one read on the same connection.
        self._opened = 0

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            # isolation_level=None: the transactions are this module's own.
            # timeout=0: the signal never waits on a lock on the event loop
            # (the writer sets one while it writes, in its thread). mode=rw:
            # never create the file (that is the migration's).
            connection = sqlite3.connect(
                f"file:{quote(self.path)}?mode=rw",
                uri=True,
                timeout=0,
                isolation_level=None,
                check_same_thread=False,
            )
            connection.execute("PRAGMA synchronous=NORMAL")
            self._connection = connection
            self._opened += 1
        return self._connection

    def data_version(self) -> tuple[int, int] | None:
        """``PRAGMA data_version`` with the number of the connection it was
        read on, or None when it cannot be read now (a batch is being
        written, or the file cannot be opened)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            row = self._connected().execute("PRAGMA data_version").fetchone()
            return self._opened, int(row[0])
        except sqlite3.Error:
            self._close()
            return None
        finally:
            self._lock.release()

    async def write(self, statement: str, rows: Sequence[tuple[object, ...]]) -> None:
        """``statement`` for each of ``rows``, in one transaction, in a thread."""
        await asyncio.get_running_loop().run_in_executor(None, self._write, statement, rows)

    def _write(self, statement: str, rows: Sequence[tuple[object, ...]]) -> None:
        with self._lock:
            connection = self._connected()
            connection.execute(f"PRAGMA busy_timeout={WRITE_BUSY_MS}")
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    connection.executemany(statement, rows)
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
            except sqlite3.Error:
                # Opened again at the next use (the file may have changed).
                self._close()
                raise
            finally:
                if self._connection is not None:
                    self._connection.execute("PRAGMA busy_timeout=0")

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None

    def close(self) -> None:
        with self._lock:
            self._close()
