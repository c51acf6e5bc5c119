"""Issue 13's load test: the ledger of two replicas equals what clients received.

Two real ``nomoat serve`` processes share one PostgreSQL ledger and one Redis
(limits and budgets), in front of two fake vLLM upstreams
(``loadtests/fake_upstream.py``) that answer with different completion
lengths (6 and 9 tokens), so what a key used depends on where the gateways
sent its requests. Fifty managed keys are created through ``POST
/admin/keys``, each with an rpm, a tpm and a daily budget that the load never
reaches (so every request goes through the shared limits and reservations).
A bounded load follows: ``--requests`` chat requests, ``--concurrency`` at a
time, spread over both replicas and every key, one in three streamed (with
``stream_options.include_usage``), within ``--seconds``. The client sums, per
key, the answers it got and the usage in them. Then both gateways get SIGTERM
(each writes what its ledger holds), and ``GET /admin/usage?group_by=key`` of a
third gateway on the same database must give, for every key, exactly the
client's requests, prompt and completion tokens, and their cost at the
configured prices.

    .venv/bin/python loadtests/ledger_load.py [--requests 3000] [--concurrency 32]
        [--keys 50] [--seconds 120] [--postgres URL] [--redis URL] [--json FILE]

PostgreSQL and Redis are started on loopback (``tests/services.py``) unless
given (``--postgres`` names a cluster's admin database: a fresh database is
made on it). Prints a table per run; exit status 0 when the totals match,
1 when they do not. ``tests/test_ledger_load.py`` runs it small.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.auth import hash_api_key  # noqa: E402
from gateway.testing import LiveGateway, running_gateway  # noqa: E402
from tests.services import fresh_database, running_postgres, running_redis  # noqa: E402

MODEL = "fake-model"
PROBE_KEY = "sk-ledger-load-probe-0123456789ab"
ADMIN_KEY = "sk-ledger-load-admin-0123456789ab"
# Completion tokens of each fake upstream's answers (its --chunks).
UPSTREAM_CHUNKS = (6, 9)
# Prices (USD per million tokens): the ledger's cost must be the client's
# tokens at these prices.
INPUT_PRICE = 2.0
OUTPUT_PRICE = 8.0
NANO = 1_000_000_000


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cost_nano(self) -> int:
        """At the configured prices, as the gateway rounds: per request
        (what :meth:`add` accumulates)."""
        return self._cost_nano

    _cost_nano: int = field(default=0, repr=False)

    def add(self, prompt: int, completion: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self._cost_nano += prompt * int(INPUT_PRICE * 1000) + completion * int(OUTPUT_PRICE * 1000)


@dataclass
class Outcome:
    sent: int = 0
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    by_key: dict[str, Totals] = field(default_factory=dict)
    seconds: float = 0.0


def config(database: str, redis_url: str, upstream_ports: Sequence[int]) -> str:
    backends = "".join(
        textwrap.dedent(
            f"""
            [backends.fake-{index}]
            type = "vllm"
            base_url = "http://127.0.0.1:{port}/v1"
            models = ["{MODEL}"]
            """
        )
        for index, port in enumerate(upstream_ports)
    )
    deployments = "".join(
        textwrap.dedent(
            f"""
            [[models.{MODEL}.deployments]]
            backend = "fake-{index}"
            input_usd_per_million = {INPUT_PRICE}
            output_usd_per_million = {OUTPUT_PRICE}
            """
        )
        for index in range(len(upstream_ports))
    )
    head = textwrap.dedent(
        f"""
        [server]
        api_key_hashes = ["{hash_api_key(PROBE_KEY)}"]
        admin_key_hashes = ["{hash_api_key(ADMIN_KEY)}"]
        shutdown_grace_seconds = 20
        log_level = "warning"

        [plugins]
        disabled = ["llamacpp"]

        [accounting]
        database = "{database}"
        redis = "{redis_url}"
        """
    )
    policy = f'\n[models.{MODEL}]\npolicy = "least-outstanding"\n'
    return head + backends + policy + deployments


@contextmanager
def fake_upstreams(directory: Path) -> Iterator[list[int]]:
    """One fake upstream process per entry of UPSTREAM_CHUNKS; their ports."""
    with ExitStack() as stack:
        ports = []
        for chunks in UPSTREAM_CHUNKS:
            log = stack.enter_context((directory / f"fake-{chunks}.log").open("w+"))
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "loadtests" / "fake_upstream.py"),
                    "--chunks",
                    str(chunks),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            stack.callback(_stop, process)
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line.startswith("fake upstream listening on "):
                raise RuntimeError(f"fake upstream did not start: {line!r}")
            ports.append(int(line.split()[4]))
        yield ports


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def admin(gateway: LiveGateway) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.root_url,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
        trust_env=False,
    )


def create_keys(gateway: LiveGateway, count: int) -> dict[str, str]:
    """``count`` managed keys with limits and a budget the load never
    reaches; their secrets by id."""
    keys = {}
    with admin(gateway) as client:
        for index in range(count):
            reply = client.post(
                "/admin/keys",
                json={
                    "name": f"load-{index:02d}",
                    "rpm": 1_000_000,
                    "tpm": 1_000_000_000,
                    "budget_usd": 1000.0,
                    "budget_period": "day",
                },
            )
            reply.raise_for_status()
            body = reply.json()
            keys[body["id"]] = body["key"]
    return keys


async def wait_for_keys(gateways: Sequence[LiveGateway], keys: dict[str, str]) -> None:
    """Until every replica knows every key (each polls the database): a
    ``GET /v1/models`` with each (not a ledger row: not an inference request)."""
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        for gateway in gateways:
            for secret in keys.values():
                while True:
                    reply = await client.get(
                        f"{gateway.base_url}/models",
                        headers={"Authorization": f"Bearer {secret}"},
                    )
                    if reply.status_code == 200:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"a replica does not know a key: {reply.text}")
                    await asyncio.sleep(0.1)


def body(index: int) -> tuple[dict[str, object], bool]:
    stream = index % 3 == 0
    message = "Say hello. " * (1 + index % 7)
    payload: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": 16,
    }
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return payload, stream


async def one(
    client: httpx.AsyncClient, url: str, secret: str, index: int
) -> tuple[int, int] | str:
    """The usage the client received (prompt, completion), or why none."""
    payload, stream = body(index)
    headers = {"Authorization": f"Bearer {secret}"}
    if not stream:
        reply = await client.post(url, json=payload, headers=headers)
        if reply.status_code != 200:
            return f"{reply.status_code} {reply.text[:200]}"
        usage = reply.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]
    usage = None
    done = False
    async with client.stream("POST", url, json=payload, headers=headers) as reply:
        if reply.status_code != 200:
            return f"{reply.status_code} {(await reply.aread())[:200]!r}"
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
    if usage is None or not done:
        return "stream ended without its usage or [DONE]"
    return usage["prompt_tokens"], usage["completion_tokens"]


async def load(
    gateways: Sequence[LiveGateway],
    keys: dict[str, str],
    requests: int,
    concurrency: int,
    seconds: float,
) -> Outcome:
    """``requests`` requests, ``concurrency`` at a time, round-robin over
    the replicas and the keys; stops sending after ``seconds``."""
    outcome = Outcome(by_key={key_id: Totals() for key_id in keys})
    ids = list(keys)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = [httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) for _ in gateways]
    next_index = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() - started < seconds:
            index = next_index
            next_index += 1
            key_id = ids[index % len(ids)]
            replica = (index // len(ids)) % len(gateways)
            url = f"{gateways[replica].base_url}/chat/completions"
            outcome.sent += 1
            try:
                result = await one(clients[replica], url, keys[key_id], index)
            except httpx.HTTPError as error:
                outcome.failed.append(f"{type(error).__name__}: {error}")
                continue
            if isinstance(result, str):
                outcome.failed.append(result)
                continue
            outcome.answered += 1
            outcome.by_key[key_id].add(*result)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
    outcome.seconds = time.monotonic() - started
    return outcome


def ledger_by_key(gateway: LiveGateway) -> dict[str, dict[str, float]]:
    with admin(gateway) as client:
        reply = client.get("/admin/usage", params={"group_by": "key"})
        reply.raise_for_status()
        return {row["group"]: row for row in reply.json()["data"] if row["group"]}


def compare(outcome: Outcome, ledger: dict[str, dict[str, float]]) -> list[str]:
    """Every difference between the client's totals and the ledger's."""
    problems = []
    for key_id, totals in outcome.by_key.items():
        row = ledger.get(key_id, {})
        mine = {
            "requests": totals.requests,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
        }
        for name, value in mine.items():
            if row.get(name, 0) != value:
                problems.append(f"key {key_id}: {name} ledger {row.get(name, 0)}, clients {value}")
        cost = round(float(row.get("cost_usd", 0.0)) * NANO)
        if abs(cost - totals.cost_nano) > 1:
            problems.append(
                f"key {key_id}: cost ledger {cost} nano-USD, clients {totals.cost_nano}"
            )
    for key_id in ledger.keys() - outcome.by_key.keys():
        problems.append(f"the ledger has a key the clients never used: {key_id}")
    return problems


@dataclass
class Report:
    keys: int
    replicas: int
    requests: int
    concurrency: int
    sent: int
    answered: int
    failed: int
    seconds: float
    requests_per_second: float
    prompt_tokens: int
    completion_tokens: int
    ledger_requests: int
    ledger_prompt_tokens: int
    ledger_completion_tokens: int
    problems: list[str]


def run(args: argparse.Namespace, directory: Path) -> Report:
    with ExitStack() as stack:
        admin_url = args.postgres or stack.enter_context(running_postgres(directory / "pg"))
        redis_url = args.redis or stack.enter_context(running_redis(directory / "redis"))
        database = fresh_database(admin_url)
        ports = stack.enter_context(fake_upstreams(directory))
        text = config(database, redis_url, ports)
        replicas = []
        for index in range(2):
            home = directory / f"replica{index}"
            home.mkdir()
            replicas.append(stack.enter_context(running_gateway(home, text, api_key=PROBE_KEY)))
        keys = create_keys(replicas[0], args.keys)
        asyncio.run(wait_for_keys(replicas, keys))
        outcome = asyncio.run(load(replicas, keys, args.requests, args.concurrency, args.seconds))
        # SIGTERM: each replica writes what its ledger still holds.
        for live in replicas:
            live.process.terminate()
        for live in replicas:
            live.process.wait(timeout=60)
        home = directory / "reader"
        home.mkdir()
        reader = stack.enter_context(running_gateway(home, text, api_key=PROBE_KEY))
        ledger = ledger_by_key(reader)
    totals = list(outcome.by_key.values())
    return Report(
        keys=args.keys,
        replicas=2,
        requests=args.requests,
        concurrency=args.concurrency,
        sent=outcome.sent,
        answered=outcome.answered,
        failed=len(outcome.failed),
        seconds=round(outcome.seconds, 2),
        requests_per_second=round(outcome.sent / outcome.seconds, 1),
        prompt_tokens=sum(t.prompt_tokens for t in totals),
        completion_tokens=sum(t.completion_tokens for t in totals),
        ledger_requests=int(sum(row["requests"] for row in ledger.values())),
        ledger_prompt_tokens=int(sum(row["prompt_tokens"] for row in ledger.values())),
        ledger_completion_tokens=int(sum(row["completion_tokens"] for row in ledger.values())),
        problems=outcome.failed[:5] + compare(outcome, ledger),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop sending after")
    parser.add_argument("--postgres", help="a cluster's admin URL (default: start one)")
    parser.add_argument("--redis", help="redis://... (default: start one)")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nomoat-ledger-load-") as directory:
        report = run(args, Path(directory))
    print(
        f"{report.keys} keys, {report.replicas} replicas: {report.sent} requests sent "
        f"({report.concurrency} at a time) in {report.seconds} s "
        f"({report.requests_per_second}/s), {report.answered} answered, {report.failed} failed"
    )
    print("| | requests | prompt tokens | completion tokens |")
    print("|---|---|---|---|")
    print(
        f"| clients received | {report.answered} | {report.prompt_tokens} | "
        f"{report.completion_tokens} |"
    )
    print(
        f"| ledger (/admin/usage?group_by=key) | {report.ledger_requests} | "
        f"{report.ledger_prompt_tokens} | {report.ledger_completion_tokens} |"
    )
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    if report.problems:
        print("MISMATCH:\n  " + "\n  ".join(report.problems))
        return 1
    print(f"per key: all {report.keys} keys equal (requests, tokens, cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
