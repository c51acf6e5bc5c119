"""The engine's behaviour under clients that go away and under overload.

Evidence comes from the engine itself: ``/metrics`` exposes llama.cpp's own
perf counters (``n_p_eval + n_eval``) as ``nomoat_engine_decoded_tokens_total``,
so "generation stopped" means llama.cpp stopped evaluating tokens, not merely
that the gateway stopped sending them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL, Server, config_with_key, running_server
from openai.types.chat import ChatCompletion

import gateway.engine.worker as worker_module
from gateway.engine.fair_queue import FairQueue
from gateway.engine.generation import Delta, GenerationRequest, GenerationResult
from gateway.engine.native import NativeModel
from gateway.engine.scheduler import EngineBusyError, EngineClosedError, Scheduler, _Job

BUDGET = 2000
# The model's end-of-generation tokens (<|endoftext|>, <|im_end|>, ...) are
# forbidden, so a generation can only end at its budget or by cancellation.
NO_END = {"0": -100, "2": -100, "4": -100}
LONG: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
    "temperature": 0,
    "logit_bias": NO_END,
}
# A model on the same engine whose streams may last STREAM_LIMIT seconds in all.
LIMITED = "limited"
STREAM_LIMIT = 1.5
# One engine thread: this machine is shared, and llama.cpp's thread barriers
# collapse when its threads compete for cores. max_waiting = 1 for the queue tests.
ENGINE_CONFIG = config_with_key(
    f"""
    [backends.embedded]
    type = "llamacpp"
    threads = 1
    parallel = 1
    smoke_test = false
    max_waiting = 1

    [models.{MODEL}]
    deployments = [{{ backend = "embedded" }}]

    [models.{LIMITED}]
    deployments = [{{ backend = "embedded", model = "{MODEL}" }}]
    stream_timeout_seconds = {STREAM_LIMIT}
    """
)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("engine"), ENGINE_CONFIG) as live:
        yield live


# ------------------------------------------------------------------ helpers


def engine_metrics(server: Server) -> dict[str, int]:
    response = httpx.get(f"{server.root_url}/metrics", timeout=30)
    assert response.status_code == 200
    values = {}
    for line in response.text.splitlines():
        if line.startswith("nomoat_engine_") and '{backend="embedded"}' in line:
            name, value = line.split('{backend="embedded"} ')
            values[name] = int(float(value))
    return values


def decoded(server: Server) -> int:
    return engine_metrics(server)["nomoat_engine_decoded_tokens_total"]


def wait_idle(server: Server, timeout: float = 60) -> float:
    """Wait until nothing runs or waits in the engine; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        values = engine_metrics(server)
        if (
            values["nomoat_engine_requests_running"]
            == values["nomoat_engine_requests_waiting"]
            == 0
        ):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {timeout}s: {engine_metrics(server)}")


def settled_count(server: Server) -> int:
    """The decoded-token count once the engine is idle, checked to be still."""
    wait_idle(server)
    first = decoded(server)
    time.sleep(1.0)
    second = decoded(server)
    assert second == first, f"the engine kept decoding: {first} -> {second}"
    return second


def prompt_tokens(server: Server) -> int:
    body = {**LONG, "max_tokens": 1}
    response = httpx.post(
        f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=120
    )
    assert response.status_code == 200, response.text
    count: int = response.json()["usage"]["prompt_tokens"]
    return count


def has_content(line: str) -> bool:
    """An SSE line carrying generated text (not the empty opening delta)."""
    return line.startswith("data: ") and '"content":"' in line and '"content":""' not in line


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def long_chat(client: openai.OpenAI, max_tokens: int) -> ChatCompletion:
    """A non-streamed LONG request through the official SDK."""
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        temperature=0,
        logit_bias=NO_END,
        max_tokens=max_tokens,
    )


# ------------------------------------------------------------------ metrics


@pytest.mark.e2e
def test_metrics_expose_the_engines_own_counters(engine: Server) -> None:
    response = httpx.get(f"{engine.root_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE nomoat_engine_decoded_tokens_total counter" in text
    assert "# TYPE nomoat_engine_requests_running gauge" in text
    assert "# TYPE nomoat_engine_requests_waiting gauge" in text
    assert set(engine_metrics(engine)) == {
        # Time in batch steps: what its usd_per_hour is shared by (accounting).
        "nomoat_engine_busy_seconds_total",
        "nomoat_engine_decoded_tokens_total",
        "nomoat_engine_requests_running",
        "nomoat_engine_requests_waiting",
    }


@pytest.mark.e2e
def test_decoded_tokens_count_prompt_and_generated_tokens(engine: Server) -> None:
    client = sdk(engine)
    long_chat(client, 3)  # warm the counters up
    before = settled_count(engine)
    answer = long_chat(client, 8)
    assert answer.usage is not None
    assert answer.choices[0].finish_reason == "length"
    after = settled_count(engine)
    usage = answer.usage
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached  # the warm-up left the same prompt in the KV cache
    # Cached prompt tokens are not evaluated again, and the last sampled
    # token is never fed back.
    assert after - before == usage.prompt_tokens - cached + usage.completion_tokens - 1


# ------------------------------------------------------ client disconnects


@pytest.mark.e2e
def test_closing_a_stream_stops_generation(engine: Server) -> None:
    prompt = prompt_tokens(engine)
    before = settled_count(engine)
    received = 0
    with httpx.Client(timeout=httpx.Timeout(120)) as raw:
        body = {**LONG, "max_tokens": BUDGET, "stream": True}
        url = f"{engine.base_url}/chat/completions"
        with raw.stream("POST", url, json=body, headers=AUTH) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if has_content(line):
                    received += 1
                    if received == 5:
                        break
    # The connection is closed: the engine must stop within about a token.
    assert wait_idle(engine, timeout=30) < 30
    after = settled_count(engine)
    generated = after - before - prompt
    assert received == 5
    assert generated < BUDGET / 20, f"{generated} tokens decoded after {received} were read"
    assert generated <= received + 25, f"{generated} tokens decoded after {received} were read"


@pytest.mark.e2e
def test_a_stream_past_its_time_limit_ends_with_an_error_and_stops_generation(
    engine: Server,
) -> None:
    prompt = prompt_tokens(engine)
    before = settled_count(engine)
    body = {**LONG, "model": LIMITED, "max_tokens": BUDGET, "stream": True}
    started = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(120)) as raw:
        url = f"{engine.base_url}/chat/completions"
        with raw.stream("POST", url, json=body, headers=AUTH) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
    lasted = time.monotonic() - started
    assert any(has_content(line) for line in lines)
    assert lines[-1].startswith('data: {"error"') and '"code":"timeout"' in lines[-1]
    assert "data: [DONE]" not in lines
    assert STREAM_LIMIT <= lasted < STREAM_LIMIT + 5
    wait_idle(engine, timeout=10)
    generated = settled_count(engine) - before - prompt
    # Uncancelled, it would have decoded BUDGET - 1 tokens.
    assert generated < BUDGET / 4, f"{generated} tokens decoded after the stream's limit"


@pytest.mark.e2e
def test_status_counts_a_stream_in_flight_until_it_ends(engine: Server) -> None:
    def in_flight() -> int:
        status = httpx.get(f"{engine.root_url}/status", headers=AUTH, timeout=30).json()
        return int(status["models"][MODEL][0]["in_flight"])

    wait_idle(engine)
    body = {**LONG, "max_tokens": 40, "stream": True}
    with httpx.Client(timeout=httpx.Timeout(120)) as raw:
        url = f"{engine.base_url}/chat/completions"
        with raw.stream("POST", url, json=body, headers=AUTH) as response:
            lines = response.iter_lines()
            while not has_content(next(lines)):
                pass
            # Past its first chunk, the stream is still on the deployment.
            assert in_flight() == 1
            rest = list(lines)
    assert "data: [DONE]" in rest
    assert in_flight() == 0


@pytest.mark.e2e
def test_a_client_timing_out_stops_a_non_streamed_generation(engine: Server) -> None:
    prompt = prompt_tokens(engine)
    before = settled_count(engine)
    body = {**LONG, "max_tokens": BUDGET}
    timeout = httpx.Timeout(30, read=1.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine.base_url}/chat/completions", json=body, headers=AUTH, timeout=timeout)
    gone = time.monotonic()
    wait_idle(engine, timeout=60)
    stopped_after = time.monotonic() - gone
    after = settled_count(engine)
    generated = after - before - prompt
    assert stopped_after < 10, f"the engine ran {stopped_after:.1f}s after the client left"
    # Uncancelled, it would have decoded BUDGET - 1 tokens.
    assert generated < BUDGET / 2, f"{generated} tokens decoded for a client that left"


# ------------------------------------------------------------- queue bound


@pytest.mark.e2e
def test_a_full_queue_is_refused_at_once_with_503(engine: Server) -> None:
    """One stream runs, one waits (max_waiting = 1): the next request is a 503
    with Retry-After, before any byte of a response. Closing the waiting
    stream removes its job; it never runs."""
    wait_idle(engine)
    body = {**LONG, "max_tokens": BUDGET, "stream": True}
    url = f"{engine.base_url}/chat/completions"
    with (
        httpx.Client(timeout=120) as first,
        httpx.Client(timeout=120) as second,
        first.stream("POST", url, json=body, headers=AUTH) as running,
    ):
        lines = running.iter_lines()
        assert running.status_code == 200
        assert any(has_content(line) for line in lines)
        with second.stream("POST", url, json=body, headers=AUTH) as waiting:
            assert waiting.status_code == 200
            values = engine_metrics(engine)
            assert values["nomoat_engine_requests_running"] == 1
            assert values["nomoat_engine_requests_waiting"] == 1

            started = time.monotonic()
            refused = httpx.post(url, json={**LONG, "max_tokens": 5}, headers=AUTH, timeout=60)
            assert time.monotonic() - started < 15
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["message"]
            assert error["type"] == "server_error"

            streamed = httpx.post(url, json=body, headers=AUTH, timeout=60)
            assert streamed.status_code == 503  # a status, not an error mid-stream
            assert "retry-after" in streamed.headers
        # Its place is free at once, while the first generation still runs.
        deadline = time.monotonic() + 5
        while engine_metrics(engine)["nomoat_engine_requests_waiting"] != 0:
            assert time.monotonic() < deadline, "the closed stream's job still waits"
            time.sleep(0.05)
        assert engine_metrics(engine)["nomoat_engine_requests_running"] == 1
    assert wait_idle(engine, timeout=30) < 30


@pytest.mark.e2e
def test_concurrent_requests_beyond_the_queue_get_503_from_the_sdk(engine: Server) -> None:
    wait_idle(engine)
    client = sdk(engine)
    start = threading.Barrier(4)

    def call(_: int) -> tuple[str, Any]:
        start.wait(timeout=30)
        try:
            answer = long_chat(client, 64)
        except openai.InternalServerError as error:
            return "refused", error
        return "served", answer

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(call, range(4), timeout=300))
    refused = [value for kind, value in outcomes if kind == "refused"]
    served = [value for kind, value in outcomes if kind == "served"]
    assert refused, "no request was refused with max_waiting = 1"
    assert served, "every request was refused"
    for error in refused:
        assert error.status_code == 503
        assert int(error.response.headers["retry-after"]) >= 1
        body = error.response.json()
        assert set(body) == {"error"}
        assert error.message
    for answer in served:
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 64
    wait_idle(engine)


# --------------------------------------- the scheduler, without a model


def _job(owner: str, label: int, loop: asyncio.AbstractEventLoop) -> _Job:
    request = GenerationRequest(prompt=[label], max_tokens=1)
    return _Job(request, owner, None, loop.create_future())


def test_fair_queue_takes_owners_in_turns() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue: FairQueue[_Job] = FairQueue()
        for owner, label in [("a", 1), ("a", 2), ("a", 3), ("b", 4), ("c", 5), ("b", 6)]:
            queue.push(_job(owner, label, loop))
        assert queue.size == 6
        order = [queue.pop().request.prompt[0] for _ in range(6)]
    finally:
        loop.close()
    assert order == [1, 4, 5, 2, 6, 3]
    assert queue.size == 0
    assert not queue.by_owner
    assert not queue.turns


class _FakeModel:
    n_seq = 1  # one sequence: jobs run one at a time, in the queue's order

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _FakeGeneration:
    def __init__(self, request: GenerationRequest, sequence: int, is_cancelled: Callable[[], bool]):
        self.request = request
        self.sequence = sequence
        self.is_cancelled = is_cancelled
        self.finish: str | None = None
        self.error: Exception | None = None

    def cancel(self) -> None:
        self.finish = "cancelled"

    def held(self) -> tuple[int, ...]:
        return tuple(self.request.prompt)

    def result(self) -> GenerationResult:
        return GenerationResult("x", (), 1, 1, self.finish or "length")


class _FakeEngine:
    """Stands in for generation.Generation and generation.step: records what
    ran, and keeps each generation going until released (or cancelled),
    checking the flag per 'token'."""

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def generation(
        self,
        model: NativeModel,
        request: GenerationRequest,
        sequence: int,
        is_cancelled: Callable[[], bool],
        emit: Callable[[Delta], None] | None = None,
        reusable: int = 0,
    ) -> _FakeGeneration:
        self.ran.append(request.prompt[0])
        self.started.set()
        return _FakeGeneration(request, sequence, is_cancelled)

    def step(self, model: NativeModel, generations: list[_FakeGeneration]) -> None:
        time.sleep(0.001)
        for generation in generations:
            if generation.finish is None and generation.is_cancelled():
                generation.cancel()
            elif generation.finish is None and self.release.is_set():
                generation.finish = "stop"

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(worker_module, "Generation", self.generation)
        monkeypatch.setattr(worker_module, "step", self.step)


async def _until(predicate: Callable[[], bool], limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _request(label: int) -> GenerationRequest:
    return GenerationRequest(prompt=[label], max_tokens=1)


def test_scheduler_serves_owners_in_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeEngine()
    fake.install(monkeypatch)

    async def scenario() -> None:
        scheduler = Scheduler(_FakeModel(), max_waiting=10)  # type: ignore[arg-type]
        scheduler.start()
        first = asyncio.ensure_future(scheduler.run(_request(1), "a"))
        await _until(fake.started.is_set)
        later = [
            asyncio.ensure_future(scheduler.run(_request(label), owner))
            for label, owner in [(2, "a"), (3, "a"), (4, "a"), (5, "b"), (6, "c")]
        ]
        await _until(lambda: scheduler.waiting == 5)
        fake.release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), timeout=30)
        assert all(result.finish_reason == "stop" for result in results)
        await scheduler.aclose()

    asyncio.run(scenario())
    # One client's backlog does not starve the others.
    assert fake.ran == [1, 2, 5, 6, 3, 4]


def test_scheduler_bounds_its_queue_and_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeEngine()
    fake.install(monkeypatch)
    model = _FakeModel()

    async def scenario() -> None:
        scheduler = Scheduler(model, max_waiting=2)  # type: ignore[arg-type]
        scheduler.start()
        running = asyncio.ensure_future(scheduler.run(_request(1), "a"))
        await _until(fake.started.is_set)
        queued = asyncio.ensure_future(scheduler.run(_request(2), "a"))
        stream = scheduler.open_stream(_request(3), "b")
        await _until(lambda: scheduler.waiting == 2)
        with pytest.raises(EngineBusyError):
            scheduler.open_stream(_request(4), "c")
        # A queued job that is cancelled never runs.
        stream.cancel()
        # Cancelling the caller of a running job stops its generation.
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await _until(lambda: fake.ran == [1, 2])
        fake.release.set()
        assert (await asyncio.wait_for(queued, timeout=10)).finish_reason == "stop"
        await _until(lambda: scheduler.waiting == 0 and scheduler.running == 0)

        # Shutdown refuses new work, fails what waits, stops what runs, frees the model.
        fake.release.clear()
        last = asyncio.ensure_future(scheduler.run(_request(5), "a"))
        await _until(lambda: fake.ran[-1] == 5)
        waiting = asyncio.ensure_future(scheduler.run(_request(6), "d"))
        await _until(lambda: scheduler.waiting == 1)
        await asyncio.wait_for(scheduler.aclose(), timeout=10)
        with pytest.raises(EngineClosedError):
            await asyncio.wait_for(waiting, timeout=10)
        with pytest.raises(EngineClosedError):
            scheduler.open_stream(_request(7), "a")
        last.cancel()

    asyncio.run(scenario())
    assert fake.ran == [1, 2, 5]
    assert model.closed


def test_a_cancelled_queued_job_frees_its_place_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that leaves while queued must not hold a queue slot until the
    running generation ends (which would refuse others with 503 meanwhile)."""
    fake = _FakeEngine()
    fake.install(monkeypatch)

    async def scenario() -> None:
        scheduler = Scheduler(_FakeModel(), max_waiting=1)  # type: ignore[arg-type]
        scheduler.start()
        running = scheduler.open_stream(_request(1), "a")
        await _until(fake.started.is_set)
        queued = asyncio.ensure_future(scheduler.run(_request(2), "b"))
        await _until(lambda: scheduler.waiting == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert scheduler.waiting == 0
        replacement = scheduler.open_stream(_request(3), "c")  # not EngineBusyError
        assert scheduler.waiting == 1
        replacement.cancel()
        assert scheduler.waiting == 0
        running.cancel()
        await _until(lambda: scheduler.running == 0)
        await scheduler.aclose()

    asyncio.run(scenario())
    assert fake.ran == [1]


def test_the_worker_survives_a_job_cancelled_before_it_wakes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeEngine()
    fake.release.set()
    fake.install(monkeypatch)

    async def scenario() -> None:
        scheduler = Scheduler(_FakeModel(), max_waiting=4)  # type: ignore[arg-type]
        scheduler.start()
        await asyncio.sleep(0.05)  # the worker now sleeps on an empty queue
        scheduler.open_stream(_request(1), "a").cancel()  # wakes it, then leaves
        await asyncio.sleep(0.05)
        result = await asyncio.wait_for(scheduler.run(_request(2), "a"), timeout=10)
        assert result.finish_reason == "stop"
        await scheduler.aclose()

    asyncio.run(scenario())
    assert fake.ran == [2]
