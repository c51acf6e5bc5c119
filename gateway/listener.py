"""The gateway's listening socket: every waiting connection accepted at once.

libuv (under uvloop) accepts one connection per turn of the event loop since
1.45 (libuv/libuv#3696: most servers find only one waiting). Under a burst
that is the bottleneck: each turn runs every stream's ready work, tens of
milliseconds with hundreds of streams, so the 500th connection of a burst
waited in the kernel's accept queue for 300 ms while the core was busy with
the others (docs/benchmarks.md, "Streaming at scale", session 8).
:class:`Listener` takes that job from uvicorn's server: when the socket is
readable it accepts up to ``MAX_ACCEPTS`` connections and gives each to the
event loop (``connect_accepted_socket``) there and then, so a connection
waits for at most one turn, as with asyncio's own loop (which accepts up to
its backlog a turn).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine

_log = logging.getLogger(__name__)

# At most this many connections a turn of the loop, so that one turn stays
# short whatever the queue holds; the rest are taken on the next turn (the
# socket stays readable).
MAX_ACCEPTS = 256
# Out of file descriptors or memory: stop accepting for this long (asyncio's
# ACCEPT_RETRY_DELAY), rather than spin on a socket that stays readable.
RETRY_SECONDS = 1.0
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """Serves ``sock`` (bound and listening) with protocols from ``protocol``.
    Has what uvicorn's shutdown asks of a server: ``close()`` and
    ``wait_closed()``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: Callable[[], asyncio.Protocol],
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._fd = sock.fileno()
        self._closed = False
        self.accepted = 0
        sock.setblocking(False)
        loop.add_reader(self._fd, self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (its address: the port bound, when 0 was asked)."""
        return (self._sock,)

    def _accept(self) -> None:
        for _ in range(MAX_ACCEPTS):
            try:
                connection, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited
            except OSError as error:
                if error.errno not in _EXHAUSTED:
                    raise
                self._pause(error)
                return
            self.accepted += 1
            self._open(connection)

    def _open(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        self._step(self._loop.connect_accepted_socket(self._protocol, connection), connection)

    def _step(self, opening: Coroutine[object, None, object], connection: socket.socket) -> None:
        """Runs ``connect_accepted_socket`` here, as a task's step would.

        Its coroutine makes the transport and the protocol at once (their
        ``connection_made`` comes later in this turn of the loop) and then
        only waits for that. A task would start it on the next turn: a turn
        more for every new connection, tens of milliseconds when the loop is
        busy (docs/benchmarks.md, "Streaming at scale", session 8)."""
        try:
            waiting = opening.send(None)
        except StopIteration:
            return
        except Exception as error:  # the coroutine closed the transport
            _log.debug("an accepted connection failed to open: %s", error)
            connection.close()
            return
        if isinstance(waiting, asyncio.Future):
            waiting.add_done_callback(lambda _: self._step(opening, connection))
        else:  # a bare yield: go on in the next turn
            self._loop.call_soon(self._step, opening, connection)

    def _pause(self, error: OSError) -> None:
        _log.error(
            "cannot accept connections (%s): pausing for %.0f s", error.strerror, RETRY_SECONDS
        )
        self._loop.remove_reader(self._fd)
        self._loop.call_later(RETRY_SECONDS, self._resume)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting (connections already open carry on)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._sock.close()

    async def wait_closed(self) -> None:
        """Nothing of its own to wait for: the connections are uvicorn's."""
