"""The gateway's listener accepts every waiting connection in a turn of the
event loop, not one a turn as libuv's own server does (gateway/listener.py).
Real sockets on loopback and uvloop's loop."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import ClassVar

import pytest
import uvloop

from gateway import listener as listener_module
from gateway.listener import Listener
from gateway.workers import listening_socket

pytestmark = pytest.mark.e2e


class Opened(asyncio.Protocol):
    """Counts its connections as the loop makes them."""

    made: ClassVar[list[Opened]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Opened.made.append(self)


@contextmanager
def clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections, complete (in the listener's queue) on return."""
    with ExitStack() as stack:
        made = []
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            made.append(sock)
        yield made


async def turns_until(done: int, limit: int) -> int:
    """Turns of the loop (one callback each) until ``done`` connections are made."""
    turns = 0
    while len(Opened.made) < done and turns < limit:
        await asyncio.sleep(0)
        turns += 1
    return turns


def test_a_queue_of_connections_is_accepted_in_a_few_turns() -> None:
    Opened.made = []
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    waiting = 600  # more than MAX_ACCEPTS: two turns of accepts

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        with clients(port, waiting):
            served = Listener(loop, sock, Opened)
            turns = await turns_until(waiting, 1_000)
            served.close()
            await served.wait_closed()
            for protocol in Opened.made:
                protocol.transport.close()
            return turns, served.accepted

    turns, accepted = uvloop.run(main())
    assert accepted == waiting
    assert len(Opened.made) == waiting
    # Accepted in ceil(600 / 256) = 3 turns, each connection's transport and
    # protocol made a turn or two later; libuv's server would take 600.
    assert turns <= 8, turns


def test_out_of_file_descriptors_pauses_then_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    Opened.made = []
    monkeypatch.setattr(listener_module, "RETRY_SECONDS", 0.05)
    failures = [OSError(errno.EMFILE, "Too many open files")]

    class Exhausted(socket.socket):
        """accept() fails once as a process out of descriptors sees it."""

        def accept(self) -> tuple[socket.socket, object]:
            if failures:
                raise failures.pop()
            return super().accept()

    bound = listening_socket("127.0.0.1", 0)
    port = bound.getsockname()[1]
    sock = Exhausted(bound.family, bound.type, fileno=bound.detach())

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        with clients(port, 3):
            served = Listener(loop, sock, Opened)
            await asyncio.sleep(0.01)
            during_pause = len(Opened.made)
            await asyncio.sleep(0.2)
            served.close()
            for protocol in Opened.made:
                protocol.transport.close()
            return during_pause, len(Opened.made)

    during_pause, after = uvloop.run(main())
    assert during_pause == 0, "paused: nothing accepted right after the failure"
    assert after == 3, "resumed: every waiting connection accepted"


def test_closed_it_accepts_nothing_more() -> None:
    Opened.made = []
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        served = Listener(loop, sock, Opened)
        served.close()
        served.close()  # twice is fine
        await served.wait_closed()

    uvloop.run(main())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_connection_that_cannot_be_opened_is_closed() -> None:
    Opened.made = []
    sock = listening_socket("127.0.0.1", 0)
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def main() -> None:
        served = Listener(asyncio.get_running_loop(), sock, Opened)
        served._open(datagram)  # not a stream: the loop refuses it
        served.close()

    uvloop.run(main())
    assert datagram.fileno() == -1, "closed"
    assert Opened.made == []
