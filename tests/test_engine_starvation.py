"""No request can starve the others on the in-process engine: the scheduler
without a model (a scripted stand-in for llama.cpp's generations and decode
steps), so each rule is checked exactly and fast.

- a request's generations are queued all or none, and one failing (or its
  caller leaving) stops the others at once;
- one API key holds at most ``max_per_key`` generations, waiting and running;
- a stream's unread output is bounded: its generation waits for the reader,
  and is stopped if the reader stalls;
- generations with different LoRA adapter sets take turns step by step, so
  one key's variety of adapter scales cannot hold everyone else back.

The same rules against the real engine are in test_engine_limits.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import gateway.engine.worker as worker_module
from gateway.engine.adapters import AdapterSet, LoraRef
from gateway.engine.generation import Delta, GenerationRequest, GenerationResult
from gateway.engine.native import NativeError, NativeModel
from gateway.engine.scheduler import (
    ClientTooSlowError,
    EngineBusyError,
    KeyBusyError,
    Scheduler,
    TooManyGenerationsError,
)
from gateway.engine.turns import Seat, Turns

FOREVER = 10**9
# A prompt whose generation llama.cpp refuses (a grammar it rejects, say).
REFUSED = -1


class _Model:
    def __init__(self, n_seq: int) -> None:
        self.n_seq = n_seq
        self.closed = False

    def forget(self, sequence: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _Generation:
    """One token per step until ``max_tokens``, each emitted as a delta."""

    def __init__(
        self,
        request: GenerationRequest,
        sequence: int,
        is_cancelled: Callable[[], bool],
        emit: Callable[[Delta], None] | None,
    ) -> None:
        self.request = request
        self.sequence = sequence
        self.is_cancelled = is_cancelled
        self.emit = emit
        self.steps = 0
        self.finish: str | None = None
        self.error: Exception | None = None  # a grammar failure of its own: never here

    @property
    def label(self) -> int:
        return self.request.prompt[0]

    def cancel(self) -> None:
        self.finish = "cancelled"

    def held(self) -> tuple[int, ...]:
        return tuple(self.request.prompt)

    def result(self) -> GenerationResult:
        return GenerationResult("t" * self.steps, (), 1, self.steps, self.finish or "length")


class _Engine:
    """Stands in for generation.Generation and generation.step; records every
    generation made and the labels of each step's batch."""

    def __init__(self) -> None:
        self.made: dict[int, _Generation] = {}
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def generation(
        self,
        model: NativeModel,
        request: GenerationRequest,
        sequence: int,
        is_cancelled: Callable[[], bool],
        emit: Callable[[Delta], None] | None = None,
        reusable: int = 0,
    ) -> _Generation:
        if request.prompt[0] == REFUSED:
            raise NativeError("llama.cpp refused the grammar")
        made = _Generation(request, sequence, is_cancelled, emit)
        with self.lock:
            self.made[made.label] = made
        return made

    def step(self, model: NativeModel, generations: list[_Generation]) -> None:
        time.sleep(0.001)
        with self.lock:
            self.batches.append([g.label for g in generations])
        for generation in generations:
            if generation.finish is None and generation.is_cancelled():
                generation.cancel()
            if generation.finish is not None:
                continue
            generation.steps += 1
            if generation.emit is not None:
                generation.emit(Delta("t"))
            if generation.steps >= generation.request.max_tokens:
                generation.finish = "length"

    def steps_of(self, label: int) -> int:
        with self.lock:
            return self.made[label].steps if label in self.made else 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(worker_module, "Generation", self.generation)
        monkeypatch.setattr(worker_module, "step", self.step)


class _Adapters:
    """Stands in for the adapter cache: records each activation."""

    def __init__(self) -> None:
        self.activated: list[AdapterSet] = []

    def activate(self, refs: AdapterSet, in_use: frozenset[Path] = frozenset()) -> None:
        if not self.activated or self.activated[-1] != refs:
            self.activated.append(refs)


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> _Engine:
    fake = _Engine()
    fake.install(monkeypatch)
    return fake


def _scheduler(n_seq: int = 1, **options: object) -> Scheduler:
    options.setdefault("max_waiting", 4)
    scheduler = Scheduler(_Model(n_seq), **options)  # type: ignore[arg-type]
    scheduler.start()
    return scheduler


def _request(label: int, tokens: int = FOREVER, adapters: AdapterSet = ()) -> GenerationRequest:
    return GenerationRequest(prompt=[label], max_tokens=tokens, adapters=adapters)


async def _until(predicate: Callable[[], bool], limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def _scale(scale: float) -> AdapterSet:
    return (LoraRef("alpha", Path("/adapters/alpha.gguf"), scale),)


# ------------------------------------------------------- all or none


def test_a_request_that_does_not_fit_queues_none_of_its_generations(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=1, max_waiting=2)
        running = scheduler.open_stream(_request(1), "a")
        await _until(lambda: scheduler.running == 1)
        # Three more cannot wait where two may: none of them is queued.
        with pytest.raises(EngineBusyError):
            await scheduler.run_all([_request(2), _request(3), _request(4)], "b")
        assert scheduler.waiting == 0
        assert scheduler.held_by("b") == 0
        # Two fit.
        pair = asyncio.ensure_future(scheduler.run_all([_request(5, 3), _request(6, 3)], "b"))
        await _until(lambda: scheduler.waiting == 2)
        running.cancel()
        results = await asyncio.wait_for(pair, 10)
        assert [r.completion_tokens for r in results] == [3, 3]
        await scheduler.aclose()

    asyncio.run(scenario())
    assert set(engine.made) == {1, 5, 6}


def test_one_failing_generation_stops_its_siblings_at_once(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=3, max_waiting=4)
        work = asyncio.ensure_future(
            scheduler.run_all([_request(1), _request(REFUSED), _request(3)], "a")
        )
        with pytest.raises(NativeError):
            await asyncio.wait_for(work, 10)
        # The siblings, which would run forever, are stopped and their
        # sequences freed.
        await _until(lambda: scheduler.running == 0 and scheduler.held_by("a") == 0)
        assert engine.made[1].finish == engine.made[3].finish == "cancelled"
        await scheduler.aclose()

    asyncio.run(scenario())


def test_a_caller_that_leaves_stops_every_generation_of_its_request(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=2, max_waiting=4)
        work = asyncio.ensure_future(scheduler.run_all([_request(i) for i in (1, 2, 3)], "a"))
        await _until(lambda: scheduler.running == 2 and scheduler.waiting == 1)
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        assert scheduler.waiting == 0  # the queued one left at once
        await _until(lambda: scheduler.running == 0)
        await scheduler.aclose()

    asyncio.run(scenario())
    assert set(engine.made) == {1, 2}


def test_capacity_counts_free_sequences_and_the_queue(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=2, max_waiting=1)
        assert scheduler.capacity == 3
        with pytest.raises(TooManyGenerationsError):
            scheduler.open_streams([_request(i) for i in range(4)], "a")
        # Idle, three fit at once: two run, one waits.
        streams = scheduler.open_streams([_request(i) for i in range(3)], "a")
        await _until(lambda: scheduler.running == 2 and scheduler.waiting == 1)
        with pytest.raises(EngineBusyError):
            scheduler.open_stream(_request(9), "b")
        streams.cancel()
        await _until(lambda: scheduler.running == 0 and scheduler.waiting == 0)
        await scheduler.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------------- per key


def test_one_key_cannot_fill_the_engine(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=1, max_waiting=8, max_per_key=3)
        first = scheduler.open_streams([_request(1), _request(2)], "greedy")
        second = scheduler.open_stream(_request(3), "greedy")
        assert scheduler.held_by("greedy") == 3
        with pytest.raises(KeyBusyError):
            scheduler.open_stream(_request(4), "greedy")
        # Another key still gets in, and so do requests without a key.
        other = scheduler.open_streams([_request(5), _request(6), _request(7)], "polite")
        anonymous = scheduler.open_streams([_request(i) for i in (8, 9)], "")
        await _until(lambda: scheduler.running == 1)
        assert scheduler.waiting == 7
        # More than one key's share at once can never be served: not a retry.
        with pytest.raises(TooManyGenerationsError):
            scheduler.open_streams([_request(i) for i in (10, 11, 12, 13)], "new")
        # A share is given back when its generations end, running or queued.
        second.cancel()
        assert scheduler.held_by("greedy") == 2
        scheduler.open_stream(_request(14), "greedy").cancel()
        for streams in (first, other, anonymous):
            streams.cancel()
        await _until(lambda: scheduler.running == 0 and scheduler.waiting == 0)
        assert scheduler.held_by("greedy") == 0
        await scheduler.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------- backpressure


def test_a_slow_reader_pauses_its_generation_not_the_others(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=2, stream_buffer=4, stall_seconds=30)
        stream = scheduler.open_stream(_request(1), "reader")
        other = asyncio.ensure_future(scheduler.run(_request(2, 200), "other"))
        # Nobody reads the stream: it stops at its buffer, the other goes on.
        result = await asyncio.wait_for(other, 10)
        assert result.completion_tokens == 200
        assert engine.steps_of(1) <= 5
        paused_at = engine.steps_of(1)
        await asyncio.sleep(0.05)
        assert engine.steps_of(1) == paused_at
        # Reading lets it go on, a buffer at a time.
        read = 0
        async for _, event in stream:
            assert isinstance(event, Delta)
            read += len(event.text)
            if read >= 20:
                break
        assert engine.steps_of(1) >= 20
        await _until(lambda: scheduler.running == 0)
        await scheduler.aclose()

    asyncio.run(scenario())


def test_a_stalled_reader_loses_its_generation(engine: _Engine) -> None:
    async def scenario() -> None:
        scheduler = _scheduler(n_seq=1, stream_buffer=2, stall_seconds=0.2)
        stream = scheduler.open_stream(_request(1), "reader")
        await _until(lambda: scheduler.running == 1)
        started = time.monotonic()
        # The sequence is freed once the reader has stalled for 0.2 s.
        await _until(lambda: scheduler.running == 0, limit=5)
        assert 0.15 <= time.monotonic() - started < 3
        with pytest.raises(ClientTooSlowError):
            async for _ in stream:
                pass
        # And serves the next request.
        result = await asyncio.wait_for(scheduler.run(_request(2, 3), "next"), 10)
        assert result.completion_tokens == 3
        await scheduler.aclose()

    asyncio.run(scenario())
    assert engine.made[1].steps <= 3


# --------------------------------------------------- adapter variety


def test_an_adapter_set_does_not_wait_for_another_sets_batch(engine: _Engine) -> None:
    """Before, a request with another adapter set waited until the running
    batch had drained: one long request with ``alpha@0.71`` kept a base-model
    request from starting at all."""
    adapters = _Adapters()

    async def scenario() -> None:
        scheduler = _scheduler(n_seq=2, adapters=adapters)
        scaled = asyncio.ensure_future(scheduler.run(_request(1, adapters=_scale(0.71)), "a"))
        await _until(lambda: engine.steps_of(1) > 0)
        plain = await asyncio.wait_for(scheduler.run(_request(2, 50), "b"), 10)
        assert plain.completion_tokens == 50
        assert not scaled.done()  # it runs on, side by side
        scaled.cancel()
        await _until(lambda: scheduler.running == 0)
        await scheduler.aclose()

    asyncio.run(scenario())
    # Steps alternate between the two sets, never mixing them.
    mixed = [batch for batch in engine.batches if set(batch) == {1, 2}]
    assert not mixed
    assert () in adapters.activated and _scale(0.71) in adapters.activated


def test_many_scales_from_one_key_cost_that_key_not_the_others(engine: _Engine) -> None:
    adapters = _Adapters()

    async def scenario() -> None:
        scheduler = _scheduler(n_seq=5, adapters=adapters, max_waiting=0)
        variants = [
            scheduler.open_stream(_request(10 + i, adapters=_scale(0.71 + i / 100)), "many")
            for i in range(4)
        ]
        plain = await asyncio.wait_for(scheduler.run(_request(1, 40), "plain"), 10)
        assert plain.completion_tokens == 40
        for stream in variants:
            stream.cancel()
        await _until(lambda: scheduler.running == 0)
        await scheduler.aclose()

    asyncio.run(scenario())
    # Once the plain request was running, it was in every other step at least.
    first = next(i for i, batch in enumerate(engine.batches) if 1 in batch)
    last = max(i for i, batch in enumerate(engine.batches) if 1 in batch)
    window = engine.batches[first : last + 1]
    assert sum(1 in batch for batch in window) >= len(window) // 2


def test_turns_alternate_owners_and_share_steps_by_adapter_set() -> None:
    turns: Turns[str] = Turns()
    seats = [
        Seat("a1", "a", _scale(0.1)),
        Seat("a2", "a", _scale(0.2)),
        Seat("a3", "a", _scale(0.3)),
        Seat("b1", "b", ()),
        Seat("c1", "c", ()),
    ]
    picked = [sorted(seat.key for seat in turns.pick(seats)) for _ in range(6)]
    # b and c share the base set, so they step together; a's three sets
    # share a's turns.
    assert picked == [
        ["a1"],
        ["b1", "c1"],
        ["a2"],
        ["b1", "c1"],
        ["a3"],
        ["b1", "c1"],
    ]
    turns.leave("b1", "b", owner_done=True)
    assert turns.pick([]) == []
