"""LoRA adapters on a llama.cpp context: loaded once, switched per batch.

llama.cpp applies adapters to a whole context, so every sequence decoded in
one decode step shares the active set; the scheduler steps requests with
different sets in turns, switching (``llama_set_adapters_lora``, about 20 µs)
between steps (see :mod:`gateway.engine.turns`). Loaded adapters stay in
memory for the next request that names them, up to a count and a byte
budget; past either, the adapter unused for longest (and neither active nor
used by a running generation) is freed.

Cached prompt state is never reused across adapter sets: an adapter changes
every layer's activations, so KV entries computed under one set are wrong
under another. The prompt cache (:mod:`gateway.engine.sequences`) keys what
each sequence holds by the whole set, scales and GGUF paths included; paths
are content-addressed, so an adapter registered again with other weights
never inherits its predecessor's KV.

The cache belongs to the engine's worker thread; the event loop only reads
:attr:`AdapterCache.loaded_names` and :attr:`AdapterCache.loaded_paths`
(immutable snapshots) and the counters, and asks for removals through
:meth:`AdapterCache.discard`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import AdapterCounters
from gateway.engine.native import AdapterHandle, NativeModel

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoraRef:
    """One adapter of a request: its name, its GGUF file here, its scale."""

    name: str
    path: Path
    scale: float = 1.0


AdapterSet = tuple[LoraRef, ...]


@dataclass(slots=True)
class _Loaded:
    name: str
    handle: AdapterHandle
    size: int


class AdapterCache:
    def __init__(self, model: NativeModel, *, max_adapters: int, max_bytes: int) -> None:
        self._model = model
        self._max_adapters = max_adapters
        self._max_bytes = max_bytes
        # By GGUF path (content-addressed: one sha256, one file), oldest first.
        self._loaded: OrderedDict[Path, _Loaded] = OrderedDict()
        self._active: tuple[tuple[Path, float], ...] = ()
        self._discarded: set[str] = set()
        self.loaded_names: frozenset[str] = frozenset()
        # The GGUF files loaded: a request for one of them needs no load, so
        # no check of its files (see gateway/lora/artifacts.py).
        self.loaded_paths: frozenset[Path] = frozenset()
        self.counters: dict[str, AdapterCounters] = {}

    def activate(self, refs: AdapterSet, in_use: frozenset[Path] = frozenset()) -> None:
        """Worker thread: make ``refs`` the context's active set, loading what
        is missing and evicting what is over budget, except what ``in_use``
        names (adapters of running generations whose turn comes later)."""
        wanted = tuple((ref.path, ref.scale) for ref in refs)
        keep = {ref.path for ref in refs} | in_use
        self._drop_discarded(keep=keep)
        if wanted == self._active:
            self._touch(refs)
            return
        for ref in refs:
            if ref.path not in self._loaded:
                self._load(ref)
        self._touch(refs)
        # Switch first: an adapter must not be active while it is freed.
        self._model.use_adapters([(self._loaded[path].handle, scale) for path, scale in wanted])
        self._active = wanted
        self._evict(keep=keep)
        self._publish()

    def discard(self, name: str) -> None:
        """Any thread: free ``name`` the next time it is not active."""
        self._discarded.add(name)

    def _load(self, ref: LoraRef) -> None:
        started = time.perf_counter()
        handle = self._model.load_adapter(ref.path)
        counters = self.counters.setdefault(ref.name, AdapterCounters())
        counters.loads += 1
        counters.load_seconds += time.perf_counter() - started
        self._loaded[ref.path] = _Loaded(ref.name, handle, ref.path.stat().st_size)

    def _touch(self, refs: AdapterSet) -> None:
        for ref in refs:
            self._loaded.move_to_end(ref.path)

    def _evict(self, keep: set[Path]) -> None:
        for path in list(self._loaded):
            if not self._over_budget():
                return
            if path not in keep:
                self._free(path)
        if self._over_budget():
            _log.warning("the active LoRA adapters alone exceed the adapter budget")

    def _over_budget(self) -> bool:
        used = sum(entry.size for entry in self._loaded.values())
        return len(self._loaded) > self._max_adapters or used > self._max_bytes

    def _drop_discarded(self, keep: set[Path]) -> None:
        if not self._discarded:
            return
        names, self._discarded = self._discarded, set()
        active = {path for path, _ in self._active}
        for path, entry in list(self._loaded.items()):
            if entry.name in names and path not in keep:
                if path in active:
                    self._model.use_adapters([])
                    self._active = ()
                    active = set()
                self._free(path)
        self._publish()

    def _free(self, path: Path) -> None:
        entry = self._loaded.pop(path)
        self._model.free_adapter(entry.handle)
        self.counters.setdefault(entry.name, AdapterCounters()).evictions += 1

    def _publish(self) -> None:
        self.loaded_names = frozenset(entry.name for entry in self._loaded.values())
        self.loaded_paths = frozenset(self._loaded)
