"""Runs generations on a worker thread, from a bounded, fair queue.

Fair: waiting jobs are grouped by owner (the API key), and owners take turns,
so one client with many queued requests cannot starve another. Bounded: a
request is refused at once with :class:`EngineBusyError` (the gateway answers
503 with ``Retry-After``) when its generations would leave more than
``max_waiting`` waiting for a sequence, and with :class:`KeyBusyError` when
its owner would hold more than ``max_per_key`` generations, waiting and
running together (so one key cannot fill the queue; owner ``""``, a gateway
without API keys, has no share to keep).

All or nothing: the generations of one request (its ``n`` choices, its
prompts) are queued together or refused together, and once queued, a
failure or cancellation of any one of them cancels the others at once.

A cancelled job that is still queued leaves the queue at once, freeing its
place; if it is running, the worker thread sees the flag before its next
token. A stream whose reader leaves ``stream_buffer`` deltas unread stops
decoding until the reader catches up (:mod:`gateway.engine.mailbox`); if it
stays blocked for ``stall_seconds``, its generation is stopped and the stream
fails with :class:`ClientTooSlowError`, so a reader that stops reading cannot
hold a sequence forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.engine.adapters import AdapterCache
from gateway.engine.fair_queue import FairQueue
from gateway.engine.generation import GenerationRequest, GenerationResult
from gateway.engine.mailbox import GenerationStreams, Mailbox
from gateway.engine.native import NativeModel
from gateway.engine.timings import EngineTimings
from gateway.engine.worker import ClientTooSlowError, EngineClosedError, Outcome, Worker
from gateway.engine.worker import Job as _Job

__all__ = [
    "ClientTooSlowError",
    "EngineBusyError",
    "EngineClosedError",
    "KeyBusyError",
    "Scheduler",
    "TooManyGenerationsError",
]


class EngineBusyError(Exception):
    """The queue is full."""


class KeyBusyError(EngineBusyError):
    """The owner already holds its share of the engine (``max_per_key``)."""


class TooManyGenerationsError(Exception):
    """A request asks for more generations at once than this engine (or one
    owner's share of it) can ever hold: waiting would not help."""


class Spent(Protocol):
    """Hears what a request's generations spent, on the event loop."""

    def queued(self) -> None:
        """The generations are queued (not refused): :meth:`ended` will follow."""

    def ended(self, spent: list[GenerationResult | None]) -> None:
        """Every generation has ended: what each spent, in order (None:
        never ran)."""


class _Tally:
    """Collects what each of a request's jobs spent; tells ``done`` once all
    have ended."""

    __slots__ = ("_done", "_left", "_spent")

    def __init__(self, count: int, done: Spent) -> None:
        self._spent: list[GenerationResult | None] = [None] * count
        self._left = count
        self._done = done
        done.queued()

    def ender(self, index: int) -> Callable[[GenerationResult | None], None]:
        def end(spent: GenerationResult | None) -> None:
            self._spent[index] = spent
            self._left -= 1
            if not self._left:
                self._done.ended(self._spent)

        return end


def _ended(job: _Job) -> None:
    """On the event loop: ``job`` is over; tell its request's tally, once."""
    ended, job.ended = job.ended, None
    if ended is not None:
        ended(job.spent)


def _outcome(futures: Sequence[asyncio.Future[GenerationResult]]) -> BaseException | None:
    """The first failure among done futures (each one's exception retrieved,
    so none is reported as never retrieved)."""
    failure: BaseException | None = None
    for future in futures:
        if not future.done():
            continue
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        failure = failure or error
    return failure


class Scheduler:
    """Owns a :class:`NativeModel` and the only thread that touches it.

    Continuous batching: up to ``model.n_seq`` generations run at once, one
    token each per decode step (llama.cpp's batch API), and a new request
    joins at the next step instead of waiting for the others to finish. The
    event loop hands a job to the worker thread only when a sequence is free,
    so the order of admission is the fair queue's. Generations with different
    LoRA adapter sets take turns step by step (:mod:`gateway.engine.turns`).
    """

    def __init__(
        self,
        model: NativeModel,
        *,
        max_waiting: int,
        adapters: AdapterCache | None = None,
        reuse_prompts: bool = True,
        max_per_key: int = 0,
        stream_buffer: int = 256,
        stall_seconds: float = 30.0,
    ) -> None:
        """``reuse_prompts``: start a request on the sequence whose KV cache
        holds the longest prefix of its prompt (see :mod:`gateway.engine.sequences`).
        ``max_per_key``: generations one owner may hold, waiting and running
        (0: no limit). ``stream_buffer``: unread deltas per stream before its
        generation waits; ``stall_seconds``: how long it may wait."""
        self.model = model
        self.max_waiting = max_waiting
        self.max_per_key = max_per_key
        self.stream_buffer = stream_buffer
        self._queue: FairQueue[_Job] = FairQueue()
        self._held: Counter[str] = Counter()
        self._ready = asyncio.Event()
        self._free = asyncio.Semaphore(model.n_seq)
        self._thread = Worker(
            model,
            adapters=adapters,
            reuse_prompts=reuse_prompts,
            stall_seconds=stall_seconds,
            report=self._report,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[_Job] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._queue.size

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def busy_seconds(self) -> float:
        """Seconds the engine spent in batch steps since it started."""
        return self._thread.busy_seconds

    @property
    def capacity(self) -> int:
        """Generations this engine holds at most: running plus waiting."""
        return self.model.n_seq + self.max_waiting

    def held_by(self, owner: str) -> int:
        """Generations ``owner`` has waiting or running."""
        return self._held[owner]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        self._dispatcher = self._loop.create_task(self._dispatch(), name="llama-dispatch")

    async def run(self, request: GenerationRequest, owner: str) -> GenerationResult:
        """Generate and return the whole result. Cancelling the caller's task
        stops the generation."""
        return (await self.run_all([request], owner))[0]

    async def run_all(
        self,
        requests: Sequence[GenerationRequest],
        owner: str,
        timings: Sequence[EngineTimings] | None = None,
        charge: Callable[[float], None] | None = None,
        spent: Spent | None = None,
    ) -> list[GenerationResult]:
        """Queue every request now, all or none (raising at once if they do
        not fit), and return their results in order. If one fails, or the
        caller is cancelled, the others stop at once. ``timings`` (one per
        request, tracing on): filled in as the jobs go. ``charge``: told each
        step's seconds spent on them (on the worker thread). ``spent``: told
        what they spent once all have ended, even after the caller left."""
        jobs = self._submit(requests, owner, None, timings, charge, spent)
        futures = [job.future for job in jobs]
        try:
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            if not all(future.done() for future in futures):
                self._cancel_all(jobs)
        failure = _outcome(futures)
        if failure is not None:
            self._cancel_all(jobs)
            raise failure
        return [future.result() for future in futures]

    def open_streams(
        self,
        requests: Sequence[GenerationRequest],
        owner: str,
        timings: Sequence[EngineTimings] | None = None,
        charge: Callable[[float], None] | None = None,
        spent: Spent | None = None,
    ) -> GenerationStreams:
        """Queue every request now, all or none (raising at once if they do
        not fit), and return their merged stream of deltas, then results.
        ``spent``: as for :meth:`run_all` (a stream cut by its reader too)."""
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop, len(requests), limit=self.stream_buffer, on_drain=self._thread.wake)
        jobs = self._submit(requests, owner, mailbox, timings, charge, spent)
        return GenerationStreams(len(jobs), mailbox, functools.partial(self._cancel_all, jobs))

    def open_stream(self, request: GenerationRequest, owner: str) -> GenerationStreams:
        return self.open_streams([request], owner)

    # -------------------------------------------------------------- admission

    def _check_room(self, count: int, owner: str) -> None:
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        capped = bool(owner) and self.max_per_key > 0
        if count > self.capacity:
            raise TooManyGenerationsError(
                f"{count} generations at once; this engine holds at most {self.capacity}"
            )
        if capped and count > self.max_per_key:
            raise TooManyGenerationsError(
                f"{count} generations at once; one API key may hold at most {self.max_per_key}"
            )
        if capped and self._held[owner] + count > self.max_per_key:
            raise KeyBusyError(
                f"this API key already has {self._held[owner]} generations here "
                f"(at most {self.max_per_key} at once)"
            )
        # Queued jobs take the free sequences first; what is left waits.
        free = self.model.n_seq - len(self._running)
        if self._queue.size + count - free > self.max_waiting:
            raise EngineBusyError(f"{self._queue.size} requests are already waiting")

    def _submit(
        self,
        requests: Sequence[GenerationRequest],
        owner: str,
        mailbox: Mailbox | None,
        timings: Sequence[EngineTimings] | None = None,
        charge: Callable[[float], None] | None = None,
        spent: Spent | None = None,
    ) -> list[_Job]:
        self._check_room(len(requests), owner)
        loop = asyncio.get_running_loop()
        tally = None if spent is None else _Tally(len(requests), spent)
        jobs = []
        for index, request in enumerate(requests):
            job = _Job(request, owner, None, loop.create_future(), charge=charge)
            if tally is not None:
                job.ended = tally.ender(index)
            if mailbox is not None:
                job.emit = mailbox.sender(index)
                job.blocked = functools.partial(mailbox.full, index)
            if timings is not None:
                job.timings = timings[index]
                job.timings.queued_ns = time.time_ns()
                job.timings.prompt_tokens = len(request.prompt)
            jobs.append(job)
        for job in jobs:
            self._queue.push(job)
        self._held[owner] += len(jobs)
        self._ready.set()
        return jobs

    def _release(self, job: _Job) -> None:
        """``job`` no longer counts against its owner's share."""
        if job.released:
            return
        job.released = True
        self._held[job.owner] -= 1
        if self._held[job.owner] <= 0:
            del self._held[job.owner]

    def _cancel(self, job: _Job) -> None:
        """Stop ``job``: a queued job leaves the queue at once (freeing its
        place for others); a running one stops before its next token."""
        job.cancelled = True
        if self._queue.discard(job):
            self._release(job)
            job.future.cancel()
            _ended(job)
        elif job in self._running:
            # The worker may be idle (every stream waiting for its reader):
            # it stops the generation now, not at its next wake-up.
            self._thread.wake()

    def _cancel_all(self, jobs: Sequence[_Job]) -> None:
        for job in jobs:
            self._cancel(job)

    async def _dispatch(self) -> None:
        """Move jobs from the fair queue to the worker thread, one per free sequence."""
        while True:
            await self._free.acquire()
            # A loop, not an if: a job can be cancelled (and leave the queue)
            # between the wake-up and this check.
            while not self._queue.size:
                self._ready.clear()
                await self._ready.wait()
            job = self._queue.pop()
            if job.cancelled:
                self._release(job)
                job.future.cancel()
                _ended(job)
                self._free.release()
                continue
            self._running.add(job)
            self._thread.submit(job)

    def _finished(self, job: _Job, outcome: GenerationResult | BaseException) -> None:
        """On the event loop: a sequence is free again."""
        self._running.discard(job)
        self._release(job)
        self._free.release()
        _ended(job)
        self._settle(job, outcome)

    def _report(self, job: _Job, outcome: Outcome) -> None:
        """Any thread (the worker's): ``job`` ended."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._finished, job, outcome)

    @staticmethod
    def _settle(job: _Job, outcome: GenerationResult | BaseException) -> None:
        # Streams learn the outcome through their mailbox, after every delta
        # (the worker thread's emits were scheduled first); others via the future.
        if job.emit is not None:
            job.emit(outcome)
            return
        if job.future.done():
            return
        if job.cancelled:
            job.future.cancel()  # nobody waits for it any more
        elif isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    async def aclose(self) -> None:
        """Refuse new work, cancel what waits and what runs, free the model."""
        self._closed = True
        while self._queue.size:
            job = self._queue.pop()
            job.cancelled = True
            self._release(job)
            _ended(job)
            if job.emit is not None:
                job.emit(EngineClosedError("the engine is shutting down"))
            elif not job.future.done():
                job.future.set_exception(EngineClosedError("the engine is shutting down"))
        for job in self._running:
            job.cancelled = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        self._thread.stop()
        await asyncio.to_thread(self._thread.join)
        self.model.close()
