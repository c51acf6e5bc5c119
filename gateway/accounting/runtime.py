"""The accounting runtime: what the server holds for cost accounting while it
runs, started and stopped with it.

The app owns one :class:`Accounting` (``Runtime.accounting``, None when
``[accounting] enabled = false``). It holds the database engine and the
ledger; the keys, limits and prices plug in beside them (each a field set in
:meth:`Accounting.start`, each stopped by the same exit stack). The HTTP
handlers reach it through the observer: :meth:`Accounting.ended` hears of
every request once, when its exchange closes.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.accounting.db import (
    async_url,
    default_database_path,
    is_sqlite,
    migrate_async,
    open_engine,
)
from gateway.accounting.key_changes import change_signal
from gateway.accounting.keys import ManagedKeys
from gateway.accounting.ledger import Ledger, LedgerOptions, UsageRecord
from gateway.accounting.sqlite_file import SqliteFile, sqlite_path
from gateway.accounting.store import KeyStore
from gateway.exchange import Exchange
from gateway.settings import AccountingSettings

_log = logging.getLogger(__name__)
SPILL_FILE = "ledger-unwritten.jsonl"


@dataclass
class Accounting:
    """The accounting database and the ledger (and, as they land, the key
    cache, the admission gate and the price book)."""

    settings: AccountingSettings
    url: URL
    engine: AsyncEngine
    ledger: Ledger
    # Managed keys and teams, in memory, polled (gateway/accounting/keys.py).
    keys: ManagedKeys

    @classmethod
    async def start(cls, settings: AccountingSettings, stack: AsyncExitStack) -> Accounting:
        """Migrate (if asked), open the engine, start the ledger's writer;
        ``stack`` stops them in reverse: the ledger flushes before the
        engine is disposed."""
        url = async_url(settings.database)
        if settings.migrate_on_start:
            try:
                await migrate_async(url)
            except Exception as error:
                # The server does not start: say why in one line before the traceback.
                _log.error(
                    "accounting: cannot migrate %s: %s. Start it once the database is "
                    "reachable, or set [accounting] migrate_on_start = false (the gateway "
                    "then serves and keeps its ledger rows until the database is back)",
                    url.render_as_string(hide_password=True),
                    error,
                )
                raise
        engine = open_engine(url)
        stack.push_async_callback(engine.dispose)
        # A SQLite file: the ledger's batches and the key cache's change
        # signal share one plain connection (closed after the last flush).
        path = sqlite_path(url) if is_sqlite(url) else None
        file = SqliteFile(path) if path is not None else None
        if file is not None:
            stack.callback(file.close)
        ledger = Ledger(engine, ledger_options(settings, url), file)
        await ledger.start()
        stack.push_async_callback(ledger.aclose)
        keys = ManagedKeys(
            KeyStore(engine), settings.key_refresh_seconds, change_signal(engine, file)
        )
        await keys.start()
        stack.push_async_callback(keys.aclose)
        _log.info("accounting: ledger in %s", url.render_as_string(hide_password=True))
        return cls(settings, url, engine, ledger, keys)

    def ended(self, exchange: Exchange, status: int, error: str | None) -> None:
        """A request is over (answered, refused, failed or abandoned): its
        one ledger record. (Called once per exchange, on the request path:
        no I/O here.)"""
        self.ledger.record(UsageRecord.of(exchange, status, error))


def ledger_options(settings: AccountingSettings, url: URL) -> LedgerOptions:
    return LedgerOptions(
        batch_size=settings.ledger_batch_size,
        flush_seconds=settings.ledger_flush_seconds,
        max_pending=settings.ledger_max_pending,
        spill_path=spill_path(settings, url),
    )


def spill_path(settings: AccountingSettings, url: URL) -> Path:
    """Where unwritten records go at shutdown: the setting, else beside the
    SQLite file, else in the user's data directory."""
    if settings.ledger_spill:
        return Path(settings.ledger_spill)
    if url.get_backend_name() == "sqlite" and url.database:
        return Path(url.database).parent / SPILL_FILE
    return default_database_path().parent / SPILL_FILE
