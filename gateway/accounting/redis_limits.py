"""The limiter shared by every worker and replica: Redis, one round trip per
admission and one per settlement, each a Lua script (atomic: Redis runs a
script to its end before any other command). Admissions that arrive together
(in one turn of the event loop) share a pipelined round trip, as settlements
do: redis-py's cost is per command sent and per reply read, a good part of a
request's CPU at high concurrency (docs/benchmarks.md, issue 13). Each script
still runs alone and whole.

The semantics are exactly :class:`~gateway.accounting.limits.MemoryLimiter`'s;
the clock is Redis's own (``TIME``), so replicas whose clocks differ still
share one. State, all under ``nomoat:``:

- a rate bucket is a hash ``{level, at}``, dropped once it would be full again;
- a budget is a hash ``{spent, reserved, r:<ticket>...}`` and a sorted set of
  its reservations by expiry, kept until its period is over (plus a day).

Redis unreachable (refused, timed out): :class:`LimiterUnavailableError`,
which the gate turns into 503 for the requests that have limits (fail closed:
nothing is admitted that could not be counted). A settlement that cannot be
sent is kept and sent again by the sender task, so a short outage loses no
spend.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from gateway.accounting.limits import (
    Admitted,
    BudgetDemand,
    BudgetRefused,
    Level,
    LimiterUnavailableError,
    RateDemand,
    RateRefused,
    Settlement,
    Verdict,
)

_log = logging.getLogger(__name__)
CONNECT_SECONDS = 0.5
COMMAND_SECONDS = 1.0
RETRY_SECONDS = 1.0
CLOSE_SECONDS = 5.0
# Settlements sent in one pipelined round trip at most.
BATCH = 256
# Settlements kept while Redis is away; past this, the oldest are dropped
# (their reservations then expire: the budget is blocked, never overspent).
MAX_PENDING = 100_000

_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local nr, nb, ticket, hold = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local levels = {}
for r = 1, nr do
  local limit = tonumber(ARGV[3 + 2 * r])
  local state = redis.call('HMGET', KEYS[r], 'level', 'at')
  local level = limit
  if state[1] then
    level = math.min(limit, tonumber(state[1]) + (now - tonumber(state[2])) * limit / 60)
  end
  levels[r] = level
end
for r = 1, nr do
  local limit, amount = tonumber(ARGV[3 + 2 * r]), tonumber(ARGV[4 + 2 * r])
  if levels[r] < amount then
    local wait = -1
    if amount <= limit then wait = (amount - levels[r]) * 60 / limit end
    local out = {'rate', r, tostring(wait)}
    for i = 1, nr do out[#out + 1] = tostring(levels[i]) end
    return out
  end
end
local base = 5 + 2 * nr
for b = 1, nb do
  local hkey, zkey = KEYS[nr + 2 * b - 1], KEYS[nr + 2 * b]
  local a = base + 4 * (b - 1)
  local limit, amount, keep = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3])
  redis.call('HSETNX', hkey, 'spent', ARGV[a + 2])
  if keep >= 0 then redis.call('EXPIRE', hkey, keep) end
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', now)) do
    local held = redis.call('HGET', hkey, 'r:' .. gone)
    if held then
      -- (Redis takes no "-0": a reservation of 0, a free model's, has nothing to give back)
      if held ~= '0' then redis.call('HINCRBY', hkey, 'reserved', '-' .. held) end
      redis.call('HDEL', hkey, 'r:' .. gone)
    end
    redis.call('ZREM', zkey, gone)
  end
  local spent = tonumber(redis.call('HGET', hkey, 'spent'))
  local reserved = tonumber(redis.call('HGET', hkey, 'reserved') or '0')
  if spent + reserved + amount > limit then
    return {'budget', b, tostring(spent + reserved)}
  end
end
local out = {'ok'}
for r = 1, nr do
  local limit, amount = tonumber(ARGV[3 + 2 * r]), tonumber(ARGV[4 + 2 * r])
  local left = levels[r] - amount
  redis.call('HSET', KEYS[r], 'level', tostring(left), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[r], math.ceil((limit - left) * 60 / limit) + 1)
  out[#out + 1] = tostring(left)
end
for b = 1, nb do
  local hkey, zkey = KEYS[nr + 2 * b - 1], KEYS[nr + 2 * b]
  local a = base + 4 * (b - 1)
  local keep = tonumber(ARGV[a + 3])
  redis.call('HINCRBY', hkey, 'reserved', ARGV[a + 1])
  redis.call('HSET', hkey, 'r:' .. ticket, ARGV[a + 1])
  redis.call('ZADD', zkey, now + hold, ticket)
  if keep >= 0 then redis.call('EXPIRE', zkey, keep) end
end
return out
"""

_SETTLE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local nr, nb, ticket = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for r = 1, nr do
  local limit, correction = tonumber(ARGV[2 + 2 * r]), tonumber(ARGV[3 + 2 * r])
  local state = redis.call('HMGET', KEYS[r], 'level', 'at')
  local level = limit
  if state[1] then
    level = math.min(limit, tonumber(state[1]) + (now - tonumber(state[2])) * limit / 60)
  end
  level = math.min(limit, level + correction)
  redis.call('HSET', KEYS[r], 'level', tostring(level), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[r], math.ceil((limit - level) * 60 / limit) + 1)
end
local base = 4 + 2 * nr
for b = 1, nb do
  local hkey, zkey = KEYS[nr + 2 * b - 1], KEYS[nr + 2 * b]
  local a = base + 2 * (b - 1)
  local held = redis.call('HGET', hkey, 'r:' .. ticket)
  if held then
    -- (Redis takes no "-0": a reservation of 0, a free model's, has nothing to give back)
    if held ~= '0' then redis.call('HINCRBY', hkey, 'reserved', '-' .. held) end
    redis.call('HDEL', hkey, 'r:' .. ticket)
  end
  redis.call('ZREM', zkey, ticket)
  redis.call('HINCRBY', hkey, 'spent', ARGV[a])
  local keep = tonumber(ARGV[a + 1])
  if keep >= 0 then redis.call('EXPIRE', hkey, keep) end
end
return 1
"""


# An admission's script keys and arguments, and the future its reply goes to.
_Admission = tuple[list[str], list[str | int], "asyncio.Future[list[bytes | int]]"]


def _reservations_key(budget: BudgetDemand) -> str:
    return budget.key + ":reservations"


def _keep(budget: BudgetDemand) -> str:
    return "-1" if budget.keep_seconds is None else str(budget.keep_seconds)


class RedisLimiter:
    """Limits and budgets in Redis (``[accounting] redis``)."""

    def __init__(self, url: str, reservation_seconds: float) -> None:
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_SECONDS,
            socket_timeout=COMMAND_SECONDS,
            health_check_interval=30,
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._reservation_seconds = reservation_seconds
        self._hold = str(reservation_seconds)
        self._pending: deque[Settlement] = deque(maxlen=MAX_PENDING)
        # Admissions waiting for this turn of the loop to end (see _flush).
        self._admissions: list[_Admission] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    async def admit(
        self, ticket: str, rates: tuple[RateDemand, ...], budgets: tuple[BudgetDemand, ...]
    ) -> Verdict:
        keys = [d.key for d in rates]
        args: list[str | int] = [len(rates), len(budgets), ticket, self._hold]
        for demand in rates:
            args += [demand.limit, demand.amount]
        for budget in budgets:
            keys += [budget.key, _reservations_key(budget)]
            args += [budget.limit, budget.amount, budget.seed, _keep(budget)]
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[list[bytes | int]] = loop.create_future()
        self._admissions.append((keys, args, reply))
        if len(self._admissions) == 1:
            loop.call_soon(self._flush)
        return _verdict(await reply, rates, budgets)

    def _flush(self) -> None:
        """Send the admissions of this turn of the loop, in one round trip."""
        batch, self._admissions = self._admissions, []
        task = asyncio.create_task(self._send_admissions(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_admissions(self, batch: list[_Admission]) -> None:
        try:
            if len(batch) == 1:
                keys, args, _ = batch[0]
                replies = [await self._admit(keys=keys, args=args)]
            else:
                replies = await self._pipelined(self._admit, [(k, a) for k, a, _ in batch])
        except RedisError as error:
            for _, _, waiting in batch:
                if not waiting.done():
                    waiting.set_exception(LimiterUnavailableError(f"Redis: {error}"))
            return
        except BaseException as error:
            # Cancelled (shutdown) or a bug: no request waits for ever.
            for _, _, waiting in batch:
                if not waiting.done():
                    waiting.set_exception(LimiterUnavailableError(f"Redis: {error!r}"))
            raise
        for (_, _, waiting), reply in zip(batch, replies, strict=True):
            if not waiting.done():
                waiting.set_result(reply)

    def settle(self, settlement: Settlement) -> None:
        """Queued for the sender task, which sends what is queued in one
        pipelined round trip, and again after a pause while Redis is away."""
        self._pending.append(settlement)
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_pending())

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def drain(self) -> None:
        while self._pending and self._sender is not None and not self._sender.done():
            self._drained.clear()
            await self._drained.wait()

    async def _send_pending(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [self._pending[i] for i in range(min(len(self._pending), BATCH))]
                try:
                    await self._send(batch)
                except RedisError as error:
                    _log.warning(
                        "limits: Redis unreachable, %d settlements kept (%s)",
                        len(self._pending),
                        error,
                    )
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                for _ in batch:
                    self._pending.popleft()
            self._drained.set()

    async def _send(self, batch: list[Settlement]) -> None:
        calls: list[tuple[list[str], list[str | int]]] = []
        for settlement in batch:
            keys = [d.key for d, _ in settlement.refunds]
            args: list[str | int] = [
                len(settlement.refunds),
                len(settlement.charges),
                settlement.ticket,
            ]
            for demand, correction in settlement.refunds:
                args += [demand.limit, correction]
            for budget, charge in settlement.charges:
                keys += [budget.key, _reservations_key(budget)]
                args += [charge, _keep(budget)]
            calls.append((keys, args))
        await self._pipelined(self._settle, calls)

    async def _pipelined(
        self, script: AsyncScript, calls: list[tuple[list[str], list[str | int]]]
    ) -> list[object]:
        """``script`` run once per call, in one pipelined round trip: its
        replies in order, or the first error raised. By EVALSHA alone:
        redis-py's own pipelining of a script asks ``SCRIPT EXISTS`` first,
        a second round trip on every batch. A script Redis lost (restarted,
        ``SCRIPT FLUSH``) is loaded again and the calls it refused sent again
        (a refused call did not run)."""
        replies = await self._evalsha(script.sha, calls)
        lost = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            script.sha = await self._redis.script_load(script.script)
            again = await self._evalsha(script.sha, [calls[index] for index in lost])
            for index, reply in zip(lost, again, strict=True):
                replies[index] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _evalsha(
        self, sha: str, calls: list[tuple[list[str], list[str | int]]]
    ) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies: list[object] = await pipe.execute(raise_on_error=False)
        return replies

    async def aclose(self) -> None:
        if self._pending:
            try:
                async with asyncio.timeout(CLOSE_SECONDS):
                    await self.drain()
            except TimeoutError:
                _log.warning(
                    "limits: %d settlements not sent at shutdown (their reservations expire)",
                    len(self._pending),
                )
        if self._sender is not None:
            self._sender.cancel()
        for task in list(self._sending):
            task.cancel()
        await self._redis.aclose()


def _verdict(
    reply: list[bytes | int], rates: tuple[RateDemand, ...], budgets: tuple[BudgetDemand, ...]
) -> Verdict:
    outcome = reply[0]
    if outcome == b"ok":
        return Admitted(tuple(Level(d, float(v)) for d, v in zip(rates, reply[1:], strict=True)))
    if outcome == b"rate":
        levels = tuple(Level(d, float(v)) for d, v in zip(rates, reply[3:], strict=True))
        wait = float(reply[2])
        return RateRefused(rates[int(reply[1]) - 1], None if wait < 0 else wait, levels)
    used = float(reply[2])
    return BudgetRefused(budgets[int(reply[1]) - 1], int(used) if math.isfinite(used) else 0)
