"""Runs generations one at a time on a worker thread, from a bounded, fair queue.

Fair: waiting jobs are grouped by owner (the API key), and owners take turns,
so one client with many queued requests cannot starve another. Bounded: once
``max_waiting`` jobs wait, new ones are refused at once with
:class:`EngineBusyError` (the gateway answers 503 with ``Retry-After``).

A cancelled job that is still queued leaves the queue at once, freeing its
place; if it is running, the generation loop sees the flag before its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway.engine.generation import Delta, GenerationRequest, GenerationResult, generate
from gateway.engine.native import NativeModel

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


class GenerationStream:
    """Deltas of one queued generation, then its :class:`GenerationResult`.

    Call :meth:`cancel` when the consumer goes away, even if it never started
    iterating: the generation then stops (or never starts).
    """

    def __init__(
        self, job: _Job, items: asyncio.Queue[StreamItem], cancel: Callable[[_Job], None]
    ) -> None:
        self._job = job
        self._items = items
        self._cancel = cancel

    def cancel(self) -> None:
        self._cancel(self._job)

    async def __aiter__(self) -> AsyncIterator[Delta | GenerationResult]:
        try:
            while True:
                item = await self._items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self.cancel()


class Scheduler:
    """Owns a :class:`NativeModel` and the only thread that touches it."""

    def __init__(self, model: NativeModel, *, max_waiting: int) -> None:
        self.model = model
        self.max_waiting = max_waiting
        self._queue = _FairQueue()
        self._ready = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._worker: asyncio.Task[None] | None = None
        self._running: _Job | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._queue.size

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="llama-worker")

    async def run(self, request: GenerationRequest, owner: str) -> GenerationResult:
        """Generate and return the whole result. Cancelling the caller's task
        stops the generation."""
        job = self._submit(request, owner, emit=None)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def open_stream(self, request: GenerationRequest, owner: str) -> GenerationStream:
        """Queue a generation now (raising :class:`EngineBusyError` at once if the
        queue is full) and return a stream of its deltas, then its result."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[StreamItem] = asyncio.Queue()

        def emit(item: StreamItem) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        return GenerationStream(self._submit(request, owner, emit=emit), items, self._cancel)

    def _cancel(self, job: _Job) -> None:
        """Stop ``job``: a queued job leaves the queue at once (freeing its
        place for others); a running one stops before its next token."""
        job.cancelled = True
        if self._queue.discard(job):
            job.future.cancel()

    def _submit(
        self,
        request: GenerationRequest,
        owner: str,
        emit: Callable[[StreamItem], None] | None,
    ) -> _Job:
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        if self._queue.size >= self.max_waiting:
            raise EngineBusyError(f"{self._queue.size} requests are already waiting")
        future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        job = _Job(request, owner, emit, future)
        self._queue.push(job)
        self._ready.set()
        return job

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A loop, not an if: a job can be cancelled (and leave the queue)
            # between the wake-up and this check.
            while not self._queue.size:
                self._ready.clear()
                await self._ready.wait()
            job = self._queue.pop()
            if job.cancelled:
                job.future.cancel()
                continue
            self._running = job
            try:
                result = await loop.run_in_executor(
                    self._executor, generate, self.model, job.request, job.is_cancelled, job.emit
                )
            except Exception as error:  # reported to the job's owner
                self._settle(job, error)
            else:
                self._settle(job, result)
            finally:
                self._running = None

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
        """Refuse new work, cancel what waits, let the running job stop, free the model."""
        self._closed = True
        while self._queue.size:
            job = self._queue.pop()
            job.cancelled = True
            self._settle(job, EngineClosedError("the engine is shutting down"))
        if self._running is not None:
            self._running.cancelled = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.get_running_loop().run_in_executor(self._executor, self.model.close)
        self._executor.shutdown(wait=True)
