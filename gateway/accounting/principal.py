"""Who is asking: what the authenticated key allows, read by the limits,
the budgets and the ledger.

Static keys (``server.api_key_hashes``) are principals with nothing but an
id; managed keys (``/admin/keys``) carry their name, team, allowed models,
expiry, budget and limits, and their team's budget and limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

BudgetPeriod = Literal["day", "month", "total"]


@dataclass(frozen=True, slots=True)
class Budget:
    nano_usd: int
    period: BudgetPeriod


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests and tokens per minute; None: unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True, slots=True)
class Team:
    id: str
    name: str
    budget: Budget | None = None
    limits: RateLimits = RateLimits()


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``key_id`` is what the ledger, the spans and
    the metrics' opt-in labels name: a managed key's id, or a static key's
    fingerprint."""

    key_id: str
    name: str = ""
    team: Team | None = None
    # None: every model; else the catalog names (and aliases) it may use.
    models: frozenset[str] | None = None
    budget: Budget | None = None
    limits: RateLimits = RateLimits()
    expires_at: datetime | None = None
    managed: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models
