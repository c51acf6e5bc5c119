"""Managed API keys and teams in the accounting database.

The admin API and the CLI write through :class:`KeyStore`; every gateway
process reads it into its in-memory cache (:mod:`gateway.accounting.keys`)
and then polls it for rows whose ``updated_at`` moved. Nothing is ever
deleted: a revoked key keeps its row (``revoked_at``), so its ledger rows
still name something, and a deleted team too (``deleted_at``). Every write
stamps ``updated_at``, which is what the replicas poll.

Keys are never stored: a new key is random, shown once, and stored as
:func:`gateway.auth.hash_api_key` hashes it, so the authenticator finds it
by the same hash it computes for static keys.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Row, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.accounting.key_changes import CHANNEL
from gateway.accounting.principal import Budget, BudgetPeriod, RateLimits
from gateway.accounting.tables import api_keys, teams
from gateway.auth import hash_api_key
from gateway.errors import InvalidRequestError, NotFoundError

KEY_PREFIX = "sk-nomoat-"
# 32 random bytes: as much entropy as the hash that stores it can hold.
KEY_BYTES = 32
PERIODS: tuple[BudgetPeriod, ...] = ("day", "month", "total")


def utc(moment: datetime | None) -> datetime | None:
    """A database time as an aware UTC datetime (SQLite gives naive ones back)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class NewTeam:
    name: str
    budget: Budget | None = None
    limits: RateLimits = field(default_factory=RateLimits)


@dataclass(frozen=True, slots=True)
class NewKey:
    name: str
    # A team's id or name.
    team: str | None = None
    models: tuple[str, ...] | None = None
    budget: Budget | None = None
    limits: RateLimits = field(default_factory=RateLimits)
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TeamRecord:
    id: str
    name: str
    budget: Budget | None
    limits: RateLimits
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    key_hash: str
    name: str
    team_id: str | None
    models: tuple[str, ...] | None
    budget: Budget | None
    limits: RateLimits
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None = None

    def expired(self, at: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= at


@dataclass(frozen=True, slots=True)
class Changes:
    """Rows written since a poll's ``since`` (and the newest stamp among them)."""

    teams: Sequence[TeamRecord]
    keys: Sequence[KeyRecord]

    @property
    def newest(self) -> datetime | None:
        stamps = [t.updated_at for t in self.teams] + [k.updated_at for k in self.keys]
        return max(stamps, default=None)


def _budget(nano: int | None, period: str | None) -> Budget | None:
    if nano is None:
        return None
    return Budget(nano, period if period in PERIODS else "total")


def _team(row: Row[tuple[object, ...]]) -> TeamRecord:
    fields = row._mapping
    return TeamRecord(
        id=fields["id"],
        name=fields["name"],
        budget=_budget(fields["budget_nano"], fields["budget_period"]),
        limits=RateLimits(fields["rpm"], fields["tpm"]),
        created_at=_aware(fields["created_at"]),
        updated_at=_aware(fields["updated_at"]),
        deleted_at=utc(fields["deleted_at"]),
    )


def _key(row: Row[tuple[object, ...]]) -> KeyRecord:
    fields = row._mapping
    models = fields["models"]
    return KeyRecord(
        id=fields["id"],
        key_hash=fields["key_hash"],
        name=fields["name"],
        team_id=fields["team_id"],
        models=None if models is None else tuple(str(m) for m in models),
        budget=_budget(fields["budget_nano"], fields["budget_period"]),
        limits=RateLimits(fields["rpm"], fields["tpm"]),
        expires_at=utc(fields["expires_at"]),
        created_at=_aware(fields["created_at"]),
        updated_at=_aware(fields["updated_at"]),
        revoked_at=utc(fields["revoked_at"]),
    )


def _aware(moment: datetime) -> datetime:
    aware = utc(moment)
    assert aware is not None
    return aware


def _limits_columns(budget: Budget | None, limits: RateLimits) -> dict[str, object]:
    return {
        "budget_nano": budget.nano_usd if budget else None,
        "budget_period": budget.period if budget else None,
        "rpm": limits.rpm,
        "tpm": limits.tpm,
    }


class KeyStore:
    """Reads and writes keys and teams; each call is one short transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # ----------------------------------------------------------------- teams

    async def create_team(self, new: NewTeam) -> TeamRecord:
        stamp = now()
        values = {
            "id": f"team_{uuid.uuid4().hex[:24]}",
            "name": new.name,
            **_limits_columns(new.budget, new.limits),
            "created_at": stamp,
            "updated_at": stamp,
        }
        try:
            async with self.engine.begin() as connection:
                await connection.execute(insert(teams).values(**values))
                await _notify(connection)
        except IntegrityError:
            raise InvalidRequestError(
                f"A team named `{new.name}` already exists.", param="name", code="team_exists"
            ) from None
        team = await self.team(str(values["id"]))
        assert team is not None
        return team

    async def teams(self, *, deleted: bool = False) -> list[TeamRecord]:
        query = select(teams).order_by(teams.c.created_at, teams.c.id)
        if not deleted:
            query = query.where(teams.c.deleted_at.is_(None))
        async with self.engine.connect() as connection:
            return [_team(row) for row in await connection.execute(query)]

    async def team(self, id_or_name: str) -> TeamRecord | None:
        """A live team, by its id or its name."""
        query = select(teams).where(
            teams.c.deleted_at.is_(None), (teams.c.id == id_or_name) | (teams.c.name == id_or_name)
        )
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return None if row is None else _team(row)

    async def delete_team(self, team_id: str) -> TeamRecord:
        """Deleted, if none of its keys is still live (revoke them first:
        a key must not silently lose the budget its team gave it)."""
        stamp = now()
        async with self.engine.begin() as connection:
            found = (
                await connection.execute(
                    select(teams).where(teams.c.id == team_id, teams.c.deleted_at.is_(None))
                )
            ).first()
            if found is None:
                raise _no_team(team_id)
            live = await connection.scalar(
                select(func.count())
                .select_from(api_keys)
                .where(api_keys.c.team_id == team_id, api_keys.c.revoked_at.is_(None))
            )
            if live:
                raise InvalidRequestError(
                    f"Team `{team_id}` still has {live} live key(s): revoke them first.",
                    param="id",
                    code="team_has_keys",
                )
            await connection.execute(
                update(teams)
                .where(teams.c.id == team_id)
                .values(deleted_at=stamp, updated_at=stamp)
            )
            await _notify(connection)
        return _team(found)

    # ------------------------------------------------------------------ keys

    async def create_key(self, new: NewKey) -> tuple[KeyRecord, str]:
        """The key's record and the key itself (shown once, never stored)."""
        team_id = None
        if new.team is not None:
            team = await self.team(new.team)
            if team is None:
                raise InvalidRequestError(
                    f"No team `{new.team}` (give a team's id or name).",
                    param="team",
                    code="team_not_found",
                )
            team_id = team.id
        secret = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
        stamp = now()
        key_id = f"key_{uuid.uuid4().hex[:24]}"
        values = {
            "id": key_id,
            "key_hash": hash_api_key(secret),
            "name": new.name,
            "team_id": team_id,
            "models": None if new.models is None else list(new.models),
            **_limits_columns(new.budget, new.limits),
            "expires_at": new.expires_at,
            "created_at": stamp,
            "updated_at": stamp,
        }
        async with self.engine.begin() as connection:
            await connection.execute(insert(api_keys).values(**values))
            await _notify(connection)
        record = await self.key(key_id)
        assert record is not None
        return record, secret

    async def keys(self, *, revoked: bool = True) -> list[KeyRecord]:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as connection:
            return [_key(row) for row in await connection.execute(query)]

    async def key(self, key_id: str) -> KeyRecord | None:
        async with self.engine.connect() as connection:
            query = select(api_keys).where(api_keys.c.id == key_id)
            row = (await connection.execute(query)).first()
        return None if row is None else _key(row)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        """Revoked now (revoking a revoked key changes nothing)."""
        stamp = now()
        async with self.engine.begin() as connection:
            await connection.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=stamp, updated_at=stamp)
            )
            await _notify(connection)
        record = await self.key(key_id)
        if record is None:
            raise NotFoundError(f"No API key `{key_id}`.", param="id", code="not_found")
        return record

    # ------------------------------------------------------------ the replicas

    async def changed_since(self, since: datetime | None) -> Changes:
        """Every team and key written after ``since`` (all of them for None),
        deleted and revoked ones included: the cache must hear of those most."""
        team_query, key_query = select(teams), select(api_keys)
        if since is not None:
            team_query = team_query.where(teams.c.updated_at > since)
            key_query = key_query.where(api_keys.c.updated_at > since)
        async with self.engine.connect() as connection:
            found_teams = [_team(row) for row in await connection.execute(team_query)]
            found_keys = [_key(row) for row in await connection.execute(key_query)]
        return Changes(found_teams, found_keys)


async def _notify(connection: AsyncConnection) -> None:
    """On PostgreSQL, wake the replicas' key caches when this transaction
    commits (gateway/accounting/key_changes.py); SQLite's own change counter
    needs nothing sent."""
    if connection.dialect.name == "postgresql":
        await connection.execute(text(f"NOTIFY {CHANNEL}"))


def _no_team(team_id: str) -> NotFoundError:
    return NotFoundError(f"No team `{team_id}`.", param="id", code="not_found")
