"""Admission: a request's rate limits and budgets, checked and reserved
before it is routed, settled when it ends.

:meth:`Gate.admit` takes the caller (a :class:`Principal`, or None without
keys), the model asked for, the request's token bound and its worst-case
cost, and returns a :class:`Ticket`, or raises:

- 429 ``rate_limit_exceeded`` (``RateLimitError`` in the SDK) with
  ``Retry-After`` when a requests or tokens per minute limit of the key, its
  team or the model has no room;
- 429 ``insufficient_quota`` (also ``RateLimitError``, with
  ``x-should-retry: false`` so the SDK does not retry) when the key's or the
  team's budget cannot cover the worst case, naming the budget and when it
  resets;
- 503 ``limits_unavailable`` when the limiter (Redis) cannot be reached, or
  when the limits could not be enforced across processes (fail closed:
  nothing runs that could not be counted).

The ticket's :attr:`~Ticket.headers` are OpenAI's ``x-ratelimit-*`` headers,
sent on every response of a request that has rate limits; its
:meth:`~Ticket.settle` (when the request ends: real tokens, real cost) or
:meth:`~Ticket.release` (it never ran) gives back what was reserved beyond
what was used.

Token bound (for tokens per minute): the request's body size in bytes (a
token is at least one byte of text for the byte-level BPE tokenizers of open
models, and the JSON around each message outweighs its chat template's
markers) plus its completion bound (``max_tokens`` or
``max_completion_tokens``, else ``limits.max_tokens_ceiling``, times its
choices). Settled to the usage's ``total_tokens``. An embeddings request is
admitted as its completion-shaped view, whose ``max_tokens`` is 0: its input only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gateway import wire
from gateway.accounting.budgets import Period, Seeds, describe, period_of, resets
from gateway.accounting.limits import (
    SECONDS_PER_WINDOW,
    Admitted,
    BudgetDemand,
    BudgetRefused,
    Level,
    Limiter,
    LimiterUnavailableError,
    MemoryLimiter,
    RateDemand,
    RateKind,
    RateRefused,
    Settlement,
)
from gateway.accounting.money import to_usd
from gateway.accounting.principal import Budget, BudgetPeriod, Principal, RateLimits, Team
from gateway.errors import GatewayError, RateLimitError
from gateway.exchange import Exchange

PREFIX = "nomoat"
# A budget's state outlives its period by this much (late settlements land).
KEEP_AFTER_PERIOD_SECONDS = 86_400
Headers = list[tuple[bytes, bytes]]


class QuotaExceededError(RateLimitError):
    """A budget cannot cover the request's worst case (429, OpenAI's
    ``insufficient_quota``)."""

    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class LimitsUnavailableError(GatewayError):
    """Limits or budgets apply but cannot be checked now (503)."""

    status_code = 503
    error_type = "server_error"
    default_code = "limits_unavailable"


class WorstCase(Protocol):
    """What the budgets need of the prices (:class:`PriceBook`)."""

    def reachable(self, model: str) -> tuple[str, ...]: ...

    def worst_case_nano(
        self, deployments: Iterable[str], prompt_tokens: int, completion_tokens: int
    ) -> int: ...


@dataclass(slots=True)
class Bounds:
    """The most a request can use: prompt and completion tokens. (Not
    frozen, as the limiter's objects: one is made per request; nothing
    changes it.)"""

    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def request_bounds(
    request: wire.ChatCompletionRequest | wire.CompletionRequest, body_bytes: int, ceiling: int
) -> Bounds:
    """See the module's docstring: body bytes, and the completion asked for
    (or the ceiling) times the choices."""
    if isinstance(request, wire.ChatCompletionRequest):
        asked = request.max_completion_tokens or request.max_tokens
        choices = request.n or 1  # (one prompt)
    else:
        asked = request.max_tokens
        choices = (request.n or 1) * _prompt_count(request)
    # max_tokens 0 (a completion that only echoes; an embeddings request's
    # view, gateway/embeddings/inputs.py) bounds the output at nothing.
    return Bounds(body_bytes, (ceiling if asked is None else asked) * choices)


def _prompt_count(request: wire.ChatCompletionRequest | wire.CompletionRequest) -> int:
    if isinstance(request, wire.ChatCompletionRequest) or isinstance(request.prompt, str):
        return 1
    if request.prompt and all(isinstance(item, int) for item in request.prompt):
        return 1
    return max(len(request.prompt), 1)


class Ticket:
    """One admitted request's reservations."""

    __slots__ = (
        "_charges",
        "_gate",
        "_id",
        "_memory",
        "_rates",
        "_settled",
        "bounds",
        "headers",
    )

    def __init__(
        self,
        gate: Gate | None,
        ticket_id: str,
        bounds: Bounds,
        rates: tuple[RateDemand, ...] = (),
        charges: tuple[BudgetDemand, ...] = (),
        headers: Headers | None = None,
        memory: MemoryLimiter | None = None,
    ) -> None:
        self._gate = gate
        self._id = ticket_id
        self.bounds = bounds
        self._rates = rates
        self._charges = charges
        self._settled = gate is None
        # OpenAI's x-ratelimit-* headers (empty without rate limits).
        self.headers: Headers = headers or []
        # The memory limiter that took it in one call (Gate.admit_at_once):
        # its rates are then a plan's, each token demand's amount being the
        # bounds' tokens.
        self._memory = memory

    @property
    def settled(self) -> bool:
        return self._settled

    def settle(self, tokens: int, charged_nano: int) -> None:
        """The request ended having used ``tokens`` and cost ``charged_nano``:
        reservations become that. Only the first call counts."""
        if self._settled or self._gate is None:
            return
        self._settled = True
        memory = self._memory
        if memory is not None:
            bounds = self.bounds
            reserved = bounds.prompt_tokens + bounds.completion_tokens
            memory.give_back(self._id, self._rates, reserved - tokens, self._charges, charged_nano)
            return
        # (Loops, not comprehensions: each of those is a call of its own.)
        refunds: tuple[tuple[RateDemand, int], ...] = ()
        for d in self._rates:
            if d.kind == "tokens" and d.amount != tokens:
                refunds += ((d, d.amount - tokens),)
        charges: tuple[tuple[BudgetDemand, int], ...] = ()
        for b in self._charges:
            charges += ((b, charged_nano),)
        if refunds or charges:
            self._gate.limiter.settle(Settlement(self._id, refunds, charges))

    def release(self) -> None:
        """The request never ran (refused after admission, failed before
        any engine saw it): nothing was used."""
        self.settle(0, 0)

    def finish(self, exchange: Exchange) -> None:
        """Settle from what the closed exchange says was used and charged."""
        usage = exchange.usage  # (used_tokens' first case, inline)
        if usage is not None:
            self.settle(usage.prompt_tokens + usage.completion_tokens, exchange.charged_nano)
        else:
            self.settle(used_tokens(exchange, self.bounds), exchange.charged_nano)

    def header_map(self) -> dict[str, str]:
        return {name.decode(): value.decode() for name, value in self.headers}


def used_tokens(exchange: Exchange, bounds: Bounds) -> int:
    """Prompt plus completion tokens: the usage's; on a stream cut before its
    usage, the prompt's bound plus the tokens counted on the stream; with
    nothing generated and no usage, none."""
    if exchange.usage is not None:
        return exchange.usage.prompt_tokens + exchange.usage.completion_tokens
    if exchange.estimated_output_tokens:
        return bounds.prompt_tokens + exchange.estimated_output_tokens
    return 0


# Plans kept at most (keys times models); past that they are built again.
MAX_PLANS = 10_000
TOTAL = period_of("total", datetime(2000, 1, 1, tzinfo=UTC))


class _BudgetOwner:
    """A key's or a team's budget in a plan, with the name and seed of the
    period it was last asked for (rebuilt when the period changes)."""

    __slots__ = ("budget", "kind", "label", "name", "owner_id", "period", "seed", "seeds")

    def __init__(self, kind: str, owner_id: str, budget: Budget, label: str) -> None:
        self.kind = kind
        self.owner_id = owner_id
        self.budget = budget
        self.label = label
        self.period: Period | None = None
        self.seeds: Seeds | None = None
        self.name = ""
        self.seed = 0


def _budget_owners(principal: Principal | None) -> tuple[_BudgetOwner, ...]:
    if principal is None:
        return ()
    owners = []
    if principal.budget is not None:
        owners.append(
            _BudgetOwner("key", principal.key_id, principal.budget, _owner_label(principal))
        )
    team = principal.team
    if team is not None and team.budget is not None:
        owners.append(_BudgetOwner("team", team.id, team.budget, _owner_label(team)))
    return tuple(owners)


class _Plan:
    """What the requests of one principal for one model ask of the limiter,
    but the amounts, built once: the gate's per-request work is then the
    amounts and the limiter's."""

    __slots__ = (
        "_rates",
        "budgets",
        "header_kinds",
        "held",
        "held_seeds",
        "periodic",
        "principal",
        "token_free",
    )

    def __init__(
        self,
        principal: Principal | None,
        rates: tuple[RateDemand, ...],
        budgets: tuple[_BudgetOwner, ...],
    ) -> None:
        self.principal = principal
        self._rates = rates
        # Without a token bucket every request's demands are the same objects.
        self.token_free = all(d.kind == "requests" for d in rates)
        self.budgets = budgets
        self.periodic = any(o.budget.period != "total" for o in budgets)
        # Budgets that never end: their demands (amounts aside) as the memory
        # limiter's one-call admission holds them, built once per spend read.
        self.held: tuple[BudgetDemand, ...] = ()
        self.held_seeds: Seeds | None = None
        # For headers_of: each kind's names and demands, found once.
        self.header_kinds = header_kinds(rates)

    def rates(self, tokens: int) -> tuple[RateDemand, ...]:
        """The rate demands of a request of ``tokens``, in the plan's order
        (a request's demand is shared: it never changes)."""
        if self.token_free:
            return self._rates
        return tuple(
            [
                d if d.kind == "requests" else RateDemand(d.key, "tokens", d.limit, tokens, d.owner)
                for d in self._rates
            ]
        )


class Gate:
    """Rate limits and budgets, over one :class:`Limiter`."""

    def __init__(
        self,
        limiter: Limiter,
        seeds: Seeds | None,
        model_limits: Mapping[str, RateLimits] | None = None,
        unenforceable: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.limiter = limiter
        # What the ledger says was spent this period, per key and team; None
        # while it could not be read (the database unreachable since start):
        # a request with a budget is then refused with 503, never let past it.
        self.seeds = seeds
        self.model_limits = dict(model_limits or {})
        # Why limits cannot be enforced here (several processes, no Redis),
        # or None: a request that has any is then refused with 503.
        self.unenforceable = unenforceable
        self._clock = clock
        self._periods: dict[BudgetPeriod, Period] = {}
        # What each (key, model) asks of the limiter, but the amounts: built
        # once per principal object (a changed key is a new object).
        self._plans: dict[tuple[str | None, str], _Plan] = {}
        self._ticket_prefix = os.urandom(16).hex() + "-"
        self._tickets = 0
        # The memory limiter itself (not a subclass), whose admissions take
        # one call (admit_at_once); None for any other limiter.
        self._memory = limiter if type(limiter) is MemoryLimiter else None

    def limited(self, principal: Principal | None, model: str) -> bool:
        """Whether a request of ``principal`` for ``model`` has any limit or budget."""
        if model in self.model_limits:
            return True
        if principal is None:
            return False
        team = principal.team
        return bool(
            principal.budget
            or principal.limits.any
            or (team is not None and (team.budget or team.limits.any))
        )

    async def admit(
        self, principal: Principal | None, model: str, bounds: Bounds, worst_case_nano: int
    ) -> Ticket:
        if not self.limited(principal, model):
            return Ticket(None, "", bounds)
        ticket = self.admit_at_once(principal, model, bounds, worst_case_nano)
        if ticket is not None:
            return ticket
        return await self.admit_limited(principal, model, bounds, worst_case_nano)

    def admit_at_once(
        self, principal: Principal | None, model: str, bounds: Bounds, worst_case_nano: int
    ) -> Ticket | None:
        """:meth:`admit_limited` of a request the memory limiter admits, in
        one call (no coroutine, no verdict, the plan's demands as they are:
        about a third of the instructions); None when :meth:`admit_limited`
        must decide (another limiter, a refusal, a budget not yet held,
        limits that cannot be enforced, ...), nothing taken."""
        memory = self._memory
        if memory is None or self.unenforceable is not None:
            return None
        plan = self._plan(principal, model)
        budgets: tuple[BudgetDemand, ...] = ()
        if plan.budgets:
            seeds = self.seeds
            if seeds is None:
                return None
            if plan.periodic:
                budgets = self._budget_demands(plan, worst_case_nano)
            else:
                # (take reserves worst_case_nano of each: their amounts are
                # not read, and a settlement reads only key, seed and keep.)
                if plan.held_seeds is not seeds:
                    plan.held, plan.held_seeds = self._budget_demands(plan, 0), seeds
                budgets = plan.held
        self._tickets += 1
        ticket_id = f"{self._ticket_prefix}{self._tickets:x}"
        rates = plan._rates
        left = memory.take(
            ticket_id,
            rates,
            bounds.prompt_tokens + bounds.completion_tokens,
            budgets,
            worst_case_nano,
        )
        if left is None:
            return None
        headers = headers_of(rates, left, plan.header_kinds)
        return Ticket(self, ticket_id, bounds, rates, budgets, headers, memory)

    async def admit_limited(
        self, principal: Principal | None, model: str, bounds: Bounds, worst_case_nano: int
    ) -> Ticket:
        """:meth:`admit` of a request known to be :meth:`limited`."""
        # Unique across processes and replicas (a Redis budget holds every
        # replica's tickets): this gate's random prefix and a count, with no
        # system call per request (os.urandom was one).
        self._tickets += 1
        ticket_id = f"{self._ticket_prefix}{self._tickets:x}"
        if self.unenforceable is not None:
            raise LimitsUnavailableError(
                "This request has rate limits or a budget that this gateway cannot enforce: "
                f"{self.unenforceable}. Its operator must set [accounting] redis.",
                headers={"Retry-After": "60"},
            )
        plan = self._plan(principal, model)
        rates = plan.rates(bounds.tokens)
        budgets = self._budget_demands(plan, worst_case_nano) if plan.budgets else ()
        try:
            verdict = await self.limiter.admit(ticket_id, rates, budgets)
        except LimiterUnavailableError as error:
            raise LimitsUnavailableError(
                "Rate limits and budgets cannot be checked now (their store is unreachable); "
                "retry shortly.",
                headers={"Retry-After": "1"},
            ) from error
        if isinstance(verdict, RateRefused):
            raise _rate_error(verdict)
        if isinstance(verdict, BudgetRefused):
            raise _quota_error(verdict, worst_case_nano)
        assert isinstance(verdict, Admitted)
        return Ticket(self, ticket_id, bounds, rates, budgets, rate_headers(verdict.levels))

    def _plan(self, principal: Principal | None, model: str) -> _Plan:
        key = (principal.key_id if principal is not None else None, model)
        plan = self._plans.get(key)
        if plan is None or plan.principal is not principal:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = _Plan(principal, self._rates(principal, model, 0), _budget_owners(principal))
            self._plans[key] = plan
        return plan

    def _rates(
        self, principal: Principal | None, model: str, tokens: int
    ) -> tuple[RateDemand, ...]:
        owners: list[tuple[str, str, RateLimits]] = []
        if principal is not None:
            owners.append((f"key:{principal.key_id}", _key_label(principal), principal.limits))
            team = principal.team
            if team is not None:
                owners.append((f"team:{team.id}", f'team "{team.name}"', team.limits))
        if model in self.model_limits:
            owners.append((f"model:{model}", f'model "{model}"', self.model_limits[model]))
        demands = []
        for scope, label, limits in owners:
            if limits.rpm is not None:
                demands.append(_rate(scope, "requests", limits.rpm, 1, label))
            if limits.tpm is not None:
                demands.append(_rate(scope, "tokens", limits.tpm, tokens, label))
        return tuple(demands)

    def _budget_demands(self, plan: _Plan, worst_case_nano: int) -> tuple[BudgetDemand, ...]:
        if not plan.budgets:
            return ()
        seeds = self.seeds
        if seeds is None:
            raise LimitsUnavailableError(
                "Budgets cannot be checked now: what was spent could not be read from the "
                "accounting database since this server started; retry shortly.",
                headers={"Retry-After": "5"},
            )
        # The clock only for budgets whose period ends (a day, a month).
        now = self._clock() if plan.periodic else None
        demands = []
        for owner in plan.budgets:
            budget = owner.budget
            if now is None:
                period = TOTAL
                keep = None
            else:
                period = self._period(budget.period, now)
                keep = None
                if period.end is not None:
                    keep = int((period.end - now).total_seconds()) + KEEP_AFTER_PERIOD_SECONDS
            if owner.period is not period or owner.seeds is not seeds:
                # A new period (or the spend read again): its name and seed.
                owner.period, owner.seeds = period, seeds
                owner.name = (
                    f"{PREFIX}:budget:{owner.kind}:{owner.owner_id}:{budget.period}:{period.label}"
                )
                owner.seed = seeds.spent(owner.kind, owner.owner_id, budget.period, period)
            demands.append(
                BudgetDemand(
                    key=owner.name,
                    limit=budget.nano_usd,
                    amount=worst_case_nano,
                    seed=owner.seed,
                    keep_seconds=keep,
                    owner=owner.label,
                    period=budget.period,
                    ends=period.end,
                )
            )
        return tuple(demands)

    def _period(self, kind: BudgetPeriod, now: datetime) -> Period:
        """The current period of ``kind`` (kept until it ends)."""
        period = self._periods.get(kind)
        if period is None or (period.end is not None and now >= period.end):
            period = period_of(kind, now)
            self._periods[kind] = period
        return period

    async def aclose(self) -> None:
        await self.limiter.aclose()


def _key_label(principal: Principal) -> str:
    return f'key "{principal.name}"' if principal.name else f"key {principal.key_id}"


def _owner_label(owner: Principal | Team) -> str:
    return _key_label(owner) if isinstance(owner, Principal) else f'team "{owner.name}"'


def _rate(scope: str, kind: RateKind, limit: int, amount: int, label: str) -> RateDemand:
    return RateDemand(f"{PREFIX}:rate:{scope}:{kind}", kind, limit, amount, label)


_REQUEST_HEADERS = tuple(
    f"x-ratelimit-{what}-requests".encode() for what in ("limit", "remaining", "reset")
)
_TOKEN_HEADERS = tuple(
    f"x-ratelimit-{what}-tokens".encode() for what in ("limit", "remaining", "reset")
)


def rate_headers(levels: Iterable[Level]) -> Headers:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``:
    of the tightest bucket of each kind (the one with the least left)."""
    levels = tuple(levels)
    return headers_of([level.demand for level in levels], [level.remaining for level in levels])


# Per kind of bucket: its three header names and the indexes of its demands.
HeaderKinds = tuple[tuple[tuple[bytes, ...], tuple[int, ...]], ...]


def header_kinds(demands: Sequence[RateDemand]) -> HeaderKinds:
    requests = tuple(i for i, d in enumerate(demands) if d.kind == "requests")
    tokens = tuple(i for i, d in enumerate(demands) if d.kind != "requests")
    return tuple(
        (names, indexes)
        for names, indexes in ((_REQUEST_HEADERS, requests), (_TOKEN_HEADERS, tokens))
        if indexes
    )


def headers_of(
    demands: Sequence[RateDemand], left: Sequence[float], kinds: HeaderKinds | None = None
) -> Headers:
    """:func:`rate_headers` of buckets ``demands`` holding ``left``
    (``kinds``: :func:`header_kinds` of ``demands``, if known)."""
    headers: Headers = []
    # (Inline, not a helper per kind: this runs on every limited request.)
    for names, indexes in header_kinds(demands) if kinds is None else kinds:
        tightest = indexes[0]
        for index in indexes:
            if left[index] < left[tightest]:
                tightest = index
        limit = demands[tightest].limit
        remaining = left[tightest]
        missing = limit - remaining
        headers.append((names[0], b"%d" % limit))
        # (int() is floor for what is not negative)
        headers.append((names[1], b"%d" % (int(remaining) if remaining > 0 else 0)))
        reset = missing * SECONDS_PER_WINDOW / limit if missing > 0 else 0.0
        if reset < 1:  # duration()'s first case, without its call and str
            headers.append((names[2], b"%dms" % math.ceil(reset * 1000)))
        else:
            headers.append((names[2], duration(reset).encode()))
    return headers


def duration(seconds: float) -> str:
    """As OpenAI writes its resets: ``17ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _rate_error(verdict: RateRefused) -> RateLimitError:
    demand = verdict.demand
    unit = "requests" if demand.kind == "requests" else "tokens"
    headers = dict((k.decode(), v.decode()) for k, v in rate_headers(verdict.levels))
    if verdict.retry_after is None:
        headers["x-should-retry"] = "false"
        return RateLimitError(
            f"This request may use up to {demand.amount} tokens, more than the {demand.limit} "
            f"{unit} per minute of {demand.owner}: lower max_tokens or the prompt.",
            headers=headers,
        )
    wait = max(math.ceil(verdict.retry_after), 1)
    headers["Retry-After"] = str(wait)
    return RateLimitError(
        f"Rate limit reached for {demand.owner}: {demand.limit} {unit} per minute. "
        f"Retry after {wait} s.",
        headers=headers,
    )


def _quota_error(verdict: BudgetRefused, worst_case_nano: int) -> QuotaExceededError:
    demand = verdict.demand
    label = describe(demand.owner, Budget(demand.limit, demand.period))
    message = (
        f"{label[0].upper()}{label[1:]} cannot cover this request: "
        f"{to_usd(verdict.used):.6f} USD spent or reserved, and this request may cost up to "
        f"{to_usd(worst_case_nano):.6f} USD; {resets(demand.ends)}."
    )
    return QuotaExceededError(message, headers={"x-should-retry": "false"})
