"""Streamed output on its way from the engine's worker thread to the event loop.

One :class:`Mailbox` serves all the generations of one request (its ``n``
choices, its prompts), each item tagged with the generation's index, so the
consumer reads them as one merged stream and every choice moves at once.

Bounded: each generation may have at most ``limit`` deltas waiting to be
read. Past that :meth:`Mailbox.full` is true and the worker thread stops
decoding that generation (it keeps its sequence and KV cache) until the
consumer catches up: a client that reads slowly slows its own generation
down instead of growing the gateway's memory. The worker is woken when the
consumer drains the box. How long a generation may stay blocked is the
scheduler's business (see :mod:`gateway.engine.scheduler`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from gateway.engine.generation import Delta, GenerationResult

StreamItem = Delta | GenerationResult | BaseException
Tagged = tuple[int, StreamItem]


class Mailbox:
    """Hands tagged stream items from the worker thread to the event loop.

    One wake-up per batch, not per token: while the loop has not collected
    what is waiting, further items are just appended. When the loop keeps up,
    every token still travels alone; when it falls behind (on a machine whose
    cores llama.cpp keeps busy), it catches up in one step instead of paying
    a wake-up, a chunk and a write per token.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        size: int,
        *,
        limit: int,
        on_drain: Callable[[], None] = lambda: None,
    ) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[Tagged] = []
        self._pending = [0] * size
        self._limit = limit
        self._on_drain = on_drain
        self._wake_pending = False
        self._ready = asyncio.Event()

    def put(self, index: int, item: StreamItem) -> None:
        """Any thread: one more item for generation ``index``."""
        with self._lock:
            self._items.append((index, item))
            if isinstance(item, Delta):
                self._pending[index] += 1
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._ready.set)

    def sender(self, index: int) -> Callable[[StreamItem], None]:
        def send(item: StreamItem) -> None:
            self.put(index, item)

        return send

    def full(self, index: int) -> bool:
        """Whether generation ``index`` has ``limit`` deltas unread (read by
        the worker thread without the lock: a stale answer only delays or
        advances a pause by one step)."""
        return self._pending[index] >= self._limit

    def pending(self, index: int) -> int:
        return self._pending[index]

    async def take_all(self) -> list[Tagged]:
        await self._ready.wait()
        with self._lock:
            items, self._items = self._items, []
            blocked = any(count >= self._limit for count in self._pending)
            self._pending = [0] * len(self._pending)
            self._wake_pending = False
            self._ready.clear()
        if blocked:
            self._on_drain()
        return items


def merged(items: list[Tagged]) -> list[Tagged]:
    """Consecutive deltas of one generation as one: their text joined, their
    tokens listed."""
    out: list[Tagged] = []
    for index, item in items:
        if out and isinstance(item, Delta):
            last_index, last = out[-1]
            if last_index == index and isinstance(last, Delta):
                out[-1] = (index, Delta(last.text + item.text, [*last.tokens, *item.tokens]))
                continue
        out.append((index, item))
    return out


class GenerationStreams:
    """The deltas of a request's queued generations, merged: ``(index, delta)``
    pairs, and for each generation finally ``(index, result)``.

    Call :meth:`cancel` when the consumer goes away, even if it never started
    iterating: every generation then stops (or never starts). Leaving the
    iteration early, or a failure of any one generation, cancels them all.
    """

    def __init__(self, count: int, mailbox: Mailbox, cancel: Callable[[], None]) -> None:
        self.count = count
        self._mailbox = mailbox
        self._cancel = cancel

    def cancel(self) -> None:
        self._cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta | GenerationResult]]:
        unfinished = self.count
        try:
            while unfinished:
                for index, item in merged(await self._mailbox.take_all()):
                    if isinstance(item, BaseException):
                        raise item
                    yield index, item
                    if isinstance(item, GenerationResult):
                        unfinished -= 1
        finally:
            self.cancel()
