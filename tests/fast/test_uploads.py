"""Adapter uploads to the admin API (PUT /admin/adapters/NAME/files), as an
edge node receives them: streamed to disk with a size limit, a limit on
uploads at once, checked before they are kept, removed when refused, and
private to nomoat's user."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from gateway.app import Runtime, create_app
from gateway.catalog import plan
from gateway.errors import PayloadTooLargeError
from gateway.lora.uploads import UploadSpec, receive
from gateway.registry import Registry
from gateway.testing.inprocess import (
    BASE_URL,
    ASGIStreamTransport,
    lifespan,
    registry_with,
    settings_from_toml,
)

from .support import MODEL, error_of, pool

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------- adapters


def gguf_adapter(folder: Path, kind: str = "adapter") -> bytes:
    """A small GGUF LoRA adapter (``kind`` "model": a GGUF that is not one)."""
    path = folder / "made.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(kind)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((8, 512), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.unlink()
    return data


PEFT_CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode()


def peft_weights() -> bytes:
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    return save_safetensors({name: np.ones((4, 8), dtype=np.float32)})


def headers(body: bytes, kind: str = "gguf", config_length: int = 0) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "x-nomoat-base": MODEL,
        "x-nomoat-sha256": hashlib.sha256(body).hexdigest(),
        "x-nomoat-format": kind,
        "x-nomoat-config-length": str(config_length),
    }


def left_in(root: Path) -> list[str]:
    """Everything below the uploads folder, as relative paths."""
    uploads = root / "uploads"
    return (
        sorted(str(p.relative_to(uploads)) for p in uploads.rglob("*")) if uploads.exists() else []
    )


# ------------------------------------------------------------ the gateway


def node_config(root: Path, **limits: object) -> str:
    return pool("a", limits=limits or None) + f'\n[lora]\nroot = "{root}"\n'


class Node:
    """The app itself (to drive uploads message by message) and a client."""

    def __init__(self, app: Any, http: httpx.AsyncClient, runtime: Runtime) -> None:
        self.app = app
        self.http = http
        self.runtime = runtime

    async def put(self, name: str, body: bytes, sent: dict[str, str]) -> httpx.Response:
        return await self.http.put(f"/admin/adapters/{name}/files", content=body, headers=sent)

    def held(self, name: str, body: bytes, sent: dict[str, str]) -> HeldUpload:
        return HeldUpload(self.app, name, body, sent)


class HeldUpload:
    """An upload whose first chunk arrives at once and whose rest waits
    (or never comes: the client goes away)."""

    def __init__(self, app: Any, name: str, body: bytes, sent: dict[str, str]) -> None:
        self._app = app
        self._half = len(body) // 2
        self._body = body
        self._scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "PUT",
            "scheme": "http",
            "path": f"/admin/adapters/{name}/files",
            "raw_path": f"/admin/adapters/{name}/files".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in sent.items()],
            "client": ("127.0.0.1", 50001),
            "server": ("nomoat.test", 80),
            "extensions": {},
            "state": {},
        }
        self.first_read = asyncio.Event()
        self.rest = asyncio.Event()
        self.hang_up = False
        self.status: int | None = None
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        if not self.first_read.is_set():
            self.first_read.set()
            return {"type": "http.request", "body": self._body[: self._half], "more_body": True}
        await self.rest.wait()
        if self.hang_up:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": self._body[self._half :], "more_body": False}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]

    def start(self) -> None:
        coroutine = self._app(self._scope, self._receive, self._send)
        self.task = asyncio.get_running_loop().create_task(coroutine)

    async def finish(self, *, hang_up: bool = False) -> int | None:
        self.hang_up = hang_up
        self.rest.set()
        assert self.task is not None
        await self.task
        return self.status


@asynccontextmanager
async def node(registry: Registry, config_text: str) -> AsyncIterator[Node]:
    settings = settings_from_toml(config_text)
    runtime = Runtime(settings, plan(settings, registry_with((), registry)))
    app = create_app(runtime)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(lifespan(app))
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=ASGIStreamTransport(app), base_url=BASE_URL)
        )
        yield Node(app, http, runtime)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ tests


async def test_a_gguf_and_a_peft_upload_are_kept_private_whatever_the_umask(
    registry: Registry, tmp_path: Path
) -> None:
    adapter = gguf_adapter(tmp_path)
    peft = PEFT_CONFIG + peft_weights()
    with umask(0):
        async with node(registry, node_config(tmp_path)) as gw:
            kept = await gw.put("g", adapter, headers(adapter))
            assert kept.status_code == 201, kept.text
            assert kept.json()["format"] == "gguf"
            answer = await gw.put("p", peft, headers(peft, "peft", len(PEFT_CONFIG)))
            assert answer.status_code == 201, answer.text
    uploads = tmp_path / "uploads"
    folders = [uploads, *(p for p in uploads.rglob("*") if p.is_dir())]
    files = [p for p in uploads.rglob("*") if p.is_file()]
    assert len(files) == 3 and len(folders) == 3
    assert {mode(p) for p in files} == {0o600}
    assert {mode(p) for p in folders} == {0o700}
    peft_folder = uploads / hashlib.sha256(peft).hexdigest()
    assert (peft_folder / "adapter_config.json").read_bytes() == PEFT_CONFIG
    assert (peft_folder / "adapter_model.safetensors").read_bytes() == peft_weights()


@pytest.mark.parametrize(
    ("what", "make"),
    [
        ("bytes that are no GGUF", lambda folder: b"\x00" * 4096),
        ("a GGUF that is no adapter", lambda folder: gguf_adapter(folder, kind="model")),
        ("a truncated GGUF", lambda folder: gguf_adapter(folder)[:100]),
    ],
)
async def test_a_gguf_upload_that_is_no_lora_adapter_is_refused_and_removed(
    registry: Registry, tmp_path: Path, what: str, make: Any
) -> None:
    body: bytes = make(tmp_path)
    async with node(registry, node_config(tmp_path)) as gw:
        refused = await gw.put("bad", body, headers(body))
        error = error_of(refused, 400)
        assert "adapter upload refused" in error["message"], what
        listing = (await gw.http.get("/admin/adapters")).json()
    assert listing["data"] == []
    assert left_in(tmp_path) == []


@pytest.mark.parametrize(
    ("config", "weights", "expected"),
    [
        (b"{not json", peft_weights(), "not valid JSON"),
        (json.dumps({"peft_type": "IA3"}).encode(), peft_weights(), "not LORA"),
        (PEFT_CONFIG, b"\xff" * 64, "safetensors"),
        (PEFT_CONFIG, peft_weights()[:-8], "outside the file"),
    ],
)
async def test_a_peft_upload_that_is_no_lora_adapter_is_refused_and_removed(
    registry: Registry, tmp_path: Path, config: bytes, weights: bytes, expected: str
) -> None:
    body = config + weights
    async with node(registry, node_config(tmp_path)) as gw:
        refused = await gw.put("bad", body, headers(body, "peft", len(config)))
    assert expected in error_of(refused, 400)["message"]
    assert left_in(tmp_path) == []


async def test_bytes_that_do_not_match_the_sha256_leave_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    adapter = gguf_adapter(tmp_path)
    sent = {**headers(adapter), "x-nomoat-sha256": "0" * 64}
    async with node(registry, node_config(tmp_path)) as gw:
        refused = await gw.put("a1", adapter, sent)
    assert "sha256" in error_of(refused, 400)["message"]
    assert left_in(tmp_path) == []


async def test_an_upload_past_the_size_limit_is_a_413_and_leaves_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    adapter = gguf_adapter(tmp_path)
    async with node(registry, node_config(tmp_path, max_upload_bytes=len(adapter) - 1)) as gw:
        refused = await gw.put("big", adapter, headers(adapter))
        assert error_of(refused, 413)["code"] == "request_too_large"
        # Without Content-Length too: counted as it streams.
        held = gw.held("big", adapter, headers(adapter))
        held.start()
        await held.first_read.wait()
        assert await held.finish() == 413
        # At the limit exactly: kept.
    async with node(registry, node_config(tmp_path, max_upload_bytes=len(adapter))) as gw:
        assert (await gw.put("fits", adapter, headers(adapter))).status_code == 201
    assert left_in(tmp_path) == [
        hashlib.sha256(adapter).hexdigest(),
        f"{hashlib.sha256(adapter).hexdigest()}/adapter.gguf",
    ]


async def test_the_body_is_streamed_and_reading_stops_at_the_limit(tmp_path: Path) -> None:
    """Never read whole into memory: chunks go to disk as they come, and
    the first chunk past the limit ends the upload (nothing after it is read)."""
    adapter = gguf_adapter(tmp_path)
    spec = UploadSpec(hashlib.sha256(adapter).hexdigest(), "gguf")
    read: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(1000):
            read.append(index)
            yield b"\x00" * 1024

    with pytest.raises(PayloadTooLargeError):
        await receive(tmp_path, spec, chunks(), limit=10 * 1024)
    assert read == list(range(11))
    assert left_in(tmp_path) == []


async def test_uploads_past_the_concurrency_limit_get_503_with_retry_after(
    registry: Registry, tmp_path: Path
) -> None:
    first, second = gguf_adapter(tmp_path), PEFT_CONFIG + peft_weights()
    async with node(registry, node_config(tmp_path, max_concurrent_uploads=1)) as gw:
        held = gw.held("first", first, headers(first))
        held.start()
        await held.first_read.wait()
        busy = await gw.put("second", second, headers(second, "peft", len(PEFT_CONFIG)))
        error = error_of(busy, 503)
        assert busy.headers["retry-after"].isdigit()
        assert "uploads" in error["message"]
        assert await held.finish() == 201
        # The slot is free again.
        again = await gw.put("second", second, headers(second, "peft", len(PEFT_CONFIG)))
        assert again.status_code == 201, again.text


async def test_a_client_that_leaves_mid_upload_leaves_no_partial_file(
    registry: Registry, tmp_path: Path
) -> None:
    adapter = gguf_adapter(tmp_path)
    async with node(registry, node_config(tmp_path)) as gw:
        held = gw.held("gone", adapter, headers(adapter))
        held.start()
        await held.first_read.wait()
        await asyncio.sleep(0)  # the first chunk is on disk by now
        await held.finish(hang_up=True)
        listing = (await gw.http.get("/admin/adapters")).json()
    assert listing["data"] == []
    assert left_in(tmp_path) == []


async def test_a_taken_name_is_refused_and_nothing_is_kept(
    registry: Registry, tmp_path: Path
) -> None:
    adapter, other = gguf_adapter(tmp_path), PEFT_CONFIG + peft_weights()
    async with node(registry, node_config(tmp_path)) as gw:
        assert (await gw.put("x", adapter, headers(adapter))).status_code == 201
        # The same bytes again under the same name: nothing to do.
        assert (await gw.put("x", adapter, headers(adapter))).status_code == 201
        refused = await gw.put("x", other, headers(other, "peft", len(PEFT_CONFIG)))
        assert "already taken" in error_of(refused, 400)["message"]
        unknown = await gw.put(
            "y", other, {**headers(other, "peft", len(PEFT_CONFIG)), "x-nomoat-base": "nope"}
        )
        assert "base model" in error_of(unknown, 400)["message"]
    sha = hashlib.sha256(adapter).hexdigest()
    assert left_in(tmp_path) == [sha, f"{sha}/adapter.gguf"]
