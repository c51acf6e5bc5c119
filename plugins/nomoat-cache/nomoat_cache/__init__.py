"""nomoat-cache: answer repeated requests from memory.

A hook (``type = "cache"``) with three methods:

* ``on_request`` looks the request up; a hit answers at once (the backend is
  not called; a streamed request gets the answer as chunks, converted by the
  gateway). A miss of a non-streamed request is remembered by request id.
* ``on_response`` stores the answer of a remembered miss.
* ``on_error`` forgets a remembered miss that failed.

The key is the SHA-256 of: the API key's id (so answers are never shared
across keys), the endpoint (chat or completions), and the whole request body
in a canonical encoding (msgspec, object keys sorted) without ``stream``,
``stream_options`` and ``user``; so a streamed request hits the answer of the
same request made without streaming. The key is taken when the cache's
``on_request`` runs and kept for ``on_response``: hooks listed after the cache
that change the request (a classifier choosing the model) do not split it.

A hit is a fresh copy (decoded from the stored bytes, so no later hook can
change the stored answer) with the id and ``created`` of the request being
answered: ids stay unique per response, as clients and logs expect; ``usage``
is the original one (the tokens the answer is made of). Streamed answers are
not stored (a stream hook would have to buffer them); their requests are only
answered from what non-streamed ones stored.

By default only deterministic requests are cached: ``temperature = 0`` or a
``seed``. A sampled answer replayed would hide the sampling the client asked for.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from gateway.contract import (
    AnyRequest,
    AnyResponse,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    GatewayError,
    HookType,
    PluginManifest,
    RequestContext,
)

__all__ = ["CacheConfig", "ResponseCache", "cache_key", "manifest"]

_log = logging.getLogger(__name__)
# Misses waiting for their answer; a client that hangs up leaves one behind,
# so the oldest are dropped past this many.
MAX_PENDING = 4096
_canonical = msgspec.json.Encoder(order="deterministic")


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Seconds an answer is served from the cache after it was stored.
    ttl_seconds: Annotated[float, Field(gt=0)] = 300.0
    # Most answers kept; past it, the least recently used is dropped.
    max_entries: Annotated[int, Field(ge=1)] = 1024
    # Cache only requests whose answer is reproducible (temperature 0, or a
    # seed). False: every request, so sampled answers are replayed too.
    deterministic_only: bool = True


def cache_key(request: AnyRequest, api_key_id: str | None) -> bytes:
    """The request's identity: key id, endpoint and canonical body."""
    endpoint = "chat" if isinstance(request, ChatCompletionRequest) else "completions"
    body = msgspec.structs.replace(request, stream=None, stream_options=None, user=None)
    return hashlib.sha256(_canonical.encode([api_key_id, endpoint, body])).digest()


def is_deterministic(request: AnyRequest) -> bool:
    return request.temperature == 0 or request.seed is not None


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    kind: type[ChatCompletion] | type[Completion]
    body: bytes


class ResponseCache:
    """An LRU map from :func:`cache_key` to encoded answers, with a TTL."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._pending: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse:
        if self.config.deterministic_only and not is_deterministic(request):
            return request
        key = cache_key(request, ctx.api_key_id)
        entry = self._lookup(key)
        if entry is not None:
            self.hits += 1
            _log.debug("cache hit for %s", ctx.request_id)
            return _fresh_copy(entry, ctx)
        self.misses += 1
        if not request.stream:
            self._pending[ctx.request_id] = key
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return request

    async def on_response(
        self, request: AnyRequest, response: AnyResponse, ctx: RequestContext
    ) -> AnyResponse:
        key = self._pending.pop(ctx.request_id, None)
        if key is not None:
            self._store(key, response)
        return response

    async def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext
    ) -> None:
        self._pending.pop(ctx.request_id, None)

    def _lookup(self, key: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _store(self, key: bytes, response: AnyResponse) -> None:
        expires = self._clock() + self.config.ttl_seconds
        self._entries[key] = _Entry(expires, type(response), msgspec.json.encode(response))
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)


def _fresh_copy(entry: _Entry, ctx: RequestContext) -> AnyResponse:
    answer = msgspec.json.decode(entry.body, type=entry.kind)
    answer.id = ctx.request_id
    answer.created = ctx.created
    return answer


def _factory(config: CacheConfig) -> ResponseCache:
    return ResponseCache(config)


# HookType is invariant in its config model, and the manifest maps names to
manifest = PluginManifest(
    name="cache",
    hooks={"cache": HookType(CacheConfig, _factory)},
)
