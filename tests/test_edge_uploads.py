"""Adapter uploads to a real `nomoat edge` node's admin API: streamed to disk
under its limits, checked before they are kept, removed when refused,
private to its user, and then served by its llama.cpp engine."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_api_key
from gateway.lora.sources import PEFT_FILES
from tests.conftest import MODEL
from tests.lora_assets import Assets, ask
from tests.test_edge_routing import edge_node

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADMIN_KEY = "sk-nomoat-upload-admin-0123456789"
LIMIT = 5 * 1024 * 1024  # the PEFT marker adapter is 3.7 MB


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge-upload-root")


@pytest.fixture(scope="module")
def node(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An edge node with its own adapter root, an upload limit of 5 MiB and
    one upload at a time (set from the environment, as an operator would)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NOMOAT_LIMITS__MAX_UPLOAD_BYTES", str(LIMIT))
        env.setenv("NOMOAT_LIMITS__MAX_CONCURRENT_UPLOADS", "1")
        env.setattr(os, "umask", os.umask)  # restored below, whatever happens
        previous = os.umask(0)  # the node inherits it: modes must not depend on it
        try:
            flags = ("--adapter-root", str(root), "--admin-key-hash", hash_api_key(ADMIN_KEY))
            with edge_node(tmp_path_factory.mktemp("edge-upload-log"), "up", *flags) as (port, _):
                yield f"http://127.0.0.1:{port}"
        finally:
            os.umask(previous)


def put(
    node: str, name: str, body: object, sha256: str, kind: str, config_length: int = 0
) -> httpx.Response:
    return httpx.put(
        f"{node}/admin/adapters/{name}/files",
        content=body,  # type: ignore[arg-type]
        headers={
            "Authorization": f"Bearer {ADMIN_KEY}",
            "Content-Type": "application/octet-stream",
            "x-nomoat-base": MODEL,
            "x-nomoat-sha256": sha256,
            "x-nomoat-format": kind,
            "x-nomoat-config-length": str(config_length),
        },
        timeout=120,
    )


def peft_body(assets: Assets, name: str) -> tuple[bytes, int]:
    folder = assets.root / "peft" / name
    config, weights = ((folder / file).read_bytes() for file in PEFT_FILES)
    return config + weights, len(config)


def stored(root: Path) -> list[str]:
    uploads = root / "uploads"
    return (
        sorted(str(p.relative_to(uploads)) for p in uploads.rglob("*")) if uploads.exists() else []
    )


def test_an_uploaded_adapter_is_private_and_served(node: str, root: Path, assets: Assets) -> None:
    body, config_length = peft_body(assets, "alpha")
    sha = assets.sha("peft/alpha")
    answer = put(node, "up-alpha", body, sha, "peft", config_length)
    assert answer.status_code == 201, answer.text
    folder = root / "uploads" / sha
    assert stored(root) == [sha, f"{sha}/{PEFT_FILES[0]}", f"{sha}/{PEFT_FILES[1]}"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}
    assert (
        stat.S_IMODE(folder.stat().st_mode)
        == stat.S_IMODE((root / "uploads").stat().st_mode)
        == 0o700
    )
    client = openai.OpenAI(base_url=f"{node}/v1", api_key="unused", max_retries=0)
    assert assets.markers["alpha"] in ask(client, "up-alpha")


def test_an_upload_past_the_limit_is_refused_and_leaves_nothing(node: str, root: Path) -> None:
    before = stored(root)
    big = os.urandom(LIMIT + 1)
    refused = put(node, "too-big", big, hashlib.sha256(big).hexdigest(), "gguf")
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(8):
            yield big[: 1024 * 1024]

    try:
        streamed = put(node, "too-big", chunks(), hashlib.sha256(big).hexdigest(), "gguf")
        assert streamed.status_code == 413
    except httpx.TransportError:
        pass  # the node may answer and close before the client has sent it all
    assert stored(root) == before


def test_an_upload_that_is_no_adapter_is_refused_and_leaves_nothing(node: str, root: Path) -> None:
    before = stored(root)
    garbage = b"GGUF" + os.urandom(4096)
    refused = put(node, "garbage", garbage, hashlib.sha256(garbage).hexdigest(), "gguf")
    assert refused.status_code == 400
    assert "adapter upload refused" in refused.json()["error"]["message"]
    assert stored(root) == before
    listing = httpx.get(
        f"{node}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ).json()
    assert "garbage" not in {adapter["id"] for adapter in listing["data"]}


def test_a_second_upload_at_once_gets_503_with_retry_after(
    node: str, root: Path, assets: Assets
) -> None:
    adapter = (assets.root / "gguf" / "beta.gguf").read_bytes()
    sha = assets.sha("gguf/beta.gguf")
    go_on, first_sent = threading.Event(), threading.Event()

    def slowly() -> Iterator[bytes]:
        yield adapter[: len(adapter) // 2]
        first_sent.set()
        go_on.wait(60)
        yield adapter[len(adapter) // 2 :]

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(put, node, "up-beta", slowly(), sha, "gguf")
        assert first_sent.wait(60)
        # The node is receiving it: its scratch folder exists only while the
        # upload holds the one slot (a fixed sleep could end before that on a
        # loaded machine, and the second upload would take the slot).
        deadline = time.monotonic() + 30
        while not list((root / "uploads").glob(".partial-*")):
            assert time.monotonic() < deadline, "the first upload never started"
            time.sleep(0.02)
        busy = put(node, "up-beta-2", adapter, sha, "gguf")
        go_on.set()
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"].isdigit()
        assert first.result().status_code == 201
    assert put(node, "up-beta-2", adapter, sha, "gguf").status_code == 201
    assert f"{sha}/adapter.gguf" in stored(root)
