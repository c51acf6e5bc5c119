"""An edge node keeps each request's usage a while for the gateway that sent it.

A gateway that cuts a stream (its client left) closes the connection to the
node, and nothing more comes back on it: no usage chunk. Yet the node's
engine knows exactly what the request spent (it stops the generation and
reports its prompt, cached and generated tokens, see
``RequestContext.usage_report``). So the gateway sends each request with a
key (header ``x-nomoat-usage-key``, its own request id), and after a cut
asks ``GET /nomoat/usage/KEY``: the node answers the request's usage once it
has it (waiting up to ``WAIT_SECONDS`` for the engine to stop the
generation), or 404 if it has none (the gateway then records its estimate).

The node keeps every keyed request's usage (``[accounting]
report_cut_usage``, set by ``nomoat edge``) for ``KEEP_SECONDS``, at most
``MAX_KEPT`` of them: one dictionary entry per request, no I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler

from gateway import wire
from gateway.auth import PrincipalAuthenticator
from gateway.errors import NotFoundError
from gateway.exchange import Exchange

USAGE_KEY_HEADER = "x-nomoat-usage-key"
USAGE_PATH = "/nomoat/usage"
KEEP_SECONDS = 60.0
MAX_KEPT = 10_000
# The longest a fetch waits for a request's usage: the node's engine stops a
# cancelled generation within a step, and the gateway waits 5 s in all
# (gateway/observer.py REPORT_WAIT_SECONDS).
WAIT_SECONDS = 3.0
# A key is the gateway's request id: bounded, printable.
MAX_KEY_CHARS = 200


class KeptUsage(msgspec.Struct):
    """``GET /nomoat/usage/KEY``'s answer."""

    usage: wire.Usage


class CutUsage:
    """The usage of the requests a gateway sent with a key, by key."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS, max_kept: int = MAX_KEPT) -> None:
        self.keep_seconds = keep_seconds
        self.max_kept = max_kept
        # Key -> (when kept, the usage; None: the engine could not tell).
        self._kept: OrderedDict[str, tuple[float, wire.Usage | None]] = OrderedDict()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def ended(self, exchange: Exchange, status: int, error: str | None) -> None:
        """The observer's hook: a request ended (its usage final, the
        engine's own for a cut stream)."""
        key = exchange.usage_key
        if key is None:
            return
        self.keep(key, exchange.usage)

    def keep(self, key: str, usage: wire.Usage | None) -> None:
        now = time.monotonic()
        self._kept[key] = (now, usage)
        self._kept.move_to_end(key)
        self._expire(now)
        for waiter in self._waiting.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _expire(self, now: float) -> None:
        kept = self._kept
        while kept:
            key, (at, _) = next(iter(kept.items()))
            if len(kept) <= self.max_kept and now - at < self.keep_seconds:
                return
            del kept[key]

    def known(self, key: str) -> bool:
        return key in self._kept

    async def usage(self, key: str, wait_seconds: float = WAIT_SECONDS) -> wire.Usage | None:
        """The usage kept under ``key``, waiting up to ``wait_seconds`` for it
        to come; None if none came or the engine could not tell."""
        if key not in self._kept:
            waiter = asyncio.get_running_loop().create_future()
            waiters = self._waiting.setdefault(key, [])
            waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, wait_seconds)
            except TimeoutError:
                return None
            finally:
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters and self._waiting.get(key) is waiters:
                    del self._waiting[key]
        kept = self._kept.get(key)
        return None if kept is None else kept[1]


def cut_usage_handlers(
    store: CutUsage | None, authenticate: PrincipalAuthenticator
) -> list[HTTPRouteHandler]:
    """``GET /nomoat/usage/{key}`` on a node that keeps usage (none otherwise);
    for the node's clients (its gateways' API keys)."""
    if store is None:
        return []

    @get(f"{USAGE_PATH}/{{key:str}}")
    async def kept_usage(request: Request[Any, Any, State], key: str) -> Response[bytes]:
        authenticate(request)
        if len(key) > MAX_KEY_CHARS:
            raise NotFoundError("No usage is kept under so long a key.", param="key")
        usage = await store.usage(key)
        if usage is None:
            raise NotFoundError(f"No usage is kept for {key!r}.", param="key")
        return Response(wire.encoder.encode(KeptUsage(usage)), media_type="application/json")

    return [kept_usage]
