"""The answers of the OpenAI endpoints, as plain ASGI applications.

A route handler may return any ASGI application; Litestar then sends it as it
is. The two below send exactly what a Litestar ``Response`` (JSON) and
``Stream`` (server-sent events) sent before (same status line, headers and
bytes), without the per-response work those do for features these endpoints
never use (cookies, HEAD, background tasks, type encoders, media type
negotiation), and without the task group Litestar's ``Stream`` starts to
notice a disconnect: one watcher task does that, and the first event goes out
in the same task as the response's start, with no task switch in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from litestar.types import Receive, Scope, Send

from gateway.hang_up import HANG_UP, HangUpWatch

Headers = list[tuple[bytes, bytes]]
_JSON = (b"content-type", b"application/json")
SSE_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
]


class HangUp:
    """While open, cancels the task that opened it as soon as the client
    disconnects: told by the connection (:mod:`gateway.hang_up`) when the
    server is the gateway's own, else by a watcher task that waits for
    ``http.disconnect``.

    After a ``CancelledError``, :meth:`absorb` tells whether the hang-up caused
    it (and then takes the cancellation back), so other cancellations still
    propagate."""

    __slots__ = ("_task", "_watch", "_watcher", "hung_up_seen")

    def __init__(self, receive: Receive, scope: Scope | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.hung_up_seen = False
        self._watcher: asyncio.Task[None] | None = None
        extensions = scope.get("extensions") if scope is not None else None
        ours = extensions.get(HANG_UP) if extensions else None
        watch = ours.get(HANG_UP) if ours else None
        self._watch: HangUpWatch | None = watch if isinstance(watch, HangUpWatch) else None
        if self._watch is not None:
            self._watch.listen(self)
        else:
            self._watcher = asyncio.get_running_loop().create_task(self._wait(receive))

    async def _wait(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hung_up()

    def hung_up(self) -> None:
        self.hung_up_seen = True
        self._task.cancel()

    def absorb(self) -> bool:
        if not self.hung_up_seen:
            return False
        self._task.uncancel()
        return True

    def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.forget(self)
        # Dropped, not only cancelled: the cancelled task keeps its
        # CancelledError, whose traceback holds the watcher's frame, which
        # holds this object; with this reference too, every request would
        # leave a cycle (the task, the server's request cycle, its scope...)
        # for the garbage collector to find.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()


class JsonAnswer:
    """A JSON body, sent in one piece with its length."""

    __slots__ = ("_body", "_headers", "_status")

    def __init__(self, body: bytes, status: int = 200, headers: Headers | None = None) -> None:
        self._body = body
        self._status = status
        self._headers = [_JSON, (b"content-length", b"%d" % len(body)), *(headers or ())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self._status, "headers": self._headers}
        )
        await send({"type": "http.response.body", "body": self._body, "more_body": False})


class EventStream:
    """Server-sent events, each sent as soon as it is produced. A client that
    disconnects cancels the production (so the generation stops upstream);
    the events' iterator is closed when the response ends, however it ends."""

    __slots__ = ("_events", "_headers")

    def __init__(self, events: AsyncIterator[bytes], headers: Headers | None = None) -> None:
        self._events = events
        self._headers = [*SSE_HEADERS, *(headers or ())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self._events
        hang_up: HangUp | None = None
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        try:
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if hang_up is None:
                    # Watched from the first event on (it was ready before the
                    # response started): the watcher is not in its way.
                    hang_up = HangUp(receive, scope)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if hang_up is None or not hang_up.absorb():
                raise
        finally:
            if hang_up is not None:
                hang_up.close()
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
