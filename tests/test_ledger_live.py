"""The usage ledger of a real `nomoat serve` with the embedded llama.cpp
engine, driven by the official `openai` SDK.

Every request is one row, whatever became of it; the rows' tokens are the
engine's own: llama.cpp's perf counters (``n_p_eval + n_eval``, on /metrics as
``nomoat_engine_decoded_tokens_total``) move by exactly the prompt tokens not
served from the cache plus the generated tokens less one (the last token is
sampled, never evaluated) of each request.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL, Server, free_port, running_server
from sqlalchemy import select

from gateway.accounting.db import async_url, open_engine
from gateway.accounting.tables import usage
from gateway.auth import hash_api_key

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-nomoat-admin-0123456789abcdef"
BROKEN = "broken"
USER = [{"role": "user", "content": "Name three colours."}]
# The model's end-of-generation tokens forbidden: a generation ends at its
# budget or when cancelled (so a held stream is still running).
NO_END = {"0": -100, "2": -100, "4": -100}


def config(database: str, max_per_key: int = 1) -> str:
    return f"""
[server]
api_key_hashes = ["{hash_api_key(API_KEY)}"]
admin_key_hashes = ["{hash_api_key(ADMIN_KEY)}"]
shutdown_grace_seconds = 20

[limits]
max_body_bytes = 16384

[backends.embedded]
type = "llamacpp"
threads = 1
parallel = 2
smoke_test = false
max_per_key = {max_per_key}

[backends.dead]
type = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["ghost"]
connect_timeout = 1

[models.{MODEL}]
deployments = [{{ backend = "embedded" }}]

[models.{BROKEN}]
deployments = [{{ backend = "dead", model = "ghost" }}]
retries = 0

[accounting]
database = "{database}"
"""


def sdk(server: Server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def engine_counter(server: Server, name: str) -> int:
    for line in httpx.get(f"{server.root_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'{name}{{backend="embedded"}} '):
            return int(float(line.split()[-1]))
    raise AssertionError(f"{name} is not on /metrics")


def settled_decoded(server: Server) -> int:
    """The engine's decoded-token count once nothing runs or waits in it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = engine_counter(server, "nomoat_engine_requests_running") + engine_counter(
            server, "nomoat_engine_requests_waiting"
        )
        if busy == 0:
            first = engine_counter(server, "nomoat_engine_decoded_tokens_total")
            time.sleep(0.3)
            if engine_counter(server, "nomoat_engine_decoded_tokens_total") == first:
                return first
        time.sleep(0.05)
    raise AssertionError("the engine stayed busy")


def warm_up(server: Server) -> None:
    """One request, so that llama.cpp's counters are real: it reports each
    of its two (prompt and generated tokens) as at least 1, so from a fresh
    engine the first request's count would come out 2 short. Its prompt is
    token ids no later prompt starts with (nothing of it is reused)."""
    reply = sdk(server).completions.create(model=MODEL, prompt=[1000, 1001, 1002], max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens > 1


def usage_report(server: Server, group_by: str = "model") -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{server.root_url}/admin/usage",
        params={"group_by": group_by},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    data: list[dict[str, Any]] = answer.json()["data"]
    return data


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("select * from usage order by id")]


async def all_rows(url: str) -> list[dict[str, Any]]:
    """The ledger's rows in any database (SQLite or PostgreSQL)."""
    engine = open_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            return [dict(row) for row in (await connection.execute(select(usage))).mappings()]
    finally:
        await engine.dispose()


def fed_tokens(rows: list[dict[str, Any]]) -> int:
    """The tokens the engine evaluated for the rows of its requests, as
    their usage says: each prompt's tokens not cached, and every generated
    token but the last sampled one, never fed back. An answer that ended on
    the model's end token (finish reason "stop": these requests set no stop
    sequences) sampled that token last; the usage does not count it (as
    logprobs do not show it), so each of its counted tokens was fed."""
    return sum(
        row["prompt_tokens"]
        - row["cached_tokens"]
        + row["completion_tokens"]
        - (0 if row["finish_reason"] == "stop" else 1)
        for row in rows
        if row["backend"] == "embedded" and (row["completion_tokens"] or row["finish_reason"])
    )


def every_kind(server: Server) -> Counter[str]:
    """One request of each kind, through the SDK; what the client saw of each."""
    client = sdk(server)
    seen: Counter[str] = Counter()
    # Greedy, it ends on the model's end token (after 47 tokens).
    reply = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=64, temperature=0, user="ada"
    )
    assert reply.usage is not None and reply.choices[0].finish_reason == "stop"
    seen["json"] += 1
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9)
    assert text.usage is not None
    seen["json"] += 1
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [c for c in stream if c.usage is not None]
    seen["stream"] += 1
    # A stream the client leaves, holding the key's one engine slot while
    # it is open: the same key's next request is refused with 429.
    held = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2000, stream=True, logit_bias=NO_END
    )
    first = next(iter(held))
    assert first.choices
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    seen["429"] += 1
    held.close()
    seen["cut"] += 1
    with pytest.raises(openai.InternalServerError):  # 502: the backend is unreachable
        client.chat.completions.create(model=BROKEN, messages=USER, max_tokens=5)
    seen["502"] += 1
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "sk-not-a-key-0000000000000").chat.completions.create(
            model=MODEL, messages=USER
        )
    seen["401"] += 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    seen["400"] += 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER)
    seen["404"] += 1
    big = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model=MODEL, messages=big)
    assert too_large.value.status_code == 413
    seen["413"] += 1
    return seen


@pytest.fixture
def sqlite_gateway(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    path = tmp_path / "ledger.db"
    with running_server(tmp_path, config(f"sqlite:///{path}")) as live:
        yield live, path


def test_every_request_is_one_row_with_the_engines_token_counts(
    sqlite_gateway: tuple[Server, Path],
) -> None:
    server, path = sqlite_gateway
    warm_up(server)
    before = settled_decoded(server)
    seen = every_kind(server)
    decoded = settled_decoded(server) - before
    [group] = [g for g in usage_report(server) if g["group"] == MODEL]
    warming, *rows = ledger_rows(path)
    assert len(rows) == sum(seen.values()) == 10
    assert len({row["request_id"] for row in rows}) == len(rows)
    statuses = Counter(row["status"] for row in rows)
    assert statuses == Counter({200: 3, 499: 1, 429: 1, 502: 1, 401: 1, 400: 1, 404: 1, 413: 1})
    assert fed_tokens(rows) == decoded
    assert group["requests"] == len([r for r in [warming, *rows] if r["model"] == MODEL])
    assert group["completion_tokens"] == sum(r["completion_tokens"] for r in [warming, *rows])
    answered = rows[0]
    assert answered["user"] == "ada" and answered["finish_reason"] in ("length", "stop")
    assert answered["deployment"] and answered["ttft_seconds"] is None
    streamed = rows[2]
    assert streamed["stream"] and streamed["ttft_seconds"] > 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigterm_under_load_loses_no_record(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    """The gateway stops while requests run: each one the clients sent is a
    row once it has exited (streams drain first, then the ledger flushes)."""
    import concurrent.futures

    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    with running_server(tmp_path, config(url, max_per_key=0)) as server:
        answered_at: list[float] = []

        def ask(index: int) -> str:
            try:
                sdk(server).chat.completions.create(
                    model=MODEL, messages=USER, max_tokens=4 + index % 5
                )
                answered_at.append(time.monotonic())
                return "answered"
            except openai.APIStatusError as error:
                return str(error.status_code)
            except openai.APIConnectionError:
                return "refused"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(40)]
            time.sleep(1.0)
            terminated_at = time.monotonic()
            server.process.terminate()
            outcomes = Counter(f.result() for f in futures)
        assert server.process.wait(timeout=60) == 0
    # Requests were running when the signal came, and were drained.
    assert any(at > terminated_at for at in answered_at), outcomes
    reached = sum(count for outcome, count in outcomes.items() if outcome != "refused")
    rows = asyncio.run(all_rows(url))
    assert len(rows) == reached, (outcomes, Counter(r["status"] for r in rows))
    assert outcomes["answered"] == Counter(r["status"] for r in rows)[200]


def test_a_request_shed_past_max_requests_is_one_row(tmp_path: Path) -> None:
    """Shed before the app (gateway/shedding.py), it still has its row."""
    path = tmp_path / "ledger.db"
    text = config(f"sqlite:///{path}", max_per_key=0).replace(
        "[limits]\n", "[limits]\nmax_requests = 1\n"
    )
    with running_server(tmp_path, text) as server:
        client = sdk(server)
        held = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=2000, stream=True, logit_bias=NO_END
        )
        assert next(iter(held)).choices
        with pytest.raises(openai.InternalServerError) as shed:
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
        assert shed.value.status_code == 503
        held.close()
    rows = ledger_rows(path)  # all written: the server has stopped
    assert sorted((row["status"], row["error_type"]) for row in rows) == [
        (499, "client_closed_request"),
        (503, "server_overloaded"),
    ]
