"""Rate limits and budgets (gateway/accounting/admission.py), in memory: the
limiter's buckets and reservations on an explicit clock, the gate's errors
and headers, the ledger's seeds, the configuration's refusals; and through
the real gateway in process with the official SDK."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from datetime import UTC, date, datetime
from pathlib import Path

import openai
import pytest
from sqlalchemy import insert

from gateway.accounting.admission import (
    Bounds,
    Gate,
    LimitsUnavailableError,
    QuotaExceededError,
    duration,
)
from gateway.accounting.budgets import Seeds, load_seeds, period_of
from gateway.accounting.db import async_url, migrate_async, open_engine
from gateway.accounting.gating import config_refusal
from gateway.accounting.limits import (
    Admitted,
    BudgetDemand,
    BudgetRefused,
    LimiterUnavailableError,
    MemoryLimiter,
    RateDemand,
    RateRefused,
    Settlement,
    Verdict,
)
from gateway.accounting.principal import Budget, Principal, RateLimits, Team
from gateway.auth import hash_api_key, key_fingerprint
from gateway.errors import RateLimitError
from gateway.settings import Settings, reference_problems
from tests.conftest import Cli

from .conftest import Start
from .support import chat_body, error_of, pool

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def rate(limit: int, amount: int = 1, kind: str = "requests", key: str = "k") -> RateDemand:
    return RateDemand(f"rate:{key}:{kind}", kind, limit, amount, f'key "{key}"')  # type: ignore[arg-type]


def budget(limit: int, amount: int, seed: int = 0, key: str = "b") -> BudgetDemand:
    return BudgetDemand(key, limit, amount, seed, None, "key x", "total", None)


# ------------------------------------------------------------ the limiter


def test_a_request_bucket_admits_its_limit_then_one_per_refill() -> None:
    limiter = MemoryLimiter(3600)
    demand = (rate(3),)
    verdicts = [limiter.admit_now(f"t{i}", demand, (), 100.0) for i in range(4)]
    assert [type(v) for v in verdicts] == [Admitted, Admitted, Admitted, RateRefused]
    refused = verdicts[3]
    assert isinstance(refused, RateRefused)
    # 3 per minute: one more every 20 s.
    assert refused.retry_after == pytest.approx(20.0)
    assert isinstance(limiter.admit_now("t5", demand, (), 119.0), RateRefused)
    assert isinstance(limiter.admit_now("t6", demand, (), 120.0), Admitted)


def test_tokens_are_reserved_at_the_bound_and_settled_to_the_use() -> None:
    limiter = MemoryLimiter(3600)
    big = rate(1000, 600, "tokens")
    first = limiter.admit_now("a", (big,), (), 0.0)
    assert isinstance(first, Admitted) and first.levels[0].remaining == 400
    assert isinstance(limiter.admit_now("b", (big,), (), 0.0), RateRefused)
    # It used 100 of its 600: 500 go back.
    limiter.settle_now(Settlement("a", ((big, 500),)), 0.0)
    assert isinstance(limiter.admit_now("c", (big,), (), 0.0), Admitted)


def test_a_request_larger_than_the_limit_can_never_pass() -> None:
    verdict = MemoryLimiter(3600).admit_now("a", (rate(100, 101, "tokens"),), (), 0.0)
    assert isinstance(verdict, RateRefused) and verdict.retry_after is None


def test_a_budget_reserves_the_worst_case_and_settles_to_the_charge() -> None:
    limiter = MemoryLimiter(3600)
    demand = budget(limit=30, amount=10)
    verdicts = [limiter.admit_now(f"t{i}", (), (demand,), 0.0) for i in range(4)]
    assert [type(v) for v in verdicts] == [Admitted, Admitted, Admitted, BudgetRefused]
    refused = verdicts[3]
    assert isinstance(refused, BudgetRefused) and refused.used == 30
    # t0 cost 4 of its 10: 6 free, not enough for a worst case of 10.
    limiter.settle_now(Settlement("t0", charges=((demand, 4),)), 0.0)
    assert isinstance(limiter.admit_now("t4", (), (demand,), 0.0), BudgetRefused)
    # t1 never ran: released, 16 free.
    limiter.settle_now(Settlement("t1", charges=((demand, 0),)), 0.0)
    assert isinstance(limiter.admit_now("t5", (), (demand,), 0.0), Admitted)
    assert limiter.spent(demand.key) == 4


def test_a_reservation_never_settled_expires() -> None:
    limiter = MemoryLimiter(reservation_seconds=10)
    demand = budget(limit=10, amount=10)
    assert isinstance(limiter.admit_now("dead", (), (demand,), 0.0), Admitted)
    assert isinstance(limiter.admit_now("a", (), (demand,), 9.0), BudgetRefused)
    assert isinstance(limiter.admit_now("b", (), (demand,), 10.0), Admitted)


def test_reservations_settled_out_of_order_still_expire_on_time() -> None:
    """What is reserved is a running sum, walked only once a reservation
    may have expired: one settled early must not hide a later one's expiry,
    nor a settled one be counted again."""
    limiter = MemoryLimiter(reservation_seconds=10)
    demand = budget(limit=10, amount=5)
    assert isinstance(limiter.admit_now("early", (), (demand,), 0.0), Admitted)  # until 10
    assert isinstance(limiter.admit_now("late", (), (demand,), 5.0), Admitted)  # until 15
    limiter.settle_now(Settlement("early", charges=((demand, 0),)), 6.0)
    limiter.settle_now(Settlement("early", charges=((demand, 0),)), 6.0)  # again: no-op
    one = budget(limit=10, amount=5)
    assert isinstance(limiter.admit_now("a", (), (one,), 12.0), Admitted)  # late + a = 10
    assert isinstance(limiter.admit_now("b", (), (one,), 14.0), BudgetRefused)
    refused = limiter.admit_now("c", (), (one,), 15.0)  # late expired: a alone
    assert isinstance(refused, Admitted)
    assert isinstance(limiter.admit_now("d", (), (one,), 15.0), BudgetRefused)


def test_a_budget_starts_from_its_seed() -> None:
    limiter = MemoryLimiter(3600)
    verdict = limiter.admit_now("a", (), (budget(limit=30, amount=10, seed=25),), 0.0)
    assert isinstance(verdict, BudgetRefused) and verdict.used == 25


def test_a_refused_admission_takes_nothing() -> None:
    """All checks pass or none is applied: a team's budget refusing keeps
    the key's request bucket whole."""
    limiter = MemoryLimiter(3600)
    key = rate(1)
    assert isinstance(limiter.admit_now("a", (key,), (budget(5, 10),), 0.0), BudgetRefused)
    assert isinstance(limiter.admit_now("b", (key,), (), 0.0), Admitted)


# --------------------------------------------------------------- the gate

TEAM = Team("t1", "research", Budget(100, "day"), RateLimits(rpm=50))
KEY = Principal("key1", "ci", team=TEAM, budget=Budget(1000, "month"), limits=RateLimits(2, 500))


def gate(**options: object) -> Gate:
    return Gate(MemoryLimiter(3600), Seeds(NOW), clock=lambda: NOW, **options)  # type: ignore[arg-type]


async def test_the_gate_refuses_past_the_rpm_with_retry_after_and_openai_headers() -> None:
    g = gate()
    first = await g.admit(KEY, "m", Bounds(10, 20), 1)
    headers = first.header_map()
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert headers["x-ratelimit-limit-tokens"] == "500"
    assert headers["x-ratelimit-remaining-tokens"] == "470"
    await g.admit(KEY, "m", Bounds(10, 20), 1)
    with pytest.raises(RateLimitError) as refused:
        await g.admit(KEY, "m", Bounds(10, 20), 1)
    assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["Retry-After"] == "30"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert 'key "ci"' in refused.value.message


async def test_the_gate_names_the_budget_and_its_reset() -> None:
    g = gate()
    # The team's daily budget is 100 nano-USD: a worst case of 101 cannot pass.
    with pytest.raises(QuotaExceededError) as refused:
        await g.admit(KEY, "m", Bounds(10, 20), 101)
    error = refused.value
    assert (error.status_code, error.error_type, error.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert error.message.startswith('The daily budget of team "research"')
    assert "resets at 2026-12-01T00:00:00Z" in error.message
    assert error.headers["x-should-retry"] == "false"


async def test_settling_frees_the_budget_for_the_next_request() -> None:
    g = gate()
    key = Principal("k2", budget=Budget(100, "total"))
    ticket = await g.admit(key, "m", Bounds(10, 20), 60)
    with pytest.raises(QuotaExceededError):
        await g.admit(key, "m", Bounds(10, 20), 60)
    ticket.settle(tokens=12, charged_nano=30)
    ticket.settle(tokens=12, charged_nano=30)  # only the first counts
    await g.admit(key, "m", Bounds(10, 20), 60)
    with pytest.raises(QuotaExceededError):
        await g.admit(key, "m", Bounds(10, 20), 20)


async def test_a_hundred_concurrent_admissions_against_a_budget_of_three() -> None:
    g = gate()
    principal = Principal("k", budget=Budget(30, "total"))
    outcomes = await asyncio.gather(
        *(g.admit(principal, "m", Bounds(1, 1), 10) for _ in range(100)), return_exceptions=True
    )
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(admitted) == 3
    assert all(isinstance(o, QuotaExceededError) for o in outcomes if o not in admitted)


async def test_the_memory_limiters_one_call_admission_decides_as_the_general_path() -> None:
    """Gate.admit_at_once (MemoryLimiter.take, give_back) against the general
    path (a subclass never takes it), step for step on one clock: the same
    tickets, headers, refusals, buckets and spend."""
    import random

    class General(MemoryLimiter):
        pass

    clock = [1000.0]
    gates = [gate(model_limits={"m": RateLimits(rpm=40, tpm=2500)}) for _ in range(2)]
    gates[1].limiter = General(3600)
    gates[1]._memory = None
    for g in gates:
        g.limiter._now = lambda: clock[0]  # type: ignore[attr-defined]
    team = Team("t2", "lab", Budget(5000, "day"), RateLimits(rpm=30, tpm=3000))
    key = Principal("k", "ci", team=team, budget=Budget(4000, "total"), limits=RateLimits(20, 2000))
    # (one whose budget never ends: its demands are held by the plan)
    solo = Principal("s", "solo", budget=Budget(3000, "total"), limits=RateLimits(25, 1500))
    tickets: list[list[object]] = [[], []]
    admitted = fast = 0
    chance = random.Random(13)
    for _ in range(400):
        clock[0] += chance.choice((0.0, 0.0, 0.5, 3.0, 61.0))
        if tickets[0] and chance.random() < 0.5:
            index = chance.randrange(len(tickets[0]))
            used, charged = chance.randrange(0, 80), chance.randrange(0, 30)
            for held in tickets:
                held.pop(index).settle(used, charged)  # type: ignore[attr-defined]
            continue
        asking = chance.choice((key, solo))
        bounds, worst = (
            Bounds(chance.randrange(1, 60), chance.randrange(0, 90)),
            chance.randrange(0, 40),
        )
        outcomes = []
        for g, held in zip(gates, tickets, strict=True):
            try:
                ticket = await g.admit(asking, "m", bounds, worst)
            except RateLimitError as error:
                outcomes.append((type(error), error.message, error.headers))
            else:
                held.append(ticket)
                outcomes.append((None, ticket.headers, None))
                fast += g is gates[0] and ticket._memory is not None  # type: ignore[attr-defined]
        assert outcomes[0] == outcomes[1]
        admitted += outcomes[0][0] is None
    # Refusals seen; most admissions in one call (not: a budget's first,
    # those after a minute of the clock, when the sweep is due).
    assert 100 < admitted < 400 - 100 and fast > admitted / 2
    one, other = (g.limiter for g in gates)
    assert {k: (b.level, b.at) for k, b in one._buckets.items()} == {  # type: ignore[attr-defined]
        k: (b.level, b.at)
        for k, b in other._buckets.items()  # type: ignore[attr-defined]
    }
    assert {k: (b.spent, sorted(b.reservations.values())) for k, b in one._budgets.items()} == {  # type: ignore[attr-defined]
        k: (b.spent, sorted(b.reservations.values()))
        for k, b in other._budgets.items()  # type: ignore[attr-defined]
    }


async def test_a_model_limit_counts_every_key() -> None:
    g = gate(model_limits={"m": RateLimits(rpm=1)})
    await g.admit(Principal("a"), "m", Bounds(1, 1), 0)
    with pytest.raises(RateLimitError) as refused:
        await g.admit(Principal("b"), "m", Bounds(1, 1), 0)
    assert 'model "m"' in refused.value.message
    await g.admit(Principal("b"), "other", Bounds(1, 1), 0)
    await g.admit(None, "other", Bounds(1, 1), 0)


async def test_ticket_ids_are_unique_within_and_across_gates() -> None:
    """Replicas share a Redis budget's reservations, keyed by ticket id."""
    seen: list[str] = []

    class Recording(MemoryLimiter):
        async def admit(
            self, ticket: str, rates: tuple[RateDemand, ...], budgets: tuple[BudgetDemand, ...]
        ) -> Verdict:
            seen.append(ticket)
            return await super().admit(ticket, rates, budgets)

    key = Principal("key1", "ci", budget=Budget(1000, "total"))
    for _ in range(2):  # two replicas
        replica = Gate(Recording(3600), Seeds(NOW), clock=lambda: NOW)
        for _ in range(50):
            (await replica.admit(key, "m", Bounds(1, 1), 0)).release()
    assert len(set(seen)) == 100


async def test_unlimited_requests_skip_the_limiter() -> None:
    class Down(MemoryLimiter):
        async def admit(self, *args: object) -> Admitted:  # type: ignore[override]
            raise LimiterUnavailableError("down")

    g = Gate(Down(3600), Seeds(NOW))
    ticket = await g.admit(Principal("free"), "m", Bounds(1, 1), 5)
    assert ticket.settled and ticket.headers == []
    with pytest.raises(LimitsUnavailableError) as unavailable:
        await g.admit(KEY, "m", Bounds(1, 1), 5)
    assert unavailable.value.status_code == 503
    assert unavailable.value.headers["Retry-After"] == "1"


async def test_limits_that_cannot_hold_across_processes_refuse_with_503() -> None:
    g = gate(unenforceable="2 worker processes share no limits")
    await g.admit(Principal("free"), "m", Bounds(1, 1), 5)
    with pytest.raises(LimitsUnavailableError, match="2 worker processes"):
        await g.admit(KEY, "m", Bounds(1, 1), 5)


def test_durations_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0.0172, 1, 59.2, 360, 3723)] == [
        "18ms",
        "1s",
        "1m0s",
        "6m0s",
        "1h2m3s",
    ]


def test_periods_are_utc_days_and_months() -> None:
    december = period_of("month", datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert december.start == date(2026, 12, 1)
    assert december.end == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_of("total", NOW).end is None


# --------------------------------------------------------- ledger seeds


async def test_seeds_are_the_ledgers_sums_for_the_current_periods(tmp_path: Path) -> None:
    from gateway.accounting.tables import usage

    url = async_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    await migrate_async(url)
    engine = open_engine(url)
    rows = [
        (datetime(2026, 11, 30, 8, tzinfo=UTC), 40),  # today
        (datetime(2026, 11, 2, 8, tzinfo=UTC), 50),  # this month
        (datetime(2026, 10, 2, 8, tzinfo=UTC), 70),  # before
    ]
    async with engine.begin() as connection:
        for index, (at, cost) in enumerate(rows):
            await connection.execute(
                insert(usage).values(
                    request_id=f"r{index}",
                    at=at,
                    day=at.date(),
                    endpoint="chat",
                    key_id="k",
                    team_id="t",
                    cost_nano=cost,
                    latency_seconds=0.1,
                    status=200,
                )
            )
    seeds = await load_seeds(engine, NOW)
    await engine.dispose()
    assert [seeds.spent("key", "k", p, period_of(p, NOW)) for p in ("day", "month", "total")] == [
        40,
        90,
        160,
    ]
    assert seeds.spent("team", "t", "month", period_of("month", NOW)) == 90
    # Tomorrow's day budget starts from nothing.
    assert (
        seeds.spent("key", "k", "day", period_of("day", datetime(2026, 12, 1, 1, tzinfo=UTC))) == 0
    )
    g = Gate(MemoryLimiter(3600), seeds, clock=lambda: NOW)
    with pytest.raises(QuotaExceededError):
        await g.admit(Principal("k", budget=Budget(200, "total")), "m", Bounds(1, 1), 41)
    await g.admit(Principal("k", budget=Budget(200, "total")), "m", Bounds(1, 1), 40)


# --------------------------------------------------------- configuration

KEY_TEXT = "sk-limits-test-0123456789abcdef"
KEY_HASH = hash_api_key(KEY_TEXT)


def settings(**accounting: object) -> Settings:
    return Settings(
        server={"api_key_hashes": [KEY_HASH]},  # type: ignore[arg-type]
        accounting=accounting,  # type: ignore[arg-type]
    )


def test_static_keys_must_name_a_configured_key_once() -> None:
    other = hash_api_key("sk-another-key-0123456789abcdef")
    configured = settings(
        static_keys=[{"key_hash": other, "rpm": 1}, {"key_hash": KEY_HASH}, {"key_hash": KEY_HASH}]
    )
    assert reference_problems(configured) == [
        "accounting.static_keys[0].key_hash: not one of server.api_key_hashes",
        "accounting.static_keys[2].key_hash: this key already has limits",
    ]


def test_the_redis_setting_must_be_a_redis_url() -> None:
    assert reference_problems(settings(redis="localhost:6379")) == [
        'accounting.redis: a Redis URL ("redis://HOST:PORT/DB"), or ""'
    ]
    assert reference_problems(settings(redis="redis://127.0.0.1:6379/0")) == []


def test_a_static_budget_needs_its_period() -> None:
    with pytest.raises(ValueError, match="budget_usd and budget_period go together"):
        settings(static_keys=[{"key_hash": KEY_HASH, "budget_usd": 1.0}])


def test_limits_without_accounting_are_a_configuration_error() -> None:
    configured = settings(enabled=False, static_keys=[{"key_hash": KEY_HASH, "rpm": 1}])
    assert reference_problems(configured) == [
        "accounting.static_keys: limits need accounting (accounting.enabled)"
    ]


def test_limits_shared_by_processes_without_redis_are_refused() -> None:
    limited = [{"key_hash": KEY_HASH, "rpm": 1}]
    postgres = "postgresql://u:p@127.0.0.1:5432/db"
    assert config_refusal(settings(static_keys=limited)) is None
    refusal = config_refusal(settings(static_keys=limited, database=postgres))
    assert refusal is not None and "PostgreSQL" in refusal and "accounting.static_keys" in refusal
    assert "2 worker processes" in (config_refusal(settings(static_keys=limited), 2) or "")
    shared = settings(static_keys=limited, database=postgres, redis="redis://127.0.0.1:1/0")
    assert config_refusal(shared) is None
    assert config_refusal(settings(database=postgres)) is None


# ---------------------------------------------- through the gateway, with the SDK


def limited(tmp_path: Path, **key: object) -> str:
    ledger = tmp_path / "ledger.db"
    prices = {"input_usd_per_million": 1000.0, "output_usd_per_million": 1000.0}
    text = pool(
        "a", server={"api_key_hashes": [KEY_HASH]}, deployments=[{"backend": "a", **prices}]
    )
    entries = ", ".join(f"{name} = {value!r}" for name, value in key.items()).replace("'", '"')
    return (
        text
        + f'\n[accounting]\ndatabase = "sqlite:///{ledger}"\n'
        + f'static_keys = [{{ key_hash = "{KEY_HASH}", name = "ci", {entries} }}]\n'
    )


async def test_the_sdk_gets_rate_limit_error_with_headers_on_json_and_streams(
    start: Start, tmp_path: Path
) -> None:
    async with start(limited(tmp_path, rpm=2, tpm=100_000)) as gw:
        headers = {"Authorization": f"Bearer {KEY_TEXT}"}
        reply = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert reply.status_code == 200
        assert reply.headers["x-ratelimit-limit-requests"] == "2"
        assert reply.headers["x-ratelimit-remaining-requests"] == "1"
        assert reply.headers["x-ratelimit-limit-tokens"] == "100000"
        stream = await gw.http.post(
            "/v1/chat/completions", json=chat_body(stream=True), headers=headers
        )
        assert stream.status_code == 200
        assert stream.headers["x-ratelimit-remaining-requests"] == "0"
        refused = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        error = error_of(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 29
        sdk = openai.AsyncOpenAI(
            base_url="http://nomoat.test/v1",
            api_key=KEY_TEXT,
            http_client=gw.http,  # type: ignore[arg-type]
            max_retries=0,
        )
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.code == "rate_limit_exceeded"


async def test_tokens_are_settled_to_the_usage(start: Start, tmp_path: Path) -> None:
    """The fake answers 5 prompt and 2 completion tokens: a request reserving
    its bound gives the rest back when it ends."""
    async with start(limited(tmp_path, tpm=1000)) as gw:
        headers = {"Authorization": f"Bearer {KEY_TEXT}"}
        body = chat_body(max_tokens=100)
        first = await gw.http.post("/v1/chat/completions", json=body, headers=headers)
        reserved = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert reserved > 100
        used = first.json()["usage"]["total_tokens"]
        second = await gw.http.post("/v1/chat/completions", json=body, headers=headers)
        # Of the first, only what it used is still taken (give or take the
        # refill since, and the header's rounding down).
        taken = 1000 - int(second.headers["x-ratelimit-remaining-tokens"])
        assert reserved + used - 1 <= taken <= reserved + used + 1


async def test_the_sdk_gets_insufficient_quota_naming_the_budget(
    start: Start, tmp_path: Path
) -> None:
    # Worst case of one request: (body bytes + 10 tokens) at 1 nano-USD per
    # token... times 1000: about 0.1 USD; the budget covers a few.
    async with start(limited(tmp_path, budget_usd=0.5, budget_period="month")) as gw:
        sdk = openai.AsyncOpenAI(
            base_url="http://nomoat.test/v1",
            api_key=KEY_TEXT,
            http_client=gw.http,  # type: ignore[arg-type]
            max_retries=0,
        )
        spent = 0.0
        with pytest.raises(openai.RateLimitError) as caught:
            for _ in range(100):
                reply = await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10
                )
                assert reply.usage is not None
                spent += reply.usage.total_tokens * 1000 / 1e6
        assert caught.value.code == "insufficient_quota"
        assert 'monthly budget of key "ci" (0.50 USD)' in caught.value.message
        assert "resets at" in caught.value.message
        assert 0 < spent <= 0.5
        assert caught.value.response.headers["x-should-retry"] == "false"


async def test_a_request_refused_after_admission_releases_its_reservation(
    start: Start, tmp_path: Path
) -> None:
    async with start(limited(tmp_path, budget_usd=0.2, budget_period="total")) as gw:
        headers = {"Authorization": f"Bearer {KEY_TEXT}"}
        for _ in range(5):
            missing = await gw.http.post(
                "/v1/chat/completions", json=chat_body(model="nope", max_tokens=10), headers=headers
            )
            error_of(missing, 404)
        admission = gw.runtime.admission
        assert admission is not None
        key = key_fingerprint(KEY_HASH)
        assert isinstance(admission.gate.limiter, MemoryLimiter)
        assert admission.gate.limiter.spent(f"nomoat:budget:key:{key}:total:total") == 0
        ok = await gw.http.post(
            "/v1/chat/completions", json=chat_body(max_tokens=10), headers=headers
        )
        assert ok.status_code == 200


def test_serve_refuses_limits_that_several_processes_would_each_hold(
    tmp_path: Path, cli: Cli
) -> None:
    path = tmp_path / "nomoat.toml"
    path.write_text(
        f'[server]\napi_key_hashes = ["{KEY_HASH}"]\n'
        '[accounting]\ndatabase = "postgresql://u:p@127.0.0.1:1/db"\n'
        f'static_keys = [{{ key_hash = "{KEY_HASH}", rpm = 5 }}]\n'
    )
    ran = cli("serve", "--config", str(path))
    assert ran.returncode == 2
    assert "refusing to start: accounting.static_keys set limits" in ran.stderr
    assert "PostgreSQL" in ran.stderr and "[accounting] redis" in ran.stderr


async def test_keys_with_limits_in_the_database_refuse_a_start_without_redis(
    tmp_path: Path,
) -> None:
    from gateway.accounting.gating import UnsafeLimitsError, open_gate
    from gateway.accounting.tables import api_keys

    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    url = async_url(database)
    await migrate_async(url)
    engine = open_engine(url)
    async with engine.begin() as connection:
        await connection.execute(
            insert(api_keys).values(
                id="k1",
                key_hash=KEY_HASH,
                name="limited",
                rpm=10,
                created_at=NOW,
                updated_at=NOW,
            )
        )
    await engine.dispose()
    configured = Settings(accounting={"database": database})  # type: ignore[arg-type]
    async with AsyncExitStack() as stack:
        assert await open_gate(configured, stack) is not None
        with pytest.raises(UnsafeLimitsError, match="2 worker processes"):
            await open_gate(configured, stack, workers=2)


def test_the_memory_limiter_forgets_past_periods() -> None:
    limiter = MemoryLimiter(3600)
    day = BudgetDemand("b:day:1", 10, 10, 0, 5, "key x", "day", None)
    assert isinstance(limiter.admit_now("a", (), (day,), 0.0), Admitted)
    assert limiter.spent(day.key) == 0 and day.key in limiter._budgets
    assert isinstance(limiter.admit_now("b", (rate(5),), (), 61.0), Admitted)
    assert day.key not in limiter._budgets


async def test_errors_after_admission_carry_the_rate_headers(start: Start, tmp_path: Path) -> None:
    async with start(limited(tmp_path, rpm=5)) as gw:
        headers = {"Authorization": f"Bearer {KEY_TEXT}"}
        missing = await gw.http.post(
            "/v1/chat/completions", json=chat_body(model="nope"), headers=headers
        )
        error_of(missing, 404)
        assert missing.headers["x-ratelimit-limit-requests"] == "5"
        assert missing.headers["x-ratelimit-remaining-requests"] == "4"
