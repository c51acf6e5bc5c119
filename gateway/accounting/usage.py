"""Usage queries: the ledger summed by key, team, model, deployment, adapter
or day over a time window (``GET /admin/usage`` and ``nomoat usage``)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Literal, get_args

import msgspec
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.accounting.money import to_usd
from gateway.accounting.tables import usage

GroupBy = Literal["key", "team", "model", "deployment", "adapter", "day"]
GROUPS: tuple[str, ...] = get_args(GroupBy)
_COLUMNS: dict[str, ColumnElement[object]] = {
    "key": usage.c.key_id,
    "team": usage.c.team_id,
    "model": usage.c.model,
    "deployment": usage.c.deployment,
    "adapter": usage.c.adapter,
    "day": usage.c.day,
}


class UsageQueryError(ValueError):
    """A group or a time the query cannot use, with the parameter it came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class UsageGroup(msgspec.Struct, kw_only=True):
    # The key id, team id, model, ... or the UTC day (YYYY-MM-DD); null for
    # requests without one (refused before routing, no team).
    group: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # At the deployments' token prices (what budgets count).
    cost_usd: float
    # The self-hosted nodes' share of usd_per_hour (what serving really cost).
    compute_cost_usd: float


class UsageReport(msgspec.Struct, kw_only=True):
    object: str
    group_by: str
    since: str | None
    until: str | None
    data: list[UsageGroup]


def parse_group(text: str) -> GroupBy:
    if text not in GROUPS:
        raise UsageQueryError(
            f"group_by must be one of {', '.join(GROUPS)}, not {text!r}", "group_by"
        )
    return text  # type: ignore[return-value]


def parse_time(text: str | None, param: str) -> datetime | None:
    """An ISO 8601 date or time (UTC unless it says otherwise), or Unix seconds."""
    if not text:
        return None
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageQueryError(
            f"{param} must be an ISO 8601 date or time, or Unix seconds, not {text!r}", param
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def usage_by(
    engine: AsyncEngine,
    group_by: GroupBy,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[UsageGroup]:
    """Sums per group of the requests that arrived in [since, until)."""
    column = _COLUMNS[group_by]
    query = select(
        column,
        func.count(),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0),
        func.coalesce(func.sum(usage.c.cached_tokens), 0),
        func.coalesce(func.sum(usage.c.completion_tokens), 0),
        func.coalesce(func.sum(usage.c.cost_nano), 0),
        func.coalesce(func.sum(usage.c.compute_cost_nano), 0),
    ).group_by(column)
    if since is not None:
        query = query.where(usage.c.at >= since)
    if until is not None:
        query = query.where(usage.c.at < until)
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    groups = [
        UsageGroup(
            group=_label(row[0]),
            requests=int(row[1]),
            prompt_tokens=int(row[2]),
            cached_tokens=int(row[3]),
            completion_tokens=int(row[4]),
            cost_usd=to_usd(int(row[5])),
            compute_cost_usd=to_usd(int(row[6])),
        )
        for row in rows
    ]
    return sorted(groups, key=lambda g: (g.group is None, g.group or ""))


def _label(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def report(
    group_by: GroupBy, since: datetime | None, until: datetime | None, data: list[UsageGroup]
) -> UsageReport:
    return UsageReport(
        object="list",
        group_by=group_by,
        since=since.isoformat() if since else None,
        until=until.isoformat() if until else None,
        data=data,
    )


def table(data: list[UsageGroup], group_by: str) -> str:
    """The groups as a text table (``nomoat usage``)."""
    header = (group_by, "requests", "prompt", "cached", "completion", "cost_usd", "compute_usd")
    rows = [
        (
            g.group if g.group is not None else "-",
            str(g.requests),
            str(g.prompt_tokens),
            str(g.cached_tokens),
            str(g.completion_tokens),
            f"{g.cost_usd:.6f}",
            f"{g.compute_cost_usd:.6f}",
        )
        for g in data
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    return "\n".join(lines)
