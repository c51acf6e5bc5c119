"""Managed keys in memory: what the authenticator reads on every request.

:class:`ManagedKeys` loads every key and team once at start-up, then polls
the database every ``[accounting] key_refresh_seconds`` (0.5 s by default)
for the rows whose ``updated_at`` moved, so a key revoked through any
replica (or the CLI) stops working on every replica within a second, and
no request ever waits on the database. A poll reads the tables only when
the database's change signal (:mod:`gateway.accounting.key_changes`: SQLite's
``data_version``, PostgreSQL's ``LISTEN``) says something may have been
written, or at least every ``safety_seconds`` of the signal: an idle gateway makes no
query twice a second.

Each poll reads back a few seconds before the newest stamp it has seen
(:data:`OVERLAP`): a write stamped just before a poll but committed just
after it, or stamped by a replica whose clock is slightly behind, is still
seen; and it never looks from past this process's own clock, so a replica
whose clock runs ahead cannot hide the others' writes. Applying a row twice
changes nothing (and rebuilds nothing).

If the database cannot be reached, the cache keeps what it has (keys keep
working, revocations wait) and logs it; the next poll that succeeds catches
up on everything missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from gateway.accounting.db import async_url, is_sqlite, open_engine
from gateway.accounting.key_changes import ChangeSignal, change_signal
from gateway.accounting.principal import Principal, Team
from gateway.accounting.store import Changes, KeyRecord, KeyStore, TeamRecord, now
from gateway.accounting.tables import api_keys
from gateway.errors import AuthenticationError, GatewayError
from gateway.settings import AccountingSettings

_log = logging.getLogger(__name__)
OVERLAP = timedelta(seconds=5)
# Between two warnings while the database stays unreachable.
WARN_EVERY_SECONDS = 30.0


def team_of(record: TeamRecord) -> Team:
    return Team(record.id, record.name, record.budget, record.limits)


def principal_of(record: KeyRecord, team: TeamRecord | None) -> Principal:
    return Principal(
        key_id=record.id,
        name=record.name,
        team=None if team is None or team.deleted_at is not None else team_of(team),
        models=None if record.models is None else frozenset(record.models),
        budget=record.budget,
        limits=record.limits,
        expires_at=record.expires_at,
        managed=True,
    )


class KeysUnavailableError(GatewayError):
    """Managed keys are not loaded yet: the database is unreachable (503)."""

    status_code = 503
    error_type = "server_error"
    default_code = "keys_unavailable"


class ManagedKeys:
    """Managed keys by hash, kept current by polling the database."""

    def __init__(
        self, store: KeyStore, refresh_seconds: float = 0.5, signal: ChangeSignal | None = None
    ) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.signal = change_signal(store.engine) if signal is None else signal
        # When the tables were last read in full (time.monotonic()), and
        # whether a read the signal asked for failed (retry it next poll).
        self._read_at = 0.0
        self._stale = True
        self._principals: dict[str, Principal] = {}
        self._records: dict[str, KeyRecord] = {}
        self._teams: dict[str, TeamRecord] = {}
        self._newest: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned_at = 0.0
        # False until the first load from the database succeeds.
        self.loaded = False

    @property
    def exist(self) -> bool:
        """Whether any managed key was ever created (revoked ones count: the
        last key revoked must not open the gateway to everyone). Before the
        keys could be loaded, they may exist: the gateway stays closed."""
        return bool(self._records) or not self.loaded

    def lookup(self, key_hash: str) -> Principal | None:
        """The principal of a managed key's hash; None for a hash that is no
        managed key; 401 for a revoked or expired one; 503 while the keys
        could not be loaded yet (the database is unreachable)."""
        if not self.loaded:
            raise KeysUnavailableError(
                "Managed API keys cannot be checked now: the accounting database has been "
                "unreachable since this server started. Retry shortly.",
                headers={"Retry-After": "1"},
            )
        principal = self._principals.get(key_hash)
        if principal is not None:
            expires = principal.expires_at
            if expires is not None and expires <= now():
                raise AuthenticationError(
                    f"This API key expired at {expires.isoformat()}.", code="expired_api_key"
                )
            return principal
        record = self._records.get(key_hash)
        if record is not None:  # known, not live: revoked
            raise AuthenticationError("This API key has been revoked.", code="revoked_api_key")
        return None

    # ------------------------------------------------------------ refreshing

    async def start(self) -> None:
        """Everything loaded, then polled. With the database unreachable the
        server still starts (as the ledger does): static keys work, managed
        keys get 503 and the gateway stays closed until a poll loads them."""
        # Watching before the first read: nothing written in between is missed.
        await self.signal.start()
        try:
            await self.refresh()
        except Exception as error:
            _log.warning("managed keys: cannot load them from the database yet: %s", error)
            self._warned_at = time.monotonic()
        self._task = asyncio.create_task(self._poll(), name="nomoat-key-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.signal.aclose()

    async def refresh(self) -> None:
        since = None
        if self._newest is not None:
            # Never past this clock: a row stamped by a replica whose clock
            # runs ahead must not hide the writes of the others.
            since = min(self._newest, now()) - OVERLAP
        self._read_at = time.monotonic()
        self._stale = True  # until this read succeeds
        self.apply(await self.store.changed_since(since))
        self.loaded = True
        self._stale = False

    def _due(self) -> bool:
        """Whether this poll reads the tables (the signal is asked every
        poll, so that it resets even when a read is due anyway)."""
        changed = self.signal.changed()
        overdue = time.monotonic() - self._read_at >= self.signal.safety_seconds
        return changed or overdue or self._stale or not self.loaded

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            if not self._due():
                continue
            try:
                await self.refresh()
            except Exception as error:  # the database is away: keep what we have
                if time.monotonic() - self._warned_at > WARN_EVERY_SECONDS:
                    self._warned_at = time.monotonic()
                    _log.warning("managed keys: cannot refresh from the database: %s", error)

    def apply(self, changes: Changes) -> None:
        """The changed rows into the cache (idempotent: the rows each poll
        reads again, within the overlap, change nothing and cost no rebuild)."""
        changed_teams = set()
        for team in changes.teams:
            if self._teams.get(team.id) != team:
                self._teams[team.id] = team
                changed_teams.add(team.id)
        for record in changes.keys:
            if self._records.get(record.key_hash) == record:
                continue
            self._records[record.key_hash] = record
            self._place(record)
        if changed_teams:
            for record in self._records.values():
                if record.team_id in changed_teams:
                    self._place(record)
        newest = changes.newest
        if newest is not None and (self._newest is None or newest > self._newest):
            self._newest = newest

    def _place(self, record: KeyRecord) -> None:
        if record.revoked_at is not None:
            self._principals.pop(record.key_hash, None)
            return
        team = self._teams.get(record.team_id) if record.team_id else None
        self._principals[record.key_hash] = principal_of(record, team)


def managed_keys_exist(settings: AccountingSettings) -> bool:
    """Whether the accounting database holds any managed key, read once
    before start-up (blocking); False when accounting is off or the
    database cannot be read (no schema yet, unreachable)."""
    if not settings.enabled:
        return False
    url = async_url(settings.database)
    if is_sqlite(url) and not (url.database and Path(url.database).is_file()):
        return False  # (and no empty file left in the user's data directory)

    async def count() -> int:
        engine = open_engine(url)
        try:
            async with engine.connect() as connection:
                found = await connection.scalar(select(func.count()).select_from(api_keys))
                return int(found or 0)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(count()) > 0
    except Exception:  # what the refusal then says is still true: no key is known
        return False
