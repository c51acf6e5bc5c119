"""Stand-ins for the HTTP side of engines that hold adapters remotely (the
:class:`gateway.lora.remote.AdapterTransport` a manager talks through), for
the fast tests of the adapter managers: a vLLM replica's load/unload/models
endpoints and an edge node's admin API, answering as the real ones do (see
tests/test_lora_vllm.py and tests/test_lora_edge.py for the real ones)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gateway import wire
from gateway.contract import Adapter
from gateway.errors import InvalidRequestError
from gateway.lora.sources import locate, sha256_of


def peft_adapter(root: Path, name: str, base: str = "m") -> Adapter:
    """A registered PEFT adapter with real files under ``root`` (loads hash them)."""
    folder = root / "peft" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "name": name}))
    (folder / "adapter_model.safetensors").write_bytes(name.encode() * 64)
    source = locate(root, f"peft/{name}")
    return Adapter(name, base, sha256_of(source), "peft", source.path, source.relative_path)


def change(adapter: Adapter) -> None:
    """Rewrite the adapter's weights in place, as a training job might."""
    weights = adapter.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"retrained")


async def settle() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


class _Gate:
    """Calls wait here while ``closed``; opening lets them all through."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


class StubVllm:
    """vLLM's ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` and
    ``GET /v1/models``; it holds what it was told to load."""

    base_url = "http://vllm.test/v1"

    def __init__(self, model: str = "m") -> None:
        self.model = model
        self.held: dict[str, str] = {}  # name -> path
        self.calls: list[tuple[str, str]] = []
        self._called = asyncio.Condition()
        self.loads = _Gate()
        self.unloads = _Gate()

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        form = json.loads(body)
        name = form["lora_name"]
        async with self._called:
            self.calls.append((path, name))
            self._called.notify_all()
        if path == "/load_lora_adapter":
            await self.loads.wait()
            if name in self.held:
                raise InvalidRequestError(f"The lora adapter '{name}' has already been loaded.")
            self.held[name] = form["lora_path"]
            return b"Success"
        if path == "/unload_lora_adapter":
            await self.unloads.wait()
            if self.held.pop(name, None) is None:
                raise InvalidRequestError(f"The lora adapter '{name}' cannot be found.")
            return b"Success"
        raise AssertionError(f"vLLM has no POST {path}")

    async def put(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        raise AssertionError(f"vLLM has no PUT {path}")

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        assert path == "/models", path
        data = [{"id": self.model, "parent": None}]
        data += [{"id": name, "parent": self.model} for name in self.held]
        return 200, json.dumps({"object": "list", "data": data}).encode()

    async def delete(self, path: str, headers: Mapping[str, str] | None = None) -> int:
        raise AssertionError(f"vLLM has no DELETE {path}")

    async def called(self, path: str, name: str) -> None:
        """Wait for a call (loads hash files in a worker thread first)."""
        async with self._called:
            await self._called.wait_for(lambda: (path, name) in self.calls)

    def loaded(self, name: str) -> int:
        return self.calls.count(("/load_lora_adapter", name))

    def unloaded(self, name: str) -> int:
        return self.calls.count(("/unload_lora_adapter", name))

    def restart(self) -> None:
        """A restarted vLLM has forgotten every adapter."""
        self.held.clear()


class StubEdge:
    """An edge node's admin API: ``POST /admin/adapters`` (a path below the
    shared root), ``PUT /admin/adapters/NAME/files`` (pushed files),
    ``DELETE`` and ``GET /admin/adapters``; it checks sha256s as the node does."""

    base_url = "http://edge.test/v1"
    admin = "http://edge.test/admin/adapters"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.registered: dict[str, str] = {}  # name -> sha256
        self.calls: list[tuple[str, str]] = []
        self.bodies: dict[str, bytes] = {}
        self.headers: list[Mapping[str, str] | None] = []
        self.registrations = _Gate()

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        assert path == self.admin, path
        form = msgspec.json.decode(body, type=wire.AdapterRegistration)
        self.calls.append(("POST", form.name))
        self.headers.append(headers)
        await self.registrations.wait()
        actual = sha256_of(locate(self.root, form.path))
        if actual != form.sha256:
            raise InvalidRequestError(f"the files at {form.path!r} have sha256 {actual}")
        return self._register(form.name, form.sha256)

    async def put(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        name = path.removeprefix(f"{self.admin}/").removesuffix("/files")
        self.calls.append(("PUT", name))
        self.headers.append(headers)
        await self.registrations.wait()
        assert headers is not None
        sha256 = headers["x-nomoat-sha256"]
        if hashlib.sha256(body).hexdigest() != sha256:
            raise InvalidRequestError("adapter upload refused: the upload's sha256 differs")
        self.bodies[name] = body
        return self._register(name, sha256)

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        assert path == self.admin, path
        data = [
            {
                "id": name,
                "object": "adapter",
                "base": "m",
                "format": "peft",
                "path": "",
                "sha256": sha256,
                "loaded_on": [],
            }
            for name, sha256 in self.registered.items()
        ]
        return 200, json.dumps({"object": "list", "data": data, "stacks": []}).encode()

    async def delete(self, path: str, headers: Mapping[str, str] | None = None) -> int:
        name = path.removeprefix(f"{self.admin}/")
        self.calls.append(("DELETE", name))
        return 200 if self.registered.pop(name, None) else 404

    def _register(self, name: str, sha256: str) -> bytes:
        if name in self.registered:
            raise InvalidRequestError(f'the name "{name}" is already taken')
        self.registered[name] = sha256
        return b"{}"

    def registrations_of(self, name: str) -> int:
        return sum(1 for verb, who in self.calls if who == name and verb in ("POST", "PUT"))
