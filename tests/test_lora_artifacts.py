"""gateway/lora/artifacts.py without an engine: the GGUF a llama.cpp engine
loads for an adapter is made once, and the adapter's registered files are
hashed again before every load, a cached GGUF's reuse included."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import pytest

from gateway.contract import Adapter
from gateway.errors import InternalError
from gateway.lora.artifacts import GgufStore
from gateway.lora.sources import locate, sha256_of
from tests.test_lora_convert import write_adapter, write_base


def registered(root: Path, relative: str, name: str = "sql") -> Adapter:
    source = locate(root, relative)
    return Adapter(name, "m", sha256_of(source), source.format, source.path, source.relative_path)


def change(file: Path) -> None:
    """What a training job writing into the adapter's folder does."""
    file.write_bytes(file.read_bytes() + b"\0")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_base(tmp_path / "base.gguf")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_adapter(tmp_path / "root" / "peft" / "sql")
    gguf = tmp_path / "root" / "gguf" / "tone.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + bytes(range(256)))  # copied, never parsed
    return tmp_path / "root"


def test_a_peft_adapter_is_converted_once_into_the_cache(
    tmp_path: Path, base: Path, root: Path
) -> None:
    store = GgufStore(tmp_path / "cache", base)
    adapter = registered(root, "peft/sql")

    async def twice() -> tuple[Path, Path]:
        return await store.gguf_for(adapter), await store.gguf_for(adapter)

    first, second = asyncio.run(twice())
    assert first == second == store.path_for(adapter)
    assert first.read_bytes().startswith(b"GGUF")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no leftovers


def test_a_cached_gguf_is_not_reused_once_the_peft_files_changed(
    tmp_path: Path, base: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = GgufStore(tmp_path / "cache", base, engine="local")
    adapter = registered(root, "peft/sql")
    converted = asyncio.run(store.gguf_for(adapter))
    change(root / "peft" / "sql" / "adapter_model.safetensors")
    with caplog.at_level(logging.ERROR), pytest.raises(InternalError) as refused:
        asyncio.run(store.gguf_for(adapter))
    assert refused.value.status_code == 500
    assert refused.value.code == "adapter_files_changed"
    assert "`sql`" in refused.value.message
    assert adapter.sha256 not in refused.value.message  # details go to the log only
    assert "local: refused to load adapter sql" in caplog.text
    assert adapter.sha256 in caplog.text
    # After a restart (a new store, the GGUF still in the cache): refused too.
    with pytest.raises(InternalError):
        asyncio.run(GgufStore(tmp_path / "cache", base).gguf_for(adapter))
    assert converted.is_file()  # made from verified bytes: kept for when they are restored


def test_a_cached_gguf_adapter_is_not_reused_once_its_file_changed(
    tmp_path: Path, base: Path, root: Path
) -> None:
    store = GgufStore(tmp_path / "cache", base)
    adapter = registered(root, "gguf/tone.gguf", "tone")
    copy = asyncio.run(store.gguf_for(adapter))
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == adapter.sha256
    change(root / "gguf" / "tone.gguf")
    with pytest.raises(InternalError, match="`tone` cannot be loaded"):
        asyncio.run(store.gguf_for(adapter))


def test_restored_files_are_served_again(tmp_path: Path, base: Path, root: Path) -> None:
    store = GgufStore(tmp_path / "cache", base)
    adapter = registered(root, "gguf/tone.gguf")
    file = root / "gguf" / "tone.gguf"
    original = file.read_bytes()
    change(file)
    with pytest.raises(InternalError):
        asyncio.run(store.gguf_for(adapter))
    file.write_bytes(original)
    assert asyncio.run(store.gguf_for(adapter)) == store.path_for(adapter)


def test_missing_files_are_refused_the_same_way(tmp_path: Path, base: Path, root: Path) -> None:
    store = GgufStore(tmp_path / "cache", base)
    adapter = registered(root, "peft/sql")
    (root / "peft" / "sql" / "adapter_config.json").unlink()
    with pytest.raises(InternalError, match="`sql` cannot be loaded"):
        asyncio.run(store.gguf_for(adapter))


def test_a_gguf_the_engine_holds_loaded_is_handed_out_without_reading_a_file(
    tmp_path: Path, base: Path, root: Path
) -> None:
    """No load, so nothing to check: requests for a loaded adapter cost no I/O."""
    store = GgufStore(tmp_path / "cache", base)
    adapter = registered(root, "gguf/tone.gguf")
    path = asyncio.run(store.gguf_for(adapter))
    change(root / "gguf" / "tone.gguf")
    assert asyncio.run(store.gguf_for(adapter, held={path})) == path
    with pytest.raises(InternalError):  # once evicted, the next load checks again
        asyncio.run(store.gguf_for(adapter, held=set()))


def test_concurrent_requests_wait_for_one_conversion(
    tmp_path: Path, base: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.lora.convert as convert

    conversions = []
    real = convert.convert_peft_to_gguf

    def counted(peft: Path, base_gguf: Path, out: Path) -> object:
        conversions.append(peft)
        return real(peft, base_gguf, out)

    monkeypatch.setattr(convert, "convert_peft_to_gguf", counted)
    store = GgufStore(tmp_path / "cache", base)
    adapter = registered(root, "peft/sql")

    async def many() -> list[Path]:
        return await asyncio.gather(*(store.gguf_for(adapter) for _ in range(5)))

    assert len(set(asyncio.run(many()))) == 1
    assert len(conversions) == 1


def test_trouble_with_the_cache_is_not_blamed_on_the_adapter(
    tmp_path: Path, base: Path, root: Path
) -> None:
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    store = GgufStore(tmp_path / "cache", base)
    with pytest.raises(OSError) as failed:
        asyncio.run(store.gguf_for(registered(root, "peft/sql")))
    assert failed.value.filename == str(tmp_path / "cache")
