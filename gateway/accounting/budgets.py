"""Budget periods and what the ledger says was already spent.

A budget is per key or per team, in nano-USD, over a period: the UTC day,
the UTC month, or ``total`` (for ever). Its state lives in the limiter (this
process's memory, or Redis) under a name that includes the period's start, so
a new day or month starts from zero by itself: nothing has to reset it.

When a process starts, its limiter knows nothing of what was spent before:
:func:`load_seeds` reads the ledger's sums for the current periods (one
query), and the limiter starts each budget from them. With Redis, a budget
already there (other replicas running) keeps its own state: the seed only
fills a budget Redis does not hold yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Column, case, func, select
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.accounting.money import to_usd
from gateway.accounting.principal import Budget, BudgetPeriod
from gateway.accounting.tables import usage

PERIOD_WORDS: dict[BudgetPeriod, str] = {"day": "daily", "month": "monthly", "total": "total"}


@dataclass(frozen=True, slots=True)
class Period:
    """One budget period: its start (its name's part) and its end (None: never)."""

    start: date | None
    end: datetime | None

    @property
    def label(self) -> str:
        return "total" if self.start is None else self.start.isoformat()


def period_of(period: BudgetPeriod, now: datetime) -> Period:
    """The period of kind ``period`` that holds ``now`` (UTC)."""
    today = now.astimezone(UTC).date()
    if period == "day":
        return Period(today, _midnight(today + timedelta(days=1)))
    if period == "month":
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        return Period(first, _midnight(following))
    return Period(None, None)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def describe(owner: str, budget: Budget) -> str:
    """``the daily budget of key "ci" (5.00 USD)``."""
    usd = to_usd(budget.nano_usd)
    return f"the {PERIOD_WORDS[budget.period]} budget of {owner} ({usd:.2f} USD)"


def resets(end: datetime | None) -> str:
    if end is None:
        return "it does not reset (period total)"
    return f"it resets at {end.strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass(frozen=True, slots=True)
class Spent:
    """What one key or team spent, by the ledger: today, this month, ever."""

    day: int = 0
    month: int = 0
    total: int = 0

    def of(self, period: BudgetPeriod) -> int:
        return self.day if period == "day" else self.month if period == "month" else self.total


@dataclass(frozen=True, slots=True)
class Seeds:
    """The ledger's sums when the process started (``at``), per key and team."""

    at: datetime
    keys: dict[str, Spent] = field(default_factory=dict)
    teams: dict[str, Spent] = field(default_factory=dict)
    # The periods the sums are of (computed once).
    periods: dict[BudgetPeriod, Period] = field(init=False)

    def __post_init__(self) -> None:
        periods = {kind: period_of(kind, self.at) for kind in PERIOD_WORDS}
        object.__setattr__(self, "periods", periods)

    def spent(self, owner_kind: str, owner_id: str, period: BudgetPeriod, now: Period) -> int:
        """What the ledger had for this budget's current period ``now``; 0
        for a period that began after the sums were read (nothing was in it)."""
        if now != self.periods[period]:
            return 0
        table = self.keys if owner_kind == "key" else self.teams
        spent = table.get(owner_id)
        return spent.of(period) if spent is not None else 0


async def load_seeds(engine: AsyncEngine, now: datetime) -> Seeds:
    """Every key's and team's spend from the ledger (``usage.cost_nano``);
    an empty ledger, or none yet (not migrated), is no spend."""
    day = period_of("day", now).start
    month = period_of("month", now).start
    try:
        async with engine.connect() as connection:
            keys = await _sums(connection, usage.c.key_id, day, month)
            teams = await _sums(connection, usage.c.team_id, day, month)
    except (OperationalError, ProgrammingError):
        # No usage table: the ledger was never written, so nothing was spent.
        return Seeds(now)
    return Seeds(now, keys, teams)


async def _sums(
    connection: AsyncConnection, owner: Column[str], day: date | None, month: date | None
) -> dict[str, Spent]:
    cost = usage.c.cost_nano
    query = (
        select(
            owner,
            func.sum(case((usage.c.day >= day, cost), else_=0)),
            func.sum(case((usage.c.day >= month, cost), else_=0)),
            func.sum(cost),
        )
        .where(owner.isnot(None))
        .group_by(owner)
    )
    rows = (await connection.execute(query)).all()
    return {
        str(row[0]): Spent(int(row[1] or 0), int(row[2] or 0), int(row[3] or 0)) for row in rows
    }
