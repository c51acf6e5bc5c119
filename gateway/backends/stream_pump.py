"""The relay's events sent to the client from the upstream connection's
``data_received`` (:meth:`gateway.backends.stream_client.StreamConnection.pump`):
no task is woken and no coroutine resumed per chunk (docs/benchmarks.md,
"Streaming at scale")."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, cast

from litestar.types import Send

from gateway.chunk_write import ChunkWriter

if TYPE_CHECKING:
    from gateway.backends.stream_client import StreamConnection


class Pump:
    """The relay's events sent to the client from the upstream connection's
    ``data_received``: the ASGI ``send`` coroutine is run there and, as
    uvicorn's ``send`` of a body does unless the client's socket is full,
    finishes without suspending. When it does suspend (flow control), the
    upstream is not read, a task finishes that send and the events queued
    meanwhile, and reading resumes. The end (the events still owed, or the
    failure) is told through :attr:`done`, after any send in progress; the
    events still owed at the end are written at once when the writer takes
    them, and only the response's end is left to the task.

    With the connection's :class:`~gateway.chunk_write.ChunkWriter` (under
    the gateway's own server), each read's events are written with it and
    ``send`` runs only when it declines (the client's socket is full)."""

    __slots__ = ("_connection", "_drain", "_ended", "_loop", "_send", "blocked", "done", "write")

    def __init__(
        self,
        connection: StreamConnection,
        send: Send,
        loop: asyncio.AbstractEventLoop,
        writer: ChunkWriter | None = None,
    ) -> None:
        self._connection = connection
        self._send = send
        # The writer's write, which the connection calls before push.
        self.write = writer.write if writer is not None else None
        self._loop = loop
        self.done: asyncio.Future[bytes] = loop.create_future()
        self.blocked = False
        self._drain: asyncio.Task[None] | None = None
        self._ended: tuple[BaseException | None] | None = None

    def push(self, events: bytes) -> None:
        write = self.write
        if write is not None and write(events):
            return
        sending = cast(
            Coroutine[Any, Any, None],
            self._send({"type": "http.response.body", "body": events, "more_body": True}),
        )
        try:
            awaited = sending.send(None)
        except StopIteration:
            return
        except BaseException as error:
            self._failed(error)
            return
        # The client's socket is full: finish this send in a task.
        self.blocked = True
        connection = self._connection
        connection.stop_pushing()
        self._drain = self._loop.create_task(self._drained(sending, awaited))

    async def _drained(self, sending: Coroutine[Any, Any, None], awaited: object) -> None:
        connection = self._connection
        try:
            await _resumed(sending, awaited)
            while connection.has_events():
                await self._send(
                    {
                        "type": "http.response.body",
                        "body": connection.take_events(),
                        "more_body": True,
                    }
                )
        except asyncio.CancelledError:
            return
        except BaseException as error:
            self._failed(error)
            return
        self.blocked = False
        connection.resume_pushing()
        if self._ended is not None:
            self.end(self._ended[0])

    def end(self, failure: BaseException | None) -> None:
        """The upstream's stream ended: tell the response (after a blocked send)."""
        if self.blocked:
            self._ended = (failure,)
            return
        if self.done.done():
            return
        connection = self._connection
        if failure is not None:
            self.done.set_exception(failure)
            connection.consumer_done(failed=True)
        else:
            owed = connection.take_events() if connection.has_events() else b""
            write = self.write
            if owed and write is not None and write(owed):
                # The last events ([DONE]) leave now, as every chunk did, not
                # once the relay's task runs: when a burst's streams end
                # together, each waited there behind the others' endings
                # (docs/benchmarks.md, "Streaming at scale", session 8).
                owed = b""
            self.done.set_result(owed)
            connection.consumer_done(failed=False)

    def _failed(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        self._connection.abandon()

    def cancel(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()


@types.coroutine
def _resumed(sending: Coroutine[Any, Any, None], awaited: object) -> Generator[Any, Any, None]:
    """Finish a coroutine that was run by hand and suspended on ``awaited``
    (a future): the task waits on it, then the coroutine goes on."""
    yield awaited
    yield from sending
