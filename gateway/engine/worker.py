"""The engine's worker thread: the only code that touches the model.

It admits the jobs the scheduler hands over (one per free sequence) into
sequences, reusing a cached prompt prefix where one is held, and steps the
running generations: each step serves the generations whose turn it is,
all with one LoRA adapter set (:mod:`gateway.engine.turns`).

A generation whose reader has a full buffer is left out of the steps (its
sequence and KV cache kept) until the reader catches up; if that lasts
``stall_seconds``, the generation is stopped and reported as
:class:`ClientTooSlowError`. When every running generation waits so, the
thread sleeps until a reader drains or new work arrives.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.engine.adapters import AdapterCache, AdapterSet
from gateway.engine.generation import Generation, GenerationRequest, GenerationResult, step
from gateway.engine.mailbox import StreamItem
from gateway.engine.native import NativeError, NativeModel
from gateway.engine.sequences import Held, Lease, SequencePool
from gateway.engine.timings import EngineTimings
from gateway.engine.turns import Seat, Turns

# The longest the thread sleeps while every running stream waits for its
# reader, so a stall is noticed on time even if nothing else happens.
_MAX_IDLE_SECONDS = 0.5


class EngineClosedError(Exception):
    """The engine is shutting down."""


class ClientTooSlowError(Exception):
    """A stream's reader left its output unread for ``stall_seconds``; its
    generation was stopped."""


def _never() -> bool:
    return False


@dataclass(eq=False, slots=True)
class Job:
    request: GenerationRequest
    owner: str
    emit: Callable[[StreamItem], None] | None
    future: asyncio.Future[GenerationResult]
    # Whether the job's reader has a full buffer (streams only).
    blocked: Callable[[], bool] = _never
    cancelled: bool = False
    # Stopped by the worker because its reader stalled.
    stalled: bool = False
    # No longer counted against its owner's share (see the scheduler).
    released: bool = False
    # Filled in for the job's trace (tracing on only).
    timings: EngineTimings | None = None
    # Told the seconds of each step spent on this job (its share of the
    # step's wall time, by the tokens it put in the batch), on the worker
    # thread: for its compute cost (gateway/accounting/compute.py).
    charge: Callable[[float], None] | None = None
    # What the job's generation spent (its prompt, cached and generated
    # tokens), whatever its outcome: set on the worker thread before the
    # job is reported; None if it never ran.
    spent: GenerationResult | None = None
    # Told ``spent`` once, on the event loop, when the job has ended (run,
    # failed, cancelled, or dropped from the queue): the scheduler's.
    ended: Callable[[GenerationResult | None], None] | None = None

    def is_cancelled(self) -> bool:
        return self.cancelled


Outcome = GenerationResult | BaseException
Active = dict[Generation, Job]


class Worker:
    """Owns the model's sequences; reports each job's outcome through ``report``."""

    def __init__(
        self,
        model: NativeModel,
        *,
        adapters: AdapterCache | None,
        reuse_prompts: bool,
        stall_seconds: float,
        report: Callable[[Job, Outcome], None],
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.reuse_prompts = reuse_prompts
        self.stall_seconds = stall_seconds
        self._report = report
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Set when there may be something new to do: a job in the inbox, or
        # a waiting stream drained by its reader.
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llama", daemon=True)
        # Running jobs with timings to fill in (traced); the worker's own count.
        self._traced = 0
        # Seconds spent in batch steps (adapter switches included) since the
        # start: the engine's busy time. Written by the worker thread only.
        self.busy_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Any thread: run ``job`` (a sequence is free for it)."""
        self._inbox.put(job)
        self._wake.set()

    def wake(self) -> None:
        """Any thread: a reader drained its buffer."""
        self._wake.set()

    def stop(self) -> None:
        """Stop what runs (reported as :class:`EngineClosedError`), then the thread."""
        self._inbox.put(None)
        self._wake.set()

    def join(self) -> None:
        if self._thread.is_alive():
            self._thread.join()

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        free = SequencePool(self.model.n_seq, reuse_prompts=self.reuse_prompts)
        active: Active = {}
        turns: Turns[Generation] = Turns()
        blocked_since: dict[Generation, float] = {}
        while True:
            self._wake.clear()
            if not self._take_jobs(free, active):
                return
            self._sweep(active, blocked_since)
            self._retire(list(active), active, free, turns, None)
            chosen = turns.pick(
                [
                    Seat(generation, job.owner, generation.request.adapters)
                    for generation, job in active.items()
                    if not job.blocked()
                ]
            )
            if not chosen:
                if active:
                    self._wake.wait(self._idle_seconds(blocked_since))
                continue
            batch = [seat.key for seat in chosen]
            # The phases of traced jobs are timed; with none running (tracing
            # off, or not sampled), a step takes no clock and walks nothing.
            timed = self._traced > 0
            began = time.perf_counter()
            activating = time.time_ns() if timed else 0
            error = self._activate(batch[0].request.adapters, active)
            if timed:
                _time_adapters([active[generation] for generation in batch], activating)
            fed: list[tuple[Generation, int]] = []
            if error is None:
                try:
                    fed = step(self.model, batch)
                except NativeError as failure:
                    error = failure
                else:
                    if timed:
                        _time_steps(batch, active)
            self._charge(fed or [(generation, 1) for generation in batch], active, began)
            if error is not None:
                for generation in batch:
                    generation.cancel()
            self._retire(batch, active, free, turns, error)

    def _charge(self, fed: list[tuple[Generation, int]], active: Active, began: float) -> None:
        """The step's wall time since ``began`` is busy time, shared among
        the jobs in it by the tokens each fed (a step failed or fed nothing:
        equally): decoding costs about the same per token in a batch."""
        seconds = time.perf_counter() - began
        self.busy_seconds += seconds
        tokens = sum(count for _, count in fed)
        for generation, count in fed:
            charge = active[generation].charge
            if charge is not None:
                share = count / tokens if tokens else 1 / len(fed)
                charge(seconds * share)

    def _take_jobs(self, free: SequencePool, active: Active) -> bool:
        """Admit what was submitted, waiting for it when idle; False when
        the engine shuts down."""
        while free.free:
            try:
                job = self._inbox.get(block=not active)
            except queue.Empty:
                return True
            if job is None:
                self._stop_all(active)
                return False
            lease = free.lease(job.request.prompt, job.request.adapters, job.owner)
            self._admit(job, lease, active, free)
        return True

    def _admit(self, job: Job, lease: Lease, active: Active, free: SequencePool) -> None:
        try:
            generation = Generation(
                self.model, job.request, lease.sequence, job.is_cancelled, job.emit, lease.reusable
            )
        except NativeError as error:  # for example a grammar llama.cpp refuses
            self.model.forget(lease.sequence)
            free.release(lease.sequence, Held())
            self._report(job, error)
            return
        active[generation] = job
        if job.timings is not None:
            self._traced += 1
            job.timings.admitted_ns = time.time_ns()
            job.timings.cached_tokens = generation.cached

    def _sweep(self, active: Active, blocked_since: dict[Generation, float]) -> None:
        """Finish cancelled generations, and those whose reader stalled,
        without waiting for their turn to step."""
        now = time.monotonic()
        for generation, job in active.items():
            if generation.finish is not None:
                continue
            if job.is_cancelled():
                generation.cancel()
            elif not job.blocked():
                blocked_since.pop(generation, None)
            elif now - blocked_since.setdefault(generation, now) >= self.stall_seconds:
                job.stalled = True
                generation.cancel()
        for generation in [g for g in blocked_since if g not in active or g.finish is not None]:
            del blocked_since[generation]

    def _idle_seconds(self, blocked_since: dict[Generation, float]) -> float:
        """How long to sleep while every running stream waits for its
        reader: until the first of them would stall."""
        if not blocked_since:
            return _MAX_IDLE_SECONDS
        first = min(blocked_since.values()) + self.stall_seconds - time.monotonic()
        return min(max(first, 0.001), _MAX_IDLE_SECONDS)

    def _activate(self, wanted: AdapterSet, active: Active) -> NativeError | None:
        """Make ``wanted`` the active adapter set, keeping every adapter a
        running generation uses loaded; the failure, if any."""
        try:
            if self.adapters is None:
                if wanted:
                    raise NativeError("this engine has no adapter cache")
                return None
            in_use = frozenset(ref.path for g in active for ref in g.request.adapters)
            self.adapters.activate(wanted, in_use=in_use)
        except (NativeError, OSError) as error:
            return NativeError(str(error))
        return None

    def _retire(
        self,
        generations: list[Generation],
        active: Active,
        free: SequencePool,
        turns: Turns[Generation],
        error: BaseException | None,
    ) -> None:
        """Report each finished one of ``generations`` and free its sequence."""
        for generation in [g for g in generations if g.finish is not None]:
            job = active.pop(generation)
            result = job.spent = generation.result()
            if job.timings is not None:
                self._traced -= 1
                job.timings.finished_ns = time.time_ns()
                job.timings.generated = result.completion_tokens
                job.timings.finish_reason = result.finish_reason
            if error is None:
                held = Held(generation.held(), generation.request.adapters, job.owner)
                free.release(generation.sequence, held)
            else:  # what the failed decode left in the cache is unknown
                self.model.forget(generation.sequence)
                free.release(generation.sequence, Held())
            owner_done = all(other.owner != job.owner for other in active.values())
            turns.leave(generation, job.owner, owner_done)
            outcome: Outcome = error or generation.error or result
            if job.stalled:
                outcome = ClientTooSlowError(
                    f"the stream's output was left unread for {self.stall_seconds:g} s"
                )
            self._report(job, outcome)

    def _stop_all(self, active: Active) -> None:
        for generation, job in active.items():
            generation.cancel()
            job.spent = generation.result()
            self._report(job, EngineClosedError("the engine is shutting down"))


def _time_adapters(jobs: list[Job], started_ns: int) -> None:
    """The first switch to a traced job's adapter set (loads from disk if
    they were not cached): its adapter-load phase."""
    for job in jobs:
        timings = job.timings
        if timings is None or timings.adapters_started_ns or not job.request.adapters:
            continue
        timings.adapters = tuple(ref.name for ref in job.request.adapters)
        timings.adapters_started_ns = started_ns
        timings.adapters_ended_ns = time.time_ns()


def _time_steps(batch: list[Generation], active: Active) -> None:
    """After a decode step: the first token of each traced job, and how many
    it has (read if the client leaves before the end)."""
    for generation in batch:
        timings = active[generation].timings
        if timings is None:
            continue
        timings.generated = generation.generated
        if not timings.first_token_ns and (generation.generated or generation.finish):
            timings.first_token_ns = time.time_ns()
