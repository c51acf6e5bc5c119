"""Server-sent events exactly as OpenAI frames them.

Each event is ``data: <json>`` and a blank line; a stream that ends well ends
with ``data: [DONE]``. A stream that fails after its first byte cannot change
its status any more: it sends ``data: {"error": {...}}`` and no ``[DONE]``, so
a client never mistakes a truncated answer for a complete one (the official
SDK raises ``APIError``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec

from gateway.errors import GatewayError, InternalError
from gateway.streams import closing
from gateway.wire import encoder

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_log = logging.getLogger(__name__)


def event(payload: msgspec.Struct) -> bytes:
    return b"data: " + encoder.encode(payload) + b"\n\n"


async def sse_events(chunks: AsyncIterator[msgspec.Struct | bytes]) -> AsyncIterator[bytes]:
    """The client's events: typed chunks encoded, bytes (events the cheap
    relay framed already, :mod:`gateway.relay`) as they are."""
    try:
        async with closing(chunks):
            async for chunk in chunks:
                yield chunk if isinstance(chunk, bytes) else event(chunk)
    except GatewayError as error:
        yield event(error.body())
        return
    except Exception:
        _log.exception("stream failed after its first byte")
        yield event(InternalError("The stream failed; the answer is incomplete.").body())
        return
    yield DONE
