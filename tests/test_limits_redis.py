"""The Redis limiter against a real Redis (tests/services.py): the same
semantics as in memory, atomic across limiters (replicas), Redis's own
clock, reservations that expire, and what happens when Redis is away:
admissions fail closed (503), settlements are kept and sent once it is back."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from gateway.accounting.admission import Bounds, Gate, LimitsUnavailableError, QuotaExceededError
from gateway.accounting.budgets import Seeds
from gateway.accounting.limits import (
    Admitted,
    BudgetDemand,
    BudgetRefused,
    LimiterUnavailableError,
    RateDemand,
    RateRefused,
    Settlement,
)
from gateway.accounting.principal import Budget, Principal, RateLimits
from gateway.accounting.redis_limits import RedisLimiter

pytestmark = pytest.mark.e2e


def rate(limit: int, amount: int = 1, kind: str = "requests") -> RateDemand:
    return RateDemand(f"nomoat:rate:key:k:{kind}", kind, limit, amount, "key k")  # type: ignore[arg-type]


def budget(limit: int, amount: int, seed: int = 0) -> BudgetDemand:
    return BudgetDemand(
        "nomoat:budget:key:k:total:total", limit, amount, seed, None, "key k", "total", None
    )


def test_buckets_and_budgets_in_redis(redis_url: str) -> None:
    async def run() -> None:
        limiter = RedisLimiter(redis_url, 3600)
        try:
            verdicts = [await limiter.admit(f"t{i}", (rate(3),), ()) for i in range(4)]
            assert [type(v) for v in verdicts] == [Admitted, Admitted, Admitted, RateRefused]
            refused = verdicts[3]
            assert isinstance(refused, RateRefused)
            assert refused.retry_after is not None and 19 < refused.retry_after <= 20
            first = verdicts[0]
            assert isinstance(first, Admitted) and first.levels[0].remaining == pytest.approx(2)
            too_big = await limiter.admit("x", (rate(100, 101, "tokens"),), ())
            assert isinstance(too_big, RateRefused) and too_big.retry_after is None

            demand = budget(limit=30, amount=10, seed=5)
            outcomes = [await limiter.admit(f"b{i}", (), (demand,)) for i in range(3)]
            assert [type(v) for v in outcomes] == [Admitted, Admitted, BudgetRefused]
            assert isinstance(outcomes[2], BudgetRefused) and outcomes[2].used == 25
            limiter.settle(Settlement("b0", charges=((demand, 3),)))
            limiter.settle(Settlement("b1", charges=((demand, 0),)))
            await limiter.drain()
        finally:
            await limiter.aclose()
        state = redis.Redis.from_url(redis_url).hgetall(demand.key)
        assert state == {b"spent": b"8", b"reserved": b"0"}

    asyncio.run(run())


def test_two_limiters_share_one_budget_under_a_hundred_concurrent_admissions(
    redis_url: str,
) -> None:
    """Two replicas' limiters, 50 admissions each at once, a budget that
    covers 3 worst cases: exactly 3 pass."""

    async def run() -> None:
        replicas = [RedisLimiter(redis_url, 3600) for _ in range(2)]
        seeds = Seeds(datetime.now(UTC))
        gates = [Gate(limiter, seeds) for limiter in replicas]
        key = Principal("k", budget=Budget(30, "total"), limits=RateLimits(rpm=1000))
        try:
            outcomes = await asyncio.gather(
                *(gates[i % 2].admit(key, "m", Bounds(1, 1), 10) for i in range(100)),
                return_exceptions=True,
            )
        finally:
            for limiter in replicas:
                await limiter.aclose()
        admitted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(admitted) == 3
        assert all(isinstance(o, QuotaExceededError) for o in refused), refused[:3]

    asyncio.run(run())


def test_a_batch_is_one_round_trip_and_survives_a_flushed_script(redis_url: str) -> None:
    """Batches of admissions and settlements are EVALSHA alone (redis-py's
    pipelining of a script asks SCRIPT EXISTS first: a second round trip per
    batch), and a script Redis lost is loaded again, each call run once."""
    client = redis.Redis.from_url(redis_url)

    def script_checks() -> int:
        stats = client.info("commandstats")
        return sum(
            int(stats[name]["calls"]) for name in stats if "exists" in name or "load" in name
        )

    async def run() -> None:
        limiter = RedisLimiter(redis_url, 3600)
        try:
            await limiter.admit("warm", (rate(100),), ())
            client.config_resetstat()
            verdicts = await asyncio.gather(
                *(limiter.admit(f"b{i}", (rate(100),), (budget(1000, 10),)) for i in range(8))
            )
            assert all(isinstance(v, Admitted) for v in verdicts)
            for i in range(8):
                limiter.settle(Settlement(f"b{i}", charges=((budget(1000, 10), 3),)))
            await limiter.drain()
            assert script_checks() == 0
            client.script_flush()
            again = await asyncio.gather(
                *(limiter.admit(f"c{i}", (rate(100),), ()) for i in range(5))
            )
            assert [round(v.levels[0].remaining) for v in again if isinstance(v, Admitted)] == [
                90,
                89,
                88,
                87,
                86,
            ]
            client.script_flush()
            limiter.settle(Settlement("c0", refunds=((rate(100, 1, "tokens"), 0),)))
            limiter.settle(Settlement("c1", charges=((budget(1000, 10), 5),)))
            await limiter.drain()
        finally:
            await limiter.aclose()
        spent = client.hget("nomoat:budget:key:k:total:total", "spent")
        assert spent is not None and int(spent) == 8 * 3 + 5

    asyncio.run(run())
    client.close()


def test_a_free_request_settles_and_its_expired_reservation_is_swept(redis_url: str) -> None:
    """A reservation of 0 nano-USD (a model without prices): Redis takes no
    "-0", and its settlement (with the token refund in it) and the sweep of
    it once expired must not fail."""

    async def run() -> None:
        limiter = RedisLimiter(redis_url, 0.05)
        tokens = rate(1000, 600, "tokens")
        free = budget(1000, 0)
        try:
            assert isinstance(await limiter.admit("f0", (tokens,), (free,)), Admitted)
            limiter.settle(Settlement("f0", refunds=((tokens, 590),), charges=((free, 0),)))
            await asyncio.wait_for(limiter.drain(), 3)
            assert limiter.pending == 0
            # 590 of the 600 given back: room for another 600.
            assert isinstance(await limiter.admit("f1", (tokens,), (free,)), Admitted)
            await asyncio.sleep(0.1)  # f1's reservation of 0 expires and is swept
            assert isinstance(await limiter.admit("f2", (), (free,)), Admitted)
        finally:
            await limiter.aclose()

    asyncio.run(run())


def test_admissions_sent_together_each_get_their_own_reply(redis_url: str) -> None:
    """Admissions made in one turn of the loop share a pipelined round trip;
    each still gets its own script's reply: 40 buckets of different limits,
    one admission each, at once, and a further 30 on one bucket of 10."""

    async def run() -> None:
        limiter = RedisLimiter(redis_url, 3600)
        try:
            own = [
                RateDemand(f"nomoat:rate:key:own{i}:requests", "requests", i + 1, 1, "key")
                for i in range(40)
            ]
            verdicts = await asyncio.gather(
                *(limiter.admit(f"o{i}", (demand,), ()) for i, demand in enumerate(own))
            )
            shared = await asyncio.gather(
                *(limiter.admit(f"s{i}", (rate(10),), ()) for i in range(30))
            )
        finally:
            await limiter.aclose()
        for i, verdict in enumerate(verdicts):
            assert isinstance(verdict, Admitted)
            assert verdict.levels[0].remaining == pytest.approx(i, abs=0.01)
        admitted = [v for v in shared if isinstance(v, Admitted)]
        assert len(admitted) == 10
        left = sorted(round(v.levels[0].remaining) for v in admitted)
        assert left == list(range(10))

    asyncio.run(run())


def test_a_reservation_never_settled_expires_in_redis(redis_url: str) -> None:
    async def run() -> None:
        limiter = RedisLimiter(redis_url, reservation_seconds=0.3)
        try:
            demand = budget(limit=10, amount=10)
            assert isinstance(await limiter.admit("dead", (), (demand,)), Admitted)
            assert isinstance(await limiter.admit("a", (), (demand,)), BudgetRefused)
            await asyncio.sleep(0.35)
            assert isinstance(await limiter.admit("b", (), (demand,)), Admitted)
        finally:
            await limiter.aclose()

    asyncio.run(run())


def test_a_seed_fills_only_a_budget_redis_does_not_hold(redis_url: str) -> None:
    async def run() -> None:
        limiter = RedisLimiter(redis_url, 3600)
        try:
            await limiter.admit("a", (), (budget(limit=100, amount=1, seed=40),))
            # A replica started later, seeded from a ledger that lags: Redis wins.
            verdict = await limiter.admit("b", (), (budget(limit=100, amount=60, seed=0),))
            assert isinstance(verdict, BudgetRefused) and verdict.used == 41
        finally:
            await limiter.aclose()

    asyncio.run(run())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_redis_unreachable_fails_closed_with_503_only_for_limited_requests() -> None:
    async def run() -> None:
        limiter = RedisLimiter(f"redis://127.0.0.1:{_closed_port()}/0", 3600)
        gate = Gate(limiter, Seeds(datetime.now(UTC)))
        try:
            started = time.monotonic()
            with pytest.raises(LimiterUnavailableError):
                await limiter.admit("a", (rate(3),), ())
            with pytest.raises(LimitsUnavailableError) as unavailable:
                await gate.admit(Principal("k", limits=RateLimits(rpm=5)), "m", Bounds(1, 1), 0)
            assert time.monotonic() - started < 3
            assert unavailable.value.status_code == 503
            assert unavailable.value.code == "limits_unavailable"
            # A key without limits never needs Redis.
            await gate.admit(Principal("free"), "m", Bounds(1, 1), 0)
        finally:
            await limiter.aclose()

    asyncio.run(run())


@contextmanager
def _redis_on(port: int, directory: Path) -> Iterator[None]:
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(directory)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


def test_settlements_made_while_redis_is_away_are_sent_when_it_is_back(tmp_path: Path) -> None:
    port = _closed_port()
    demand = budget(limit=1000, amount=100)

    async def run() -> None:
        limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", 3600)
        try:
            with _redis_on(port, tmp_path):
                assert isinstance(await limiter.admit("a", (), (demand,)), Admitted)
            limiter.settle(Settlement("a", charges=((demand, 42),)))
            await asyncio.sleep(0.1)
            assert limiter.pending == 1
            with _redis_on(port, tmp_path):
                async with asyncio.timeout(10):
                    await limiter.drain()
                assert limiter.pending == 0
                assert redis.Redis(port=port).hget(demand.key, "spent") == b"42"
        finally:
            await limiter.aclose()

    asyncio.run(run())
