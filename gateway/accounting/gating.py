"""The gate as the server builds and uses it: from the settings, the ledger
and the keys' limits, with the refusals of configurations whose limits
would not hold.

Where limits live, and why:

- a key's and a team's (rpm, tpm, budget) on the key or team: managed ones
  in the database (``/admin/keys``), static ones in
  ``[[accounting.static_keys]]`` beside their hash;
- a model's (rpm, tpm) in ``[models.NAME]``: a model's limit protects the
  capacity of its deployments, which are configured there too, and counts
  every key's requests to it (an alias counts as its model).

Several processes (``--workers``, or replicas sharing a PostgreSQL ledger)
each holding limits in their own memory would each admit a full limit:
with limits configured and no ``[accounting] redis``, such a configuration
is refused at start-up; a managed key given limits later, while it runs so,
gets 503 ``limits_unavailable`` rather than limits that do not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import wire
from gateway.accounting.admission import Bounds, Gate, Ticket, request_bounds
from gateway.accounting.budgets import Seeds, load_seeds
from gateway.accounting.db import async_url, is_sqlite, open_engine
from gateway.accounting.limits import Limiter, MemoryLimiter
from gateway.accounting.money import to_nano
from gateway.accounting.prices import PriceBook
from gateway.accounting.principal import Budget, Principal, RateLimits
from gateway.accounting.tables import api_keys, teams
from gateway.auth import key_fingerprint
from gateway.catalog import Catalog
from gateway.settings import Settings

_log = logging.getLogger(__name__)


class UnsafeLimitsError(Exception):
    """A configuration whose limits several processes would each enforce alone."""


def static_principals(settings: Settings) -> dict[str, Principal]:
    """The static keys that have limits, by fingerprint (the key id)."""
    principals = {}
    for key in settings.accounting.static_keys:
        key_id = key_fingerprint(key.key_hash)
        budget = None
        if key.budget_usd is not None and key.budget_period is not None:
            budget = Budget(to_nano(key.budget_usd), key.budget_period)
        principals[key_id] = Principal(
            key_id, key.name, budget=budget, limits=RateLimits(key.rpm, key.tpm)
        )
    return principals


def model_limits(settings: Settings) -> dict[str, RateLimits]:
    return {
        name: RateLimits(model.rpm, model.tpm)
        for name, model in settings.models.items()
        if model.rpm is not None or model.tpm is not None
    }


def shared_without_redis(settings: Settings, workers: int) -> str | None:
    """Why this gateway's processes would each enforce limits alone, or None."""
    accounting = settings.accounting
    if accounting.redis:
        return None
    if workers > 1:
        return f"{workers} worker processes share no limits without [accounting] redis"
    if not is_sqlite(async_url(accounting.database)):
        return "replicas sharing a PostgreSQL ledger share no limits without [accounting] redis"
    return None


def config_refusal(settings: Settings, workers: int = 1) -> str | None:
    """The start-up refusal of limits in the configuration that would not
    hold (checked before the server starts), or None."""
    reason = shared_without_redis(settings, workers)
    if reason is None or not settings.accounting.enabled:
        return None
    limited = [f"models.{name}" for name in model_limits(settings)]
    limited += ["accounting.static_keys"] if settings.accounting.static_keys else []
    if not limited:
        return None
    return (
        f"nomoat: refusing to start: {', '.join(limited)} set limits, but {reason}; "
        'set [accounting] redis = "redis://HOST:PORT/DB"'
    )


async def database_has_limits(engine: AsyncEngine) -> bool:
    """Whether a live key or team in the database has a limit or a budget."""
    keys = select(api_keys.c.id).where(
        api_keys.c.revoked_at.is_(None),
        or_(
            api_keys.c.rpm.isnot(None),
            api_keys.c.tpm.isnot(None),
            api_keys.c.budget_nano.isnot(None),
        ),
    )
    team_rows = select(teams.c.id).where(
        teams.c.deleted_at.is_(None),
        or_(teams.c.rpm.isnot(None), teams.c.tpm.isnot(None), teams.c.budget_nano.isnot(None)),
    )
    try:
        async with engine.connect() as connection:
            for query in (keys.limit(1), team_rows.limit(1)):
                if (await connection.execute(query)).first() is not None:
                    return True
    except (OperationalError, ProgrammingError):
        return False  # not migrated yet: no keys
    return False


def build_limiter(settings: Settings) -> Limiter:
    accounting = settings.accounting
    if accounting.redis:
        if importlib.util.find_spec("redis") is None:
            raise UnsafeLimitsError(
                "nomoat: accounting.redis needs the redis extra: pip install 'nomoat[redis]'"
            )
        from gateway.accounting.redis_limits import RedisLimiter

        return RedisLimiter(accounting.redis, accounting.reservation_seconds)
    return MemoryLimiter(accounting.reservation_seconds)


async def open_gate(
    settings: Settings,
    stack: AsyncExitStack,
    workers: int = 1,
    engine: AsyncEngine | None = None,
) -> Gate | None:
    """The gate, seeded from the ledger (through ``engine``, the accounting
    runtime's, else one opened for the purpose); None with accounting off.
    Raises :class:`UnsafeLimitsError` when the database holds limits that
    this set-up's processes would each enforce alone."""
    if not settings.accounting.enabled:
        return None
    refusal = config_refusal(settings, workers)
    if refusal is not None:
        raise UnsafeLimitsError(refusal)
    url = async_url(settings.accounting.database)
    reason = shared_without_redis(settings, workers)
    if engine is None and _no_ledger_file(url.database if is_sqlite(url) else None):
        # No ledger yet (and no keys): nothing spent; nothing created here.
        gate = Gate(build_limiter(settings), empty_seeds(), model_limits(settings), reason)
        stack.push_async_callback(gate.aclose)
        return gate
    reading = engine or open_engine(url)
    seeds: Seeds | None = None
    try:
        seeds = await load_seeds(reading, datetime.now(UTC))
        if reason is not None and await database_has_limits(reading):
            raise UnsafeLimitsError(
                f"nomoat: refusing to start: keys or teams in the database have limits, but "
                f'{reason}; set [accounting] redis = "redis://HOST:PORT/DB"'
            )
    except (OSError, SQLAlchemyError) as error:
        # The database is unreachable: serve (as the ledger does), refuse
        # requests with budgets (503) until the spend can be read.
        _log.warning("budgets: cannot read what was spent from the database yet: %s", error)
    finally:
        if engine is None and seeds is not None:
            await reading.dispose()
    gate = Gate(build_limiter(settings), seeds, model_limits(settings), reason)
    stack.push_async_callback(gate.aclose)
    if seeds is None:
        retrying = asyncio.create_task(_seed_when_reachable(gate, reading, engine is None))
        stack.push_async_callback(_cancelled, retrying)
    return gate


SEED_RETRY_SECONDS = 5.0


async def _seed_when_reachable(gate: Gate, engine: AsyncEngine, owned: bool) -> None:
    """Read the spend again until the database answers (then budgets work)."""
    try:
        while gate.seeds is None:
            await asyncio.sleep(SEED_RETRY_SECONDS)
            with contextlib.suppress(OSError, SQLAlchemyError):
                gate.seeds = await load_seeds(engine, datetime.now(UTC))
    finally:
        if owned:
            await engine.dispose()


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _no_ledger_file(path: str | None) -> bool:
    """A SQLite ledger that does not exist yet (a stat at start-up, once)."""
    return bool(path) and not Path(str(path)).exists()


class Admission:
    """What the HTTP handler calls: the principal of a key, the bounds of a
    body, the worst case from the prices, then the gate."""

    def __init__(
        self,
        gate: Gate,
        catalog: Catalog,
        max_tokens_ceiling: int,
        prices: PriceBook | None = None,
        hooks_may_reroute: bool = False,
    ) -> None:
        self.gate = gate
        self.catalog = catalog
        self.ceiling = max_tokens_ceiling
        self.prices = prices
        # Request hooks may change the model: the worst case is then the
        # dearest deployment of all.
        self.hooks_may_reroute = hooks_may_reroute

    async def admit(
        self,
        principal: Principal | None,
        request: wire.ChatCompletionRequest | wire.CompletionRequest,
        body_bytes: int,
    ) -> Ticket | None:
        """The request's ticket, None when it has no limit and no budget."""
        # (A name the catalog does not know is its own canonical name.)
        model = self.catalog.canonical(request.model)
        gate = self.gate
        if not gate.limited(principal, model):
            return None
        bounds = request_bounds(request, body_bytes, self.ceiling)
        prices = self.prices
        if prices is not None and model in self.catalog.models and not self.hooks_may_reroute:
            # (_worst_case's usual case, inline)
            worst_case = prices.model_worst_case_nano(
                model, bounds.prompt_tokens, bounds.completion_tokens
            )
        else:
            worst_case = self._worst_case(model, bounds)
        ticket = gate.admit_at_once(principal, model, bounds, worst_case)
        if ticket is not None:
            return ticket
        return await gate.admit_limited(principal, model, bounds, worst_case)

    def _worst_case(self, model: str, bounds: Bounds) -> int:
        """At the prices of every deployment that may serve it: the model's
        and its fallbacks'; every deployment's for a name the catalog does
        not know (an adapter, a stack) or when hooks may change the model."""
        if self.prices is None:
            return 0
        if model in self.catalog.models and not self.hooks_may_reroute:
            return self.prices.model_worst_case_nano(
                model, bounds.prompt_tokens, bounds.completion_tokens
            )
        deployments = tuple(d for m in self.catalog.models for d in self.prices.reachable(m))
        return self.prices.worst_case_nano(
            deployments, bounds.prompt_tokens, bounds.completion_tokens
        )


def empty_seeds() -> Seeds:
    return Seeds(datetime.now(UTC))


async def start_admission(
    settings: Settings,
    catalog: Catalog,
    stack: AsyncExitStack,
    engine: AsyncEngine | None = None,
    workers: int = 1,
) -> Admission | None:
    """The server's admission (None with accounting off), closed with ``stack``."""
    gate = await open_gate(settings, stack, workers, engine)
    if gate is None:
        return None
    return Admission(
        gate,
        catalog,
        settings.limits.max_tokens_ceiling,
        PriceBook.from_settings(settings),
        hooks_may_reroute=bool(settings.hooks),
    )
