"""Keys and teams as the admin API and the CLI take and show them.

Money is USD here (nano-USD inside); times are Unix seconds on the way out
(as OpenAI's objects give them) and Unix seconds or RFC 3339 on the way in
(a time without a zone is UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from gateway.accounting.money import to_nano, to_usd
from gateway.accounting.principal import Budget, BudgetPeriod, RateLimits
from gateway.accounting.store import KeyRecord, NewKey, NewTeam, TeamRecord, now
from gateway.errors import InvalidRequestError

FormT = TypeVar("FormT")
Name = Annotated[str, Meta(min_length=1, max_length=200)]
PerMinute = Annotated[int, Meta(ge=1)]
Usd = Annotated[float, Meta(ge=0)]


class TeamForm(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /admin/teams``."""

    name: Name
    budget_usd: Usd | None = None
    budget_period: BudgetPeriod | None = None
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None


class KeyForm(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /admin/keys``; ``team`` is a team's id or name;
    ``models`` absent or null: every model."""

    name: Name
    team: str | None = None
    models: list[Annotated[str, Meta(min_length=1)]] | None = None
    budget_usd: Usd | None = None
    budget_period: BudgetPeriod | None = None
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None
    expires_at: int | datetime | None = None


class TeamInfo(msgspec.Struct):
    id: str
    object: Literal["team"]
    name: str
    budget_usd: float | None
    budget_period: str | None
    rpm: int | None
    tpm: int | None
    created_at: int


class KeyInfo(msgspec.Struct):
    id: str
    object: Literal["api_key"]
    name: str
    team: str | None
    models: list[str] | None
    budget_usd: float | None
    budget_period: str | None
    rpm: int | None
    tpm: int | None
    expires_at: int | None
    created_at: int
    revoked_at: int | None


class CreatedKey(KeyInfo):
    """A key just created: the only time ``key`` itself is shown."""

    key: str


class ListOf(msgspec.Struct):
    object: Literal["list"]
    data: list[TeamInfo] | list[KeyInfo]


team_form_decoder = msgspec.json.Decoder(TeamForm)
key_form_decoder = msgspec.json.Decoder(KeyForm)


def decode_form(decoder: msgspec.json.Decoder[FormT], body: bytes, what: str) -> FormT:
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise InvalidRequestError(f"Invalid {what}: {error}") from None


def budget_of(usd: float | None, period: BudgetPeriod | None) -> Budget | None:
    """A budget without a period lasts for ever ("total")."""
    if usd is None:
        if period is not None:
            raise InvalidRequestError(
                "budget_period needs budget_usd.", param="budget_period", code=None
            )
        return None
    return Budget(to_nano(usd), period or "total")


def new_team(form: TeamForm) -> NewTeam:
    return NewTeam(
        form.name.strip(),
        budget_of(form.budget_usd, form.budget_period),
        RateLimits(form.rpm, form.tpm),
    )


def expiry(value: int | datetime | None) -> datetime | None:
    """When a key stops, in UTC; a time already past is refused."""
    if value is None:
        return None
    moment = datetime.fromtimestamp(value, UTC) if isinstance(value, int) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment <= now():
        raise InvalidRequestError(
            f"expires_at ({moment.isoformat()}) is already past.", param="expires_at", code=None
        )
    return moment.astimezone(UTC)


def new_key(form: KeyForm) -> NewKey:
    return NewKey(
        name=form.name.strip(),
        team=form.team,
        models=None if form.models is None else tuple(dict.fromkeys(form.models)),
        budget=budget_of(form.budget_usd, form.budget_period),
        limits=RateLimits(form.rpm, form.tpm),
        expires_at=expiry(form.expires_at),
    )


def _seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _usd(budget: Budget | None) -> float | None:
    return None if budget is None else to_usd(budget.nano_usd)


def team_info(team: TeamRecord) -> TeamInfo:
    return TeamInfo(
        id=team.id,
        object="team",
        name=team.name,
        budget_usd=_usd(team.budget),
        budget_period=team.budget.period if team.budget else None,
        rpm=team.limits.rpm,
        tpm=team.limits.tpm,
        created_at=int(team.created_at.timestamp()),
    )


def key_info(key: KeyRecord) -> KeyInfo:
    return KeyInfo(
        id=key.id,
        object="api_key",
        name=key.name,
        team=key.team_id,
        models=None if key.models is None else list(key.models),
        budget_usd=_usd(key.budget),
        budget_period=key.budget.period if key.budget else None,
        rpm=key.limits.rpm,
        tpm=key.limits.tpm,
        expires_at=_seconds(key.expires_at),
        created_at=int(key.created_at.timestamp()),
        revoked_at=_seconds(key.revoked_at),
    )


def created_key(key: KeyRecord, secret: str) -> CreatedKey:
    info = key_info(key)
    fields = {name: getattr(info, name) for name in info.__struct_fields__}
    return CreatedKey(**fields, key=secret)
