"""Closing chunk iterators promptly.

When a client goes away, the server closes the outermost iterator of its
stream; each wrapper must close the one it wraps at once, so the close reaches
the backend (which then stops its generation) now rather than whenever the
garbage collector gets to it. ``contextlib.aclosing`` wants ``aclose``, which
``AsyncIterator`` does not promise: async generators have it, and any other
iterator has nothing to close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")


@asynccontextmanager
async def closing(chunks: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    try:
        yield chunks
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
