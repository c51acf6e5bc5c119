"""A TCP proxy that injects faults between the gateway and an upstream
(issue 11, "Fault injection"), on loopback only.

It relays bytes both ways, untouched, until a request whose first bytes match
``Fault.match`` (by default ``POST /v1/chat/completions``) arrives on a
connection; that exchange then gets the fault in force (on one matching
exchange in ``every``, ``times`` times at most):

  delay      wait ``seconds`` before relaying the answer's first byte
  reset      reset the connection (RST) as soon as the request arrived:
             nothing of the answer is sent
  cut        relay the answer up to the cut, then close the connection (FIN)
  reset-mid  relay the answer up to the cut, then reset the connection (RST)
  stall      relay the answer up to the cut, then relay nothing more, holding
             the connection open until the other side closes it

The cut falls ``offset`` bytes into the ``skip + 1``-th occurrence of
``marker`` in the answer's bytes (HTTP framing included): with the default
marker ``b"data: "``, ``skip=3, offset=8`` cuts inside the fourth
server-sent event's JSON, i.e. in the middle of an event, after three whole
ones; ``skip=0`` cuts inside the first, before the gateway has anything to
send its client. An answer that ends before the cut passes whole.

Requests that do not match (health probes, metric scrapes) pass untouched,
even on the same pooled connection: aiohttp never pipelines, so a new
request on a connection means the previous answer has ended.

Used by tests/test_faults.py in a thread of the test process
(:meth:`FaultProxy.running`); by hand:

    .venv/bin/python loadtests/fault_proxy.py --port 9100 --upstream 8100 \\
        --kind cut --skip 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

Kind = Literal["pass", "delay", "reset", "cut", "reset-mid", "stall"]
LOOPBACK = "127.0.0.1"
_READ = 65536


@dataclass(frozen=True)
class Fault:
    """What to do to matching exchanges (the module's docstring has the kinds)."""

    kind: Kind = "pass"
    # Exchanges to hurt (then the proxy passes everything); None: no end.
    times: int | None = None
    # Hurt one matching exchange in this many, counted since the proxy started.
    every: int = 1
    # "delay": before the answer's first byte.
    seconds: float = 0.0
    # "cut", "reset-mid", "stall": where (offset bytes into the skip+1-th marker).
    marker: bytes = b"data: "
    skip: int = 0
    offset: int = 8
    match: bytes = b"POST /v1/chat/completions "


@dataclass
class Counters:
    """What the proxy saw and did, for the tests' assertions: ``injected``
    counts faults that took effect (a cut the answer never reached is not
    one)."""

    connections: int = 0
    matched: int = 0
    injected: dict[str, int] = field(default_factory=dict)

    def hurt(self, kind: Kind) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1


class _Exchange:
    """The fault of the exchange in progress on one connection, and where its
    answer is (bytes seen, for finding the cut)."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.seen = bytearray()
        self.started = False
        self.done = False

    def cut_at(self) -> int | None:
        """Where in the answer's bytes the cut falls, once they reach it."""
        position = -1
        for _ in range(self.fault.skip + 1):
            position = self.seen.find(self.fault.marker, position + 1)
            if position < 0:
                return None
        cut = position + self.fault.offset
        return cut if cut <= len(self.seen) else None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER on, zero seconds."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Listens on ``LOOPBACK:port`` and relays to ``LOOPBACK:upstream_port``."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.fault = Fault()
        self.counters = Counters()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def inject(self, fault: Fault) -> None:
        """From now on (any thread): new matching exchanges get ``fault``."""
        self.fault = fault

    def _arm(self) -> Fault:
        """The fault for a new matching exchange (``pass`` when none is due)."""
        self.counters.matched += 1
        fault = self.fault
        if fault.kind == "pass" or (self.counters.matched - 1) % fault.every:
            return Fault()
        if fault.times is not None:
            if fault.times <= 0:
                return Fault()
            self.fault = dataclasses.replace(fault, times=fault.times - 1)
        return fault

    # ------------------------------------------------------------ serving

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self.counters.connections += 1
        try:
            upstream_r, upstream_w = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        except OSError:
            _reset(client_w)
            return
        self._writers.update((client_w, upstream_w))
        exchange: list[_Exchange | None] = [None]
        requests = asyncio.ensure_future(self._requests(client_r, upstream_w, client_w, exchange))
        answers = asyncio.ensure_future(self._answers(upstream_r, client_w, exchange))
        try:
            await asyncio.wait((requests, answers), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (requests, answers):
                task.cancel()
            await asyncio.gather(requests, answers, return_exceptions=True)
            for writer in (client_w, upstream_w):
                self._writers.discard(writer)
                if not writer.transport.is_closing():
                    writer.close()

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        exchange: list[_Exchange | None],
    ) -> None:
        """Client to upstream; each new request decides its exchange's fault."""
        while data := await reader.read(_READ):
            current = exchange[0]
            if current is None or current.started or current.done:
                # A new request (nothing is pipelined): a new exchange.
                fault = Fault()
                if data.startswith(self.fault.match):
                    fault = self._arm()
                current = exchange[0] = _Exchange(fault)
                if fault.kind == "reset":
                    self.counters.hurt("reset")
                    _reset(client)
                    return
            upstream.write(data)
            await upstream.drain()

    async def _answers(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        exchange: list[_Exchange | None],
    ) -> None:
        """Upstream to client, with the exchange's fault applied."""
        while data := await reader.read(_READ):
            current = exchange[0]
            if current is not None and not current.started:
                current.started = True
                if current.fault.kind == "delay":
                    self.counters.hurt("delay")
                    await asyncio.sleep(current.fault.seconds)
            if current is None or current.done or current.fault.kind in ("pass", "delay"):
                client.write(data)
                await client.drain()
                continue
            before = len(current.seen)
            current.seen += data
            cut = current.cut_at()
            client.write(data if cut is None else data[: max(cut - before, 0)])
            await client.drain()
            if cut is not None:
                current.done = True
                self.counters.hurt(current.fault.kind)
                await _end(current.fault.kind, client)
                return

    # --------------------------------------------------------- in a thread

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        """Serve from a thread of this process until the block ends."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=serve, name="fault-proxy", daemon=True)
        thread.start()
        if not ready.wait(timeout=10):
            raise RuntimeError("the fault proxy did not start")
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


async def _end(kind: Kind, client: asyncio.StreamWriter) -> None:
    """The cut: the answer ends here, one way or another."""
    if kind == "reset-mid":
        _reset(client)
    elif kind == "stall":
        # Relay nothing more, and hold the connection open: the client's side
        # of the relay ends it when the gateway gives up and closes.
        await asyncio.Event().wait()
    else:
        client.close()


async def _serve_forever(proxy: FaultProxy) -> None:
    await proxy.start()
    print(f"fault proxy on {LOOPBACK}:{proxy.port} -> {proxy.upstream_port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True, help="the upstream's port")
    parser.add_argument("--kind", default="pass", choices=get_args(Kind))
    parser.add_argument("--times", type=int, default=None)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--offset", type=int, default=8)
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, args.port)
    proxy.inject(
        Fault(args.kind, args.times, args.every, args.seconds, skip=args.skip, offset=args.offset)
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(proxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
