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
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class _Closing(Generic[T]):
    # A class, not @asynccontextmanager: every stream passes through several
    # of these, and a generator-based context manager costs more per use.
    __slots__ = ("_chunks",)

    def __init__(self, chunks: AsyncIterator[T]) -> None:
        self._chunks = chunks

    async def __aenter__(self) -> AsyncIterator[T]:
        return self._chunks

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()


def closing(chunks: AsyncIterator[T]) -> _Closing[T]:
    """``async with closing(chunks):`` closes ``chunks`` when the block ends,
    however it ends."""
    return _Closing(chunks)
