"""Budgets and rate limits on real `nomoat serve` processes (the embedded
llama.cpp engine), driven with the official SDK: 100 parallel requests
against a budget that covers 3, on one process (SQLite, in memory) and on
two replicas sharing a real PostgreSQL and Redis; two replicas enforcing one
RPM and one TPM limit; Redis unreachable."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import redis

from gateway.accounting.db import async_url, migrate
from gateway.auth import hash_api_key, key_fingerprint
from gateway.testing import LiveGateway, running_gateway
from tests.conftest import MODEL, STARTUP_SECONDS, free_port

pytestmark = pytest.mark.e2e

BUDGET_KEY = "sk-limits-budget-0123456789abcdef"
RPM_KEY = "sk-limits-rpm-0123456789abcdefgh"
TPM_KEY = "sk-limits-tpm-0123456789abcdefgh"
FREE_KEY = "sk-limits-free-0123456789abcdefg"
ADMIN_KEY = "sk-limits-admin-0123456789abcdef"
# 1000 USD per million tokens: 1 milli-USD a token, so the costs are plain.
USD_PER_TOKEN = 1000 / 1e6
# The SDK's body for one request is about 100 bytes: a worst case of about
# 100 prompt tokens + 4 = 0.10-0.11 USD. 0.33 USD covers 3 worst cases, never 4.
BUDGET_USD = 0.33
MAX_TOKENS = 4
RPM = 4
TPM = 600
MESSAGES = [{"role": "user", "content": "Say hi"}]


def config(tmp_path: Path, database: str = "", redis_url: str = "") -> str:
    keys = [BUDGET_KEY, RPM_KEY, TPM_KEY, FREE_KEY]
    hashes = ", ".join(f'"{hash_api_key(key)}"' for key in keys)
    database = database or f"sqlite:///{tmp_path / 'ledger.db'}"
    return textwrap.dedent(
        f"""
        [server]
        api_key_hashes = [{hashes}]
        admin_key_hashes = ["{hash_api_key(ADMIN_KEY)}"]
        shutdown_grace_seconds = 20

        [[models.{MODEL}.deployments]]
        backend = "embedded"
        model = "{MODEL}"
        input_usd_per_million = 1000.0
        output_usd_per_million = 1000.0

        [accounting]
        database = "{database}"
        redis = "{redis_url}"

        [[accounting.static_keys]]
        key_hash = "{hash_api_key(BUDGET_KEY)}"
        name = "budget"
        budget_usd = {BUDGET_USD}
        budget_period = "day"

        [[accounting.static_keys]]
        key_hash = "{hash_api_key(RPM_KEY)}"
        name = "rpm"
        rpm = {RPM}

        [[accounting.static_keys]]
        key_hash = "{hash_api_key(TPM_KEY)}"
        name = "tpm"
        tpm = {TPM}
        """
    )


@contextmanager
def gateways(
    tmp_path: Path, count: int, database: str = "", redis_url: str = "", subdirectory: str = ""
) -> Iterator[list[LiveGateway]]:
    text = config(tmp_path, database, redis_url)
    with ExitStack() as stack:
        started = []
        for index in range(count):
            directory = tmp_path / f"{subdirectory}gateway{index}"
            directory.mkdir()
            live = stack.enter_context(
                running_gateway(
                    directory, text, api_key=BUDGET_KEY, startup_seconds=STARTUP_SECONDS
                )
            )
            started.append(live)
        yield started


def client(gateway: LiveGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key=key,
        max_retries=0,
        http_client=httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)),
    )


def cost(reply: object) -> float:
    usage = reply.usage  # type: ignore[attr-defined]
    return float((usage.prompt_tokens + usage.completion_tokens) * USD_PER_TOKEN)


async def burst(targets: Sequence[LiveGateway], count: int) -> tuple[float, int, list[Exception]]:
    """``count`` requests at once, spread over ``targets``: the spend of those
    answered, how many, and the errors of the others."""
    clients = [client(target, BUDGET_KEY) for target in targets]
    calls = [
        clients[i % len(clients)].chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
        )
        for i in range(count)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for each in clients:
        await each.close()
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    errors = [o for o in outcomes if isinstance(o, Exception)]
    return sum(cost(reply) for reply in answered), len(answered), errors


async def drain(targets: Sequence[LiveGateway]) -> tuple[float, openai.RateLimitError]:
    """Requests one after another, alternating targets, until the budget
    refuses one: their spend, and the refusal."""
    clients = [client(target, BUDGET_KEY) for target in targets]
    spent = 0.0
    try:
        for index in range(100):
            try:
                reply = await clients[index % len(clients)].chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
                )
            except openai.RateLimitError as refused:
                return spent, refused
            spent += cost(reply)
    finally:
        for each in clients:
            await each.close()
    raise AssertionError("the budget never ran out")


def check_budget_held(spent: float, answered: int, errors: list[Exception]) -> None:
    assert answered >= 1
    assert spent <= BUDGET_USD + 1e-9, spent
    for error in errors:
        assert isinstance(error, openai.RateLimitError), error
        assert error.code == "insufficient_quota"
        assert 'daily budget of key "budget" (0.33 USD)' in error.message


def test_a_hundred_parallel_requests_never_spend_past_the_budget_on_one_process(
    tmp_path: Path,
) -> None:
    with gateways(tmp_path, 1) as [gateway]:
        spent, answered, errors = asyncio.run(burst([gateway], 100))
        check_budget_held(spent, answered, errors)
        assert len(errors) >= 90
        more, refused = asyncio.run(drain([gateway]))
        total = spent + more
        # Spent up to within one worst case (0.11 USD) of the budget, never past it.
        assert BUDGET_USD - 0.115 < total <= BUDGET_USD + 1e-9, total
        assert refused.code == "insufficient_quota"
        assert "resets at" in refused.message
    # Started again, the gateway's budget starts from the ledger's sum for
    # the day: still spent.
    with gateways(tmp_path, 1, subdirectory="again") as [again]:
        more, refused = asyncio.run(drain([again]))
        assert more == 0
        assert refused.code == "insufficient_quota"


def wait_until_settled(redis_url: str, seconds: float = 10.0) -> None:
    """Every budget's reservations in Redis released (bounded wait)."""
    store = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + seconds
    try:
        while True:
            budgets = [k for k in store.keys("nomoat:budget:*") if b"reserv" not in k]
            held = sum(int(store.hget(k, "reserved") or 0) for k in budgets)
            if held == 0:
                return
            assert time.monotonic() < deadline, f"{held} nano-USD still reserved"
            time.sleep(0.05)
    finally:
        store.close()


def test_a_hundred_parallel_requests_on_two_replicas_share_one_budget(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    migrate(async_url(postgres_url))
    with gateways(tmp_path, 2, postgres_url, redis_url) as replicas:
        spent, answered, errors = asyncio.run(burst(replicas, 100))
        check_budget_held(spent, answered, errors)
        # Settlements reach Redis just after the answers (each replica sends
        # them from its own task): until they have, the burst's worst cases
        # still hold the budget and the drain would stop short.
        wait_until_settled(redis_url)
        more, refused = asyncio.run(drain(replicas))
        total = spent + more
        assert BUDGET_USD - 0.115 < total <= BUDGET_USD + 1e-9, total
        assert refused.code == "insufficient_quota"
        # What Redis counted is what the clients were answered, to the nano-USD.
        key = key_fingerprint(hash_api_key(BUDGET_KEY))
        store = redis.Redis.from_url(redis_url)
        [budget_key] = [
            k for k in store.keys(f"nomoat:budget:key:{key}:day:*") if b"reserv" not in k
        ]
        expected = round(total * 1e9)
        deadline = time.monotonic() + 5
        while int(store.hget(budget_key, "spent") or 0) != expected:
            assert time.monotonic() < deadline, (store.hgetall(budget_key), expected)
            time.sleep(0.05)
        assert int(store.hget(budget_key, "reserved") or 0) == 0


def test_two_replicas_enforce_one_rpm_and_one_tpm_limit(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    migrate(async_url(postgres_url))
    with gateways(tmp_path, 2, postgres_url, redis_url) as replicas:

        async def run() -> None:
            # RPM: requests one after another, alternating replicas.
            rpm_clients = [client(r, RPM_KEY) for r in replicas]
            started = time.monotonic()
            answered, refused = 0, 0
            for index in range(2 * RPM + 2):
                try:
                    raw = await rpm_clients[index % 2].chat.completions.with_raw_response.create(
                        model=MODEL, messages=MESSAGES, max_tokens=1
                    )
                    assert raw.headers["x-ratelimit-limit-requests"] == str(RPM)
                    answered += 1
                except openai.RateLimitError as error:
                    assert error.code == "rate_limit_exceeded"
                    assert int(error.response.headers["retry-after"]) >= 1
                    refused += 1
            refill = int((time.monotonic() - started) * RPM / 60)
            assert RPM <= answered <= RPM + refill, (answered, refill)
            assert refused >= 2 + RPM - refill - (answered - RPM)

            # TPM: each request reserves ~100 prompt tokens + 4 and uses ~30.
            tpm_clients = [client(r, TPM_KEY) for r in replicas]
            started = time.monotonic()
            used, bound, stream_seen = 0, 0, False
            for index in range(200):
                target = tpm_clients[index % 2]
                try:
                    if not stream_seen:
                        # A stream carries the headers too.
                        stream = await target.chat.completions.with_raw_response.create(
                            model=MODEL,
                            messages=MESSAGES,
                            max_tokens=MAX_TOKENS,
                            stream=True,
                            stream_options={"include_usage": True},
                        )
                        assert stream.headers["x-ratelimit-limit-tokens"] == str(TPM)
                        remaining = int(stream.headers["x-ratelimit-remaining-tokens"])
                        bound = TPM - remaining
                        async for chunk in stream.parse():
                            if chunk.usage is not None:
                                used += chunk.usage.total_tokens
                        stream_seen = True
                        continue
                    reply = await target.chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
                    )
                    assert reply.usage is not None
                    used += reply.usage.total_tokens
                except openai.RateLimitError as error:
                    assert error.code == "rate_limit_exceeded"
                    break
            else:
                raise AssertionError("the TPM limit never refused")
            refill = (time.monotonic() - started) * TPM / 60
            # Within one request: refused only once less than one request's
            # bound was left, and never past the limit.
            assert TPM - bound - 1 <= used <= TPM + refill + 1, (used, bound, refill)
            for each in rpm_clients + tpm_clients:
                await each.close()

        asyncio.run(run())


def test_redis_unreachable_refuses_limited_keys_with_503_and_serves_the_others(
    tmp_path: Path,
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with gateways(tmp_path, 1, redis_url=closed) as [gateway]:

        async def run() -> None:
            limited = client(gateway, RPM_KEY)
            free = client(gateway, FREE_KEY)
            with pytest.raises(openai.InternalServerError) as unavailable:
                await limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
            assert unavailable.value.status_code == 503
            assert unavailable.value.code == "limits_unavailable"
            assert unavailable.value.response.headers["retry-after"] == "1"
            reply = await free.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
            assert reply.choices
            await limited.close()
            await free.close()

        asyncio.run(run())


def test_a_managed_teams_rpm_is_shared_by_its_keys_on_two_replicas(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    migrate(async_url(postgres_url))
    with gateways(tmp_path, 2, postgres_url, redis_url) as replicas:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=replicas[0].root_url, headers=admin, timeout=30) as api:
            team = api.post("/admin/teams", json={"name": "eng", "rpm": 3})
            assert team.status_code == 201, team.text
            keys = []
            for name in ("ann", "bob"):
                made = api.post("/admin/keys", json={"name": name, "team": "eng"})
                assert made.status_code == 201, made.text
                keys.append(made.json()["key"])

        async def run() -> tuple[int, list[openai.RateLimitError]]:
            # Each key on each replica: four clients, requests in turn.
            clients = [client(r, key) for key in keys for r in replicas]
            answered, refusals = 0, []
            deadline = time.monotonic() + 2
            # The replica that did not create the keys polls for them: wait
            # until it knows both (a poll may fall between the two creations).
            for known in (clients[1], clients[3]):
                while True:
                    try:
                        await known.models.list()
                        break
                    except openai.AuthenticationError:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
            for index in range(8):
                try:
                    await clients[index % 4].chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=1
                    )
                    answered += 1
                except openai.RateLimitError as refused:
                    refusals.append(refused)
            for each in clients:
                await each.close()
            return answered, refusals

        started = time.monotonic()
        answered, refusals = asyncio.run(run())
        refill = int((time.monotonic() - started) * 3 / 60)
        assert 3 <= answered <= 3 + refill, (answered, refill)
        assert refusals and all('team "eng"' in r.message for r in refusals)
