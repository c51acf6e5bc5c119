"""What nomoat writes is its user's alone: files 0600, folders it creates
0700, whatever the umask (uploads: tests/fast/test_uploads.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.contract import Adapter
from gateway.lora.artifacts import GgufStore
from gateway.private_files import open_private, private_dirs, write_private

from .conftest import Start
from .support import chat_body, pool

pytestmark = pytest.mark.anyio


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_decision_log_and_its_new_folders_are_private(
    start: Start, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "nomoat" / "decisions.jsonl"
    with umask(0):
        config = pool("a", server={"decision_log": str(log), "decision_log_prompts": True})
        async with start(config) as gw:
            answer = await gw.http.post("/v1/chat/completions", json=chat_body())
            assert answer.status_code == 200
    assert log.read_bytes().count(b"\n") == 1
    assert mode(log) == 0o600
    assert mode(log.parent) == mode(log.parent.parent) == 0o700


async def test_an_existing_decision_log_of_this_user_is_made_private(
    start: Start, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_bytes(b"")
    log.chmod(0o666)
    async with start(pool("a", server={"decision_log": str(log)})) as gw:
        assert (await gw.http.post("/v1/chat/completions", json=chat_body())).status_code == 200
    assert mode(log) == 0o600


async def test_the_gguf_cache_of_adapters_is_private(tmp_path: Path) -> None:
    source = tmp_path / "root" / "a.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF adapter bytes")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    adapter = Adapter("a", "m", sha, "gguf", source, "a.gguf")
    cache = tmp_path / "cache" / "lora-gguf"
    with umask(0):
        made = await GgufStore(cache, tmp_path / "base.gguf").gguf_for(adapter)
    assert made.read_bytes() == source.read_bytes()
    assert mode(made) == 0o600
    assert mode(cache) == mode(cache.parent) == 0o700


def test_the_helpers_ignore_the_umask(tmp_path: Path) -> None:
    with umask(0):
        folder = private_dirs(tmp_path / "a" / "b")
        write_private(folder / "f", b"x")
        os.close(open_private(folder / "g", append=True))
    assert mode(tmp_path / "a") == mode(folder) == 0o700
    assert mode(folder / "f") == mode(folder / "g") == 0o600
    # Existing folders are left alone.
    (tmp_path / "shared").mkdir(mode=0o755)
    (tmp_path / "shared").chmod(0o755)
    private_dirs(tmp_path / "shared" / "mine")
    assert mode(tmp_path / "shared") == 0o755
    assert mode(tmp_path / "shared" / "mine") == 0o700
