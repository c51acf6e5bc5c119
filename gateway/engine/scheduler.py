"""Runs generations batched together on one worker thread, from a bounded, fair queue.

Continuous batching: up to ``parallel`` generations (the model's sequences) share
each decode step, and a new one joins at the next step instead of waiting for
the others to finish (see :class:`Scheduler`).

Fair: waiting jobs are grouped by owner (the API key), and owners take turns,
so one client with many queued requests cannot starve another. Bounded: once
``max_waiting`` jobs wait, new ones are refused at once with
:class:`EngineBusyError` (the gateway answers 503 with ``Retry-After``).

A cancelled job that is still queued leaves the queue at once, freeing its
place; if it is running, the next decode step sees the flag and spends no more
work on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.engine.adapters import AdapterCache, AdapterSet
from gateway.engine.generation import Delta, Generation, GenerationRequest, GenerationResult, step
from gateway.engine.native import NativeError, NativeModel
from gateway.engine.sequences import Held, Lease, SequencePool
from gateway.engine.timings import EngineTimings

StreamItem = Delta | GenerationResult | BaseException


class EngineBusyError(Exception):
    """The queue is full."""


class EngineClosedError(Exception):
    """The engine is shutting down."""


@dataclass(eq=False, slots=True)
class _Job:
    request: GenerationRequest
    owner: str
    emit: Callable[[StreamItem], None] | None
    future: asyncio.Future[GenerationResult]
    cancelled: bool = False
    # Filled in for the job's trace (tracing on only).
    timings: EngineTimings | None = None

    def is_cancelled(self) -> bool:
        return self.cancelled


@dataclass(slots=True)
class _FairQueue:
    by_owner: dict[str, deque[_Job]] = field(default_factory=dict)
    turns: deque[str] = field(default_factory=deque)
    size: int = 0

    def push(self, job: _Job) -> None:
        if job.owner not in self.by_owner:
            self.by_owner[job.owner] = deque()
            self.turns.append(job.owner)
        self.by_owner[job.owner].append(job)
        self.size += 1

    def pop(self) -> _Job:
        owner = self.turns.popleft()
        jobs = self.by_owner[owner]
        job = jobs.popleft()
        self.size -= 1
        if jobs:
            self.turns.append(owner)
        else:
            del self.by_owner[owner]
        return job

    def discard(self, job: _Job) -> bool:
        """Take ``job`` out of the queue; False if it was not queued."""
        jobs = self.by_owner.get(job.owner)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self.size -= 1
        if not jobs:
            del self.by_owner[job.owner]
            self.turns.remove(job.owner)
        return True


class _Mailbox:
    """Hands stream items from the worker thread to the event loop.

    One wake-up per batch, not per token: while the loop has not collected
    what is waiting, further items are just appended. When the loop keeps up,
    every token still travels alone; when it falls behind (on a machine whose
    cores llama.cpp keeps busy), it catches up in one step instead of paying
    a wake-up, a chunk and a write per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[StreamItem] = []
        self._wake_pending = False
        self._ready = asyncio.Event()

    def put(self, item: StreamItem) -> None:
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._ready.set)

    async def take_all(self) -> list[StreamItem]:
        await self._ready.wait()
        with self._lock:
            items, self._items = self._items, []
            self._wake_pending = False
            self._ready.clear()
        return items


def _merged(items: list[StreamItem]) -> list[StreamItem]:
    """Consecutive deltas as one: their text joined, their tokens listed."""
    merged: list[StreamItem] = []
    for item in items:
        last = merged[-1] if merged else None
        if isinstance(item, Delta) and isinstance(last, Delta):
            merged[-1] = Delta(last.text + item.text, [*last.tokens, *item.tokens])
        else:
            merged.append(item)
    return merged


class GenerationStream:
    """Deltas of one queued generation, then its :class:`GenerationResult`.

    Call :meth:`cancel` when the consumer goes away, even if it never started
    iterating: the generation then stops (or never starts).
    """

    def __init__(self, job: _Job, mailbox: _Mailbox, cancel: Callable[[_Job], None]) -> None:
        self._job = job
        self._mailbox = mailbox
        self._cancel = cancel

    def cancel(self) -> None:
        self._cancel(self._job)

    @property
    def timings(self) -> EngineTimings | None:
        return self._job.timings

    async def __aiter__(self) -> AsyncIterator[Delta | GenerationResult]:
        try:
            while True:
                for item in _merged(await self._mailbox.take_all()):
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, GenerationResult):
                        return
        finally:
            self.cancel()


class Scheduler:
    """Owns a :class:`NativeModel` and the only thread that touches it.

    Continuous batching: up to ``model.n_seq`` generations run at once, each
    on its own sequence of the KV cache. One decode step (llama.cpp's batch
    API, at most ``n_batch`` tokens) carries the next token of every running
    generation, or a slice of a new one's prompt, and a new request joins at
    the next step instead of waiting for the others to finish. The event loop
    hands a job to the worker thread only when a sequence is free, so the
    order of admission is the fair queue's.
    """

    def __init__(
        self,
        model: NativeModel,
        *,
        max_waiting: int,
        adapters: AdapterCache | None = None,
        reuse_prompts: bool = True,
    ) -> None:
        """``reuse_prompts``: start a request on the sequence whose KV cache
        holds the longest prefix of its prompt (see :mod:`gateway.engine.sequences`)."""
        self.model = model
        self.adapters = adapters
        self.reuse_prompts = reuse_prompts
        self.max_waiting = max_waiting
        self._queue = _FairQueue()
        self._ready = asyncio.Event()
        self._free = asyncio.Semaphore(model.n_seq)
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run_batches, name="llama", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: set[_Job] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._queue.size

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        self._worker = self._loop.create_task(self._dispatch(), name="llama-dispatch")

    async def run(
        self, request: GenerationRequest, owner: str, timings: EngineTimings | None = None
    ) -> GenerationResult:
        """Generate and return the whole result. Cancelling the caller's task
        stops the generation. ``timings``: filled in as the job goes."""
        job = self._submit(request, owner, emit=None, timings=timings)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def open_stream(
        self, request: GenerationRequest, owner: str, timings: EngineTimings | None = None
    ) -> GenerationStream:
        """Queue a generation now (raising :class:`EngineBusyError` at once if the
        queue is full) and return a stream of its deltas, then its result."""
        mailbox = _Mailbox(asyncio.get_running_loop())
        job = self._submit(request, owner, emit=mailbox.put, timings=timings)
        return GenerationStream(job, mailbox, self._cancel)

    def _cancel(self, job: _Job) -> None:
        """Stop ``job``: a queued job leaves the queue at once (freeing its
        place for others); one handed to the worker thread stops at its next
        decode step, before any more work is spent on it."""
        job.cancelled = True
        if self._queue.discard(job):
            job.future.cancel()

    def _submit(
        self,
        request: GenerationRequest,
        owner: str,
        emit: Callable[[StreamItem], None] | None,
        timings: EngineTimings | None = None,
    ) -> _Job:
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        if self._queue.size >= self.max_waiting:
            raise EngineBusyError(f"{self._queue.size} requests are already waiting")
        future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        job = _Job(request, owner, emit, future, timings=timings)
        if timings is not None:
            timings.queued_ns = time.time_ns()
            timings.prompt_tokens = len(request.prompt)
        self._queue.push(job)
        self._ready.set()
        return job

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
                job.future.cancel()
                self._free.release()
                continue
            self._running.add(job)
            self._inbox.put(job)

    def _finished(self, job: _Job, outcome: GenerationResult | BaseException) -> None:
        """On the event loop: a sequence is free again."""
        self._running.discard(job)
        self._free.release()
        self._settle(job, outcome)

    def _run_batches(self) -> None:
        """The worker thread: admit jobs into free sequences, step the batch.

        Jobs are admitted in the order the dispatcher hands them over (the
        fair queue's). One batch shares one set of LoRA adapters, so a job
        whose set differs from the running batch's waits (and holds back
        those behind it, to stay fair) until the batch drains; then the set
        is switched and it starts.
        """
        free = SequencePool(self.model.n_seq, reuse_prompts=self.reuse_prompts)
        active: dict[Generation, _Job] = {}
        pending: deque[_Job] = deque()
        current: AdapterSet = ()
        while True:
            while len(pending) < free.free:
                try:
                    job = self._inbox.get(block=not active and not pending)
                except queue.Empty:
                    break
                if job is None:
                    self._stop_all(active)
                    for waiting in pending:
                        self._report(waiting, EngineClosedError("the engine is shutting down"))
                    return
                pending.append(job)
            while pending and free.free:
                job = pending[0]
                wanted = job.request.adapters
                if wanted != current:
                    if active:
                        break
                    if not self._switch(job, wanted):
                        pending.popleft()
                        continue
                    current = wanted
                pending.popleft()
                self._admit(job, free.lease(job.request.prompt, wanted), active, free)
            if not active:
                continue
            try:
                step(self.model, list(active))
            except NativeError as error:
                for generation in active:
                    generation.cancel()
                self._retire(active, free, error, current)
                continue
            _time_steps(active)
            self._retire(active, free, None, current)

    def _switch(self, job: _Job, wanted: AdapterSet) -> bool:
        """Make ``wanted`` the active adapter set; on failure, fail ``job``."""
        timings = job.timings
        if timings is not None:
            timings.adapters = tuple(ref.name for ref in wanted)
            timings.adapters_started_ns = time.time_ns()
        try:
            if self.adapters is None:
                if wanted:
                    raise NativeError("this engine has no adapter cache")
                return True
            self.adapters.activate(wanted)
        except (NativeError, OSError) as error:
            self._report(job, NativeError(str(error)))
            return False
        finally:
            if timings is not None:
                timings.adapters_ended_ns = time.time_ns()
        return True

    def _admit(
        self, job: _Job, lease: Lease, active: dict[Generation, _Job], free: SequencePool
    ) -> None:
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
            job.timings.admitted_ns = time.time_ns()
            job.timings.cached_tokens = generation.cached

    def _retire(
        self,
        active: dict[Generation, _Job],
        free: SequencePool,
        error: BaseException | None,
        adapters: AdapterSet,
    ) -> None:
        for generation in [g for g in active if g.finish is not None]:
            job = active.pop(generation)
            result = generation.result()
            if job.timings is not None:
                job.timings.finished_ns = time.time_ns()
                job.timings.generated = result.completion_tokens
                job.timings.finish_reason = result.finish_reason
            if error is None:
                free.release(generation.sequence, Held(generation.held(), adapters))
            else:  # what the failed decode left in the cache is unknown
                self.model.forget(generation.sequence)
                free.release(generation.sequence, Held())
            self._report(job, error or result)

    def _stop_all(self, active: dict[Generation, _Job]) -> None:
        for generation, job in active.items():
            generation.cancel()
            generation.result()
            self._report(job, EngineClosedError("the engine is shutting down"))

    def _report(self, job: _Job, outcome: GenerationResult | BaseException) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._finished, job, outcome)

    @staticmethod
    def _settle(job: _Job, outcome: GenerationResult | BaseException) -> None:
        # Streams learn the outcome through their queue, after every delta
        # (the worker thread's emits were scheduled first); others via the future.
        if job.emit is not None:
            job.emit(outcome)
            return
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    async def aclose(self) -> None:
        """Refuse new work, cancel what waits and what runs, free the model."""
        self._closed = True
        while self._queue.size:
            job = self._queue.pop()
            job.cancelled = True
            self._settle(job, EngineClosedError("the engine is shutting down"))
        for job in self._running:
            job.cancelled = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._inbox.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)
        self.model.close()


def _time_steps(active: dict[Generation, _Job]) -> None:
    """After a decode step: the first token of each traced job, and how many
    it has (read if the client leaves before the end)."""
    for generation, job in active.items():
        timings = job.timings
        if timings is None:
            continue
        timings.generated = generation.generated
        if not timings.first_token_ns and (generation.generated or generation.finish):
            timings.first_token_ns = time.time_ns()
