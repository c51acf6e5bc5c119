"""Adapters held by an engine behind HTTP (vLLM, ``nomoat edge`` nodes): the
one interface the OpenAI-compatible backend holds them through.

The backend neither knows nor asks which kind of engine holds its adapters:
it routes with :meth:`RemoteAdapters.names`, ``slots`` and ``can_stack``,
sends ``model`` as :meth:`RemoteAdapters.engine_model` says, and hands each
probe's ``/metrics`` to :meth:`RemoteAdapters.observe`. Managers reach their
engine through :class:`AdapterTransport`, which the backend's ``Upstream``
satisfies as it is; so this package never imports ``gateway.backends``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from gateway.contract import AdapterCounters, Target


class AdapterTransport(Protocol):
    """The HTTP calls an adapter manager makes to its engine.

    ``path`` is below ``base_url`` (the engine's ``/v1``) or an absolute URL.
    Every failure is a typed :class:`~gateway.errors.GatewayError`: ``post``
    and ``put`` raise :class:`~gateway.errors.InvalidRequestError`, carrying
    the engine's own message, for a 4xx it refused the call with (the
    managers read "already loaded" and "already taken" there), and
    :class:`~gateway.errors.UpstreamError` when the engine is unreachable or
    broken; ``get`` and ``delete`` return the status instead.
    """

    @property
    def base_url(self) -> str: ...

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> bytes: ...

    async def put(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> bytes: ...

    async def get(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]: ...

    async def delete(self, path: str, headers: Mapping[str, str] | None = None) -> int: ...


class RemoteAdapters(Protocol):
    """What an engine behind HTTP holds, and how to address it.

    Loads happen in :meth:`engine_model`, on demand: each adapter's registered
    files are hashed again first (see :mod:`gateway.lora.integrity`).
    Reading the attributes and :meth:`names` does no I/O (routing reads them).
    """

    @property
    def can_stack(self) -> bool:
        """Whether one request may apply several adapters, or a scale other than 1."""
        ...

    @property
    def slots(self) -> int | None:
        """How many adapters the engine holds at once; None: not known here."""
        ...

    @property
    def base_is_plain(self) -> bool:
        """Base-model requests go as the engine's own model name, untouched:
        the caller may skip :meth:`engine_model` for them."""
        ...

    @property
    def counters(self) -> Mapping[str, AdapterCounters]:
        """Loads, evictions and load time per adapter name."""
        ...

    def names(self) -> frozenset[str]:
        """The adapters held, or being loaded, now."""
        ...

    def engine_model(self, target: Target) -> AbstractAsyncContextManager[str]:
        """The ``model`` to send for ``target``, its adapters loaded first and
        held (never evicted) until the context exits.

        Raises :class:`~gateway.errors.InvalidRequestError` for what the
        engine cannot apply, :class:`~gateway.errors.InternalError` when an
        adapter's files no longer hash to its sha256, and
        :class:`~gateway.errors.UpstreamError` when the engine fails a load.
        """
        ...

    async def forget(self, name: str) -> None:
        """``name`` was removed from the registry: unload it; no error if absent."""
        ...

    async def observe(self, metrics: str) -> None:
        """A probe's findings (the engine's ``/metrics`` text): believe what
        the engine reports it holds, asking it for more where needed."""
        ...
