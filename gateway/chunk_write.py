"""A streamed response's chunks written to the connection without the ASGI
``send``.

A relayed stream sends one body message per upstream read. uvicorn's
``send`` for it is a coroutine run by hand (:mod:`gateway.backends.stream_pump`)
that builds the message dict, checks the cycle's state and frames the HTTP
chunk: about a fifth of what a relayed chunk costs the gateway
(docs/benchmarks.md, "Streaming at scale", session 7). The gateway's own HTTP
protocol (:class:`gateway.connections.GuardedProtocol`) puts a
:class:`ChunkWriter` in each request's scope
(``scope["extensions"][CHUNK_WRITE][CHUNK_WRITE]``) that writes one chunk of
a started, chunked response straight to the transport, when nothing else
stands in the way; otherwise it declines and the caller uses ``send``, which
does the rest as before (waits while the client's socket is full, writes
nothing once the client has gone, raises past the response's end). Under
another server the extension is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

from litestar.types import Scope

# The key of the writer in ``scope["extensions"]``.
CHUNK_WRITE = "nomoat.chunk_write"


class ChunkWriter(Protocol):
    def start(self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
        """Start a chunked response: its status line, ``headers`` and
        ``body`` as its first chunk, in one write; False if nothing was
        written and the start must go through ``send`` instead."""
        ...

    def write(self, body: bytes) -> bool:
        """Write ``body`` as one chunk of the response; False if it was
        not written and must go through ``send`` instead."""
        ...


def chunk_writer(scope: Scope) -> ChunkWriter | None:
    """The connection's writer for this request's response, if it has one."""
    extensions = scope.get("extensions")
    ours = extensions.get(CHUNK_WRITE) if extensions else None
    # (Only the gateway's protocol puts anything under this key.)
    return cast("ChunkWriter | None", ours.get(CHUNK_WRITE) if ours else None)
