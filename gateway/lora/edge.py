"""LoRA adapters on remote ``nomoat edge`` nodes.

An edge node cannot read the gateway's files. Either it reads the same
adapter root (a shared volume), and the gateway registers each adapter on it
through the node's authenticated admin API (``POST /admin/adapters`` with
the adapter's path below the root and its sha256, which the node checks);
or the gateway pushes the files (``push_adapters``: ``PUT
/admin/adapters/NAME/files``, checked by the node against the sha256, see
:mod:`gateway.lora.uploads`). Then it addresses the adapter as
``base:name@scale+...`` like any client would. Edge nodes run llama.cpp, so
stacks and scales work there.

Before each registration or upload the gateway hashes the adapter's files
again and compares them with the registered sha256 (an upload is checked on
the very bytes sent); the node checks them once more, and its llama.cpp
engine before every load.

Which adapters a node holds loaded is read from its ``/metrics``
(``nomoat_adapter_loaded``) by the backend's probe; which are registered is
read from ``GET /admin/adapters``, so a restarted node (which forgot the
registrations made at run time) gets them again on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from gateway import wire
from gateway.contract import Adapter, AdapterCounters, AdapterUse, Target
from gateway.errors import InvalidRequestError, UpstreamError
from gateway.lora.integrity import check_files, expect_sha256, source_of, unreadable
from gateway.lora.remote import AdapterTransport
from gateway.lora.sources import source_files
from gateway.lora.uploads import upload_body

_log = logging.getLogger(__name__)

# "1" from nodes before prometheus-client, "1.0" since.
_LOADED = re.compile(
    r'^nomoat_adapter_loaded\{[^}]*adapter="([^"]+)"[^}]*\} 1(?:\.0)?$', re.MULTILINE
)
_COUNTER = re.compile(
    r'^nomoat_adapter_(loads|evictions|load_seconds)_total\{[^}]*adapter="([^"]+)"[^}]*\} (\S+)$',
    re.MULTILINE,
)


class EdgeAdapters:
    """:class:`~gateway.lora.remote.RemoteAdapters` for one edge node: stacks
    and scales, sent as ``base:a@s+b@s``; the node keeps its own limit."""

    can_stack = True
    slots = None
    base_is_plain = True

    def __init__(
        self, backend: str, transport: AdapterTransport, admin_key: str | None, *, push: bool
    ) -> None:
        self._backend = backend
        self._push = push
        self._transport = transport
        self._root_url = transport.base_url.removesuffix("/v1")
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else None
        self._registered: dict[str, str] = {}  # name -> sha256
        self._registering: dict[str, asyncio.Task[None]] = {}
        self.loaded: frozenset[str] = frozenset()
        self.counters: dict[str, AdapterCounters] = {}

    def names(self) -> frozenset[str]:
        return self.loaded

    @contextlib.asynccontextmanager
    async def engine_model(self, target: Target) -> AsyncIterator[str]:
        # Nothing to hold: the node itself keeps an adapter in use loaded.
        if not target.adapters:
            yield target.engine_model
        else:
            yield await self.model_for(target.engine_model, target.adapters)

    async def model_for(self, engine_model: str, uses: tuple[AdapterUse, ...]) -> str:
        """Register what the node lacks; the ``model`` to send it."""
        for use in uses:
            await self._ensure(use.adapter, engine_model)
        stack = "+".join(f"{use.adapter.name}@{use.scale:g}" for use in uses)
        return f"{engine_model}:{stack}"

    async def forget(self, name: str) -> None:
        if self._registered.pop(name, None) is None:
            return
        status = await self._transport.delete(
            f"{self._root_url}/admin/adapters/{name}", self._headers
        )
        if status >= 500:
            raise UpstreamError(f"backend {self._backend} could not remove adapter {name}")

    async def observe(self, metrics: str) -> None:
        """The probe's findings: what the node holds, has done, has registered."""
        self.loaded = frozenset(_LOADED.findall(metrics))
        self.counters = _counters(metrics)
        status, content = await self._transport.get(
            f"{self._root_url}/admin/adapters", self._headers
        )
        if status != 200:
            return
        try:
            entries = msgspec.json.decode(content, type=wire.AdapterList).data
        except msgspec.DecodeError:
            _log.warning("%s: unreadable GET /admin/adapters", self._backend)
            return
        # What the node lost (it restarted) is registered again when next wanted.
        present = {entry.id: entry.sha256 for entry in entries}
        for name in list(self._registered):
            if present.get(name) != self._registered[name] and name not in self._registering:
                del self._registered[name]

    async def _ensure(self, adapter: Adapter, engine_model: str) -> None:
        if self._registered.get(adapter.name) == adapter.sha256:
            return
        task = self._registering.get(adapter.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._register(adapter, engine_model))
            self._registering[adapter.name] = task
            task.add_done_callback(lambda _: self._registering.pop(adapter.name, None))
        await asyncio.shield(task)

    async def _register(self, adapter: Adapter, engine_model: str) -> None:
        if self._push:
            await self._upload(adapter, engine_model)
        else:
            await self._register_shared(adapter, engine_model)
        self._registered[adapter.name] = adapter.sha256

    async def _upload(self, adapter: Adapter, engine_model: str) -> None:
        """Send the files, checked on the very bytes sent; the node checks
        their sha256 again and registers them."""
        try:
            body, config_length, actual = await asyncio.to_thread(
                _hashed_body, source_files(source_of(adapter))
            )
        except OSError as error:
            raise unreadable(adapter, self._backend, error) from None
        expect_sha256(adapter, self._backend, actual)
        headers = {
            **(self._headers or {}),
            "Content-Type": "application/octet-stream",
            "x-nomoat-base": engine_model,
            "x-nomoat-sha256": adapter.sha256,
            "x-nomoat-format": adapter.format,
            "x-nomoat-config-length": str(config_length),
        }
        url = f"{self._root_url}/admin/adapters/{adapter.name}/files"
        try:
            await self._transport.put(url, body, headers)
        except InvalidRequestError as error:
            if "already taken" not in error.message:
                raise self._refused(adapter, error) from None
            await self._transport.delete(
                f"{self._root_url}/admin/adapters/{adapter.name}", self._headers
            )
            await self._transport.put(url, body, headers)

    def _refused(self, adapter: Adapter, error: InvalidRequestError) -> UpstreamError:
        """The node's words go to the operator's log, never to the client."""
        _log.error("%s refused adapter %s: %s", self._backend, adapter.name, error.message)
        return UpstreamError(f"backend {self._backend} refused adapter {adapter.name}")

    async def _register_shared(self, adapter: Adapter, engine_model: str) -> None:
        """The node reads the same root: register the adapter's path there."""
        await check_files(adapter, self._backend)
        form = wire.AdapterRegistration(
            name=adapter.name, base=engine_model, path=adapter.relative_path, sha256=adapter.sha256
        )
        url = f"{self._root_url}/admin/adapters"
        body = wire.encoder.encode(form)
        try:
            await self._transport.post(url, body, self._headers)
        except InvalidRequestError as error:
            if "already taken" not in error.message:
                raise self._refused(adapter, error) from None
            # Registered before (perhaps another version): register this one.
            await self._transport.delete(f"{url}/{adapter.name}", self._headers)
            await self._transport.post(url, body, self._headers)


def _counters(metrics: str) -> dict[str, AdapterCounters]:
    counters: dict[str, AdapterCounters] = {}
    for kind, name, value in _COUNTER.findall(metrics):
        entry = counters.setdefault(name, AdapterCounters())
        if kind == "load_seconds":
            entry.load_seconds = float(value)
        else:
            setattr(entry, kind, int(float(value)))
    return counters


def _hashed_body(files: tuple[Path, ...]) -> tuple[bytes, int, str]:
    """Blocking. The upload body, its first file's length, and its sha256."""
    body, config_length = upload_body(list(files))
    return body, config_length, hashlib.sha256(body).hexdigest()
