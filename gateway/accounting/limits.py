"""Rate limits and budget reservations: what one admission asks of the
limiter, and the limiter that keeps them in this process's memory.

Rate limits are token buckets: a bucket holds up to ``limit`` (requests or
tokens per minute) and refills continuously at ``limit`` per 60 seconds, so
a limit of 60 rpm admits a burst of 60 and then one a second; "reset" is the
time until the bucket is full again, as OpenAI's ``x-ratelimit-reset-*``
headers mean it. A request takes one from each request bucket and its token
bound from each token bucket; when it ends, the tokens it did not use go
back (or the ones it used beyond the bound are taken: a bucket may go below
zero, and then admits nothing until it has refilled).

Budgets are reserved: a request may start only if what was spent, plus what
running requests reserved, plus its own worst case, stays within the
budget. When it ends its reservation is replaced by what it really cost.
A reservation also expires (``reservation_seconds``), so a process that dies
holding one does not block a budget for ever.

Every check of one admission passes or none is applied: a request refused by
its team's budget takes nothing from its key's rate limit. The Redis limiter
(:mod:`gateway.accounting.redis_limits`) does the same in one Lua script.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from gateway.accounting.principal import BudgetPeriod

SECONDS_PER_WINDOW = 60.0
RateKind = Literal["requests", "tokens"]


@dataclass(slots=True)
class RateDemand:
    """Take ``amount`` from the bucket ``key`` of ``limit`` per minute."""

    key: str
    kind: RateKind
    limit: int
    amount: int
    # Whose limit, for messages: 'key "ci"', 'team "research"', 'model "m"'.
    owner: str


@dataclass(slots=True)
class BudgetDemand:
    """Reserve ``amount`` nano-USD of the budget ``key`` (``limit`` nano-USD),
    which starts from ``seed`` (the ledger's sum) if the limiter has no state
    for it yet; its state may be forgotten after ``keep_seconds`` (the end of
    its period, with a margin; None: never)."""

    key: str
    limit: int
    amount: int
    seed: int
    keep_seconds: int | None
    # Whose ('key "ci"', 'team "research"'), its period, and when that ends
    # (None: never): for the refusal's message.
    owner: str
    period: BudgetPeriod
    ends: datetime | None


@dataclass(slots=True)
class Level:
    """A rate bucket after an admission: what is left, and the seconds until
    it is full again."""

    demand: RateDemand
    remaining: float

    @property
    def reset_seconds(self) -> float:
        missing = self.demand.limit - self.remaining
        return max(missing, 0.0) * SECONDS_PER_WINDOW / self.demand.limit


@dataclass(slots=True)
class Admitted:
    levels: tuple[Level, ...]


@dataclass(slots=True)
class RateRefused:
    """``demand``'s bucket holds too little: retry after ``retry_after``
    seconds (None: never, the request is larger than the limit)."""

    demand: RateDemand
    retry_after: float | None
    levels: tuple[Level, ...]


@dataclass(slots=True)
class BudgetRefused:
    demand: BudgetDemand
    # What was spent and reserved when it was refused.
    used: int


Verdict = Admitted | RateRefused | BudgetRefused
# (The verdicts and Settlement are not frozen: a frozen dataclass sets each
# field through object.__setattr__, and one of each is made per request.
# Nothing changes them after they are made.)


@dataclass(slots=True)
class Settlement:
    """What a ticket gives back when its request ends: each token bucket's
    correction (reserved minus used: positive gives back, negative takes
    more), and each budget's real charge replacing its reservation."""

    ticket: str
    refunds: tuple[tuple[RateDemand, int], ...] = ()
    charges: tuple[tuple[BudgetDemand, int], ...] = ()


class Limiter(Protocol):
    """Where limits and budgets live: this process, or Redis for many."""

    async def admit(
        self, ticket: str, rates: tuple[RateDemand, ...], budgets: tuple[BudgetDemand, ...]
    ) -> Verdict: ...

    def settle(self, settlement: Settlement) -> None:
        """Apply it now, or as soon as possible: it never fails the request."""

    async def drain(self) -> None:
        """Wait until every settlement given so far is applied (or given up)."""

    async def aclose(self) -> None: ...


class LimiterUnavailableError(Exception):
    """The limiter cannot be reached (Redis down): nothing was admitted."""


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


def _level(buckets: dict[str, _Bucket], key: str, limit: int, now: float) -> float:
    """What the bucket ``key`` holds at ``now``: refilled since it was last
    taken from, at most ``limit``; full if it has never been taken from (or
    was swept)."""
    bucket = buckets.get(key)
    if bucket is None:
        return float(limit)
    level = bucket.level + (now - bucket.at) * limit / SECONDS_PER_WINDOW
    return float(limit) if level > limit else level


def _store(buckets: dict[str, _Bucket], key: str, level: float, now: float) -> None:
    """The bucket ``key`` holds ``level`` from ``now``."""
    bucket = buckets.get(key)
    if bucket is None:
        buckets[key] = _Bucket(level, now)
    else:
        bucket.level, bucket.at = level, now


class _Budget:
    """A budget's spend and its running requests' reservations.

    What is reserved is kept as a running sum, so an admission does not walk
    every reservation (at 32 requests in flight, 32 of them each time): the
    reservations are walked only when one may have expired, i.e. once the
    clock passes ``_expiry``, a lower bound of their expiries."""

    __slots__ = ("_expiry", "_reserved", "reservations", "spent", "until")

    def __init__(self, spent: int, until: float | None) -> None:
        self.spent = spent
        # Monotonic instant after which its period is over (None: never).
        self.until = until
        # Ticket -> (amount, expiry as a monotonic instant).
        self.reservations: dict[str, tuple[int, float]] = {}
        self._reserved = 0
        self._expiry = math.inf

    def reserved(self, now: float) -> int:
        """What the reservations not expired at ``now`` hold (the expired
        ones are dropped)."""
        if now >= self._expiry:
            expiry = math.inf
            for ticket, (amount, until) in list(self.reservations.items()):
                if until <= now:
                    del self.reservations[ticket]
                    self._reserved -= amount
                elif until < expiry:
                    expiry = until
            self._expiry = expiry
        return self._reserved

    def reserve(self, ticket: str, amount: int, until: float) -> None:
        self.release(ticket)
        self.reservations[ticket] = (amount, until)
        self._reserved += amount
        if until < self._expiry:
            self._expiry = until

    def release(self, ticket: str) -> None:
        held = self.reservations.pop(ticket, None)
        if held is not None:
            self._reserved -= held[0]


class MemoryLimiter:
    """Limits and budgets of one process (one event loop: each call runs to
    its end without yielding, so it is atomic by construction)."""

    def __init__(self, reservation_seconds: float) -> None:
        self._reservation_seconds = reservation_seconds
        self._buckets: dict[str, _Bucket] = {}
        self._budgets: dict[str, _Budget] = {}
        self._now = time.monotonic
        self._next_sweep = 0.0

    async def admit(
        self, ticket: str, rates: tuple[RateDemand, ...], budgets: tuple[BudgetDemand, ...]
    ) -> Verdict:
        return self.admit_now(ticket, rates, budgets, self._now())

    def admit_now(
        self,
        ticket: str,
        rates: tuple[RateDemand, ...],
        budgets: tuple[BudgetDemand, ...],
        now: float,
    ) -> Verdict:
        buckets = self._buckets
        levels = []
        for demand in rates:
            levels.append(Level(demand, _level(buckets, demand.key, demand.limit, now)))
        for level in levels:
            demand = level.demand
            if level.remaining < demand.amount:
                wait = None
                if demand.amount <= demand.limit:
                    wait = (demand.amount - level.remaining) * SECONDS_PER_WINDOW / demand.limit
                return RateRefused(demand, wait, tuple(levels))
        if now >= self._next_sweep:
            self._sweep(now)
            buckets = self._buckets  # (a new dict)
        for budget in budgets:
            state = self._budgets.get(budget.key) or self._budget(budget, now)
            used = state.spent + state.reserved(now)
            if used + budget.amount > budget.limit:
                return BudgetRefused(budget, used)
        # Taken: each level (new objects of this call) updated in place, and
        # its bucket updated or stored (the sweep above may have dropped it).
        for level in levels:
            demand = level.demand
            level.remaining -= demand.amount
            _store(buckets, demand.key, level.remaining, now)
        if budgets:
            until = now + self._reservation_seconds
            for budget in budgets:
                self._budgets[budget.key].reserve(ticket, budget.amount, until)
        return Admitted(tuple(levels))

    def take(
        self,
        ticket: str,
        rates: tuple[RateDemand, ...],
        tokens: int,
        budgets: tuple[BudgetDemand, ...],
        reserve: int,
    ) -> list[float] | None:
        """:meth:`admit_now` for the gate's every request, in one call and
        without a verdict's objects: ``rates`` a plan's demands (a token
        demand takes ``tokens``, whatever its amount), each budget of
        ``budgets`` reserving ``reserve`` (whatever its amount). What each
        bucket holds after it (in ``rates``' order), or None when
        :meth:`admit_now` must decide: something is refused, a budget has no
        state yet, or the sweep is due. Nothing is taken then."""
        now = self._now()
        if now >= self._next_sweep:
            return None
        buckets = self._buckets
        left = []
        for demand in rates:
            remaining = _level(buckets, demand.key, demand.limit, now)
            remaining -= tokens if demand.kind == "tokens" else 1
            if remaining < 0:
                return None
            left.append(remaining)
        states = self._budgets
        for budget in budgets:
            state = states.get(budget.key)
            if state is None or state.spent + state.reserved(now) + reserve > budget.limit:
                return None
        for demand, remaining in zip(rates, left, strict=True):
            _store(buckets, demand.key, remaining, now)
        if budgets:
            until = now + self._reservation_seconds
            for budget in budgets:
                states[budget.key].reserve(ticket, reserve, until)
        return left

    def give_back(
        self,
        ticket: str,
        rates: tuple[RateDemand, ...],
        correction: int,
        charges: tuple[BudgetDemand, ...],
        charged: int,
    ) -> None:
        """:meth:`settle` of a ticket :meth:`take` admitted, without a
        :class:`Settlement`: ``correction`` (tokens reserved minus used)
        back to each token bucket of ``rates``, ``charged`` to each budget
        of ``charges`` in place of its reservation."""
        now = self._now()
        if correction:
            buckets = self._buckets
            for demand in rates:
                if demand.kind != "tokens":
                    continue
                limit = demand.limit
                level = min(float(limit), _level(buckets, demand.key, limit, now) + correction)
                _store(buckets, demand.key, level, now)
        states = self._budgets
        for budget in charges:
            state = states.get(budget.key) or self._budget(budget, now)
            state.release(ticket)
            state.spent += charged

    def settle(self, settlement: Settlement) -> None:
        self.settle_now(settlement, self._now())

    async def drain(self) -> None:
        return None

    def settle_now(self, settlement: Settlement, now: float) -> None:
        buckets = self._buckets
        for demand, correction in settlement.refunds:
            limit = demand.limit
            level = min(float(limit), _level(buckets, demand.key, limit, now) + correction)
            _store(buckets, demand.key, level, now)
        for budget, charge in settlement.charges:
            state = self._budget(budget, now)
            state.release(settlement.ticket)
            state.spent += charge

    def spent(self, key: str) -> int:
        """A budget's spend so far (for tests and the admin view)."""
        state = self._budgets.get(key)
        return state.spent if state else 0

    async def aclose(self) -> None:
        return None

    def _budget(self, demand: BudgetDemand, now: float) -> _Budget:
        state = self._budgets.get(demand.key)
        if state is None:
            keep = demand.keep_seconds
            state = _Budget(demand.seed, None if keep is None else now + keep)
            self._budgets[demand.key] = state
        return state

    def _sweep(self, now: float) -> None:
        """Forget buckets that are full again and budgets of past periods
        (at most once a minute): memory stays bounded by the live keys."""
        self._next_sweep = now + SECONDS_PER_WINDOW
        self._budgets = {
            key: state
            for key, state in self._budgets.items()
            if state.until is None or state.until > now
        }
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if now - bucket.at < SECONDS_PER_WINDOW * 2 or bucket.level < 0
        }
