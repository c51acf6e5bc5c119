"""A client's hang-up, heard from the connection instead of a task.

An ASGI application learns that its client left only by awaiting
``receive()`` until ``http.disconnect``: one watcher task per request for
that (two for a relayed stream: one while its first events are awaited, one
while it is sent), each created, woken and cancelled, is a measurable part of
a stream's set-up (docs/benchmarks.md, "Streaming at scale"). The gateway's
own HTTP protocol (:class:`gateway.connections.GuardedProtocol`) knows when
a connection is lost, so it puts a :class:`HangUpWatch` in each request's
scope (``scope["extensions"][HANG_UP][HANG_UP]``: ASGI extensions are
dicts) and tells it; who listens is called
back from ``connection_lost``, with no task and no ``receive()``. Under
another server (a test client) the extension is absent and
:class:`gateway.responses.HangUp` falls back to its watcher task.
"""

from __future__ import annotations

from typing import Protocol

# The key of the watch in ``scope["extensions"]``.
HANG_UP = "nomoat.hang_up"


class HangUpListener(Protocol):
    def hung_up(self) -> None: ...


class HangUpWatch:
    """One request's: its listeners hear once that the connection was lost
    before the response completed (a listener that comes later hears at
    once)."""

    __slots__ = ("_listeners", "gone")

    def __init__(self) -> None:
        self.gone = False
        # Listeners themselves (not bound methods): no reference cycle
        # through a method object, so nothing is left for the collector.
        self._listeners: list[HangUpListener] = []

    def listen(self, listener: HangUpListener) -> None:
        if self.gone:
            listener.hung_up()
        else:
            self._listeners.append(listener)

    def forget(self, listener: HangUpListener) -> None:
        listeners = self._listeners
        if listener in listeners:
            listeners.remove(listener)

    def lost(self) -> None:
        """The connection is gone, the response incomplete."""
        self.gone = True
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.hung_up()
