"""The GGUF file a llama.cpp engine loads for an adapter, made once.

A GGUF adapter is copied, and a PEFT one converted, into a content-addressed
cache (``<sha256>-<base>.gguf``): what the engine loads can no longer change
under it, and a later load finds the file ready. Both are made from a
private copy of the registered files, hashed and compared with the
registered sha256 first, so the bytes checked are the bytes converted.

Before every load the registered files are hashed again, also when the GGUF
is already in the cache (:mod:`gateway.lora.integrity`): only an adapter the
engine holds loaded already (``held``) is handed out without reading a file.
(A load that races an eviction of the same adapter can reload its cached
GGUF unchecked; that GGUF was made from verified bytes.) Hashing and
converting run in a worker thread; concurrent requests for one adapter wait
for one job.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

from gateway.contract import Adapter
from gateway.errors import InvalidRequestError
from gateway.lora.integrity import files_changed, source_of, unreadable
from gateway.lora.sources import AdapterSource, sha256_of, source_files
from gateway.private_files import private_dirs, private_file

DEFAULT_CACHE = Path.home() / ".cache" / "nomoat" / "lora-gguf"


class GgufStore:
    """GGUF files of adapters for one base model (``base_gguf``), for the
    engine named ``engine`` (in logs)."""

    def __init__(self, cache_dir: Path | None, base_gguf: Path, engine: str = "llama.cpp") -> None:
        self._dir = cache_dir or DEFAULT_CACHE
        self._base = base_gguf
        self._engine = engine
        # Converted adapters depend on the base (its head counts): key by it.
        self._base_key = hashlib.sha256(str(base_gguf.resolve()).encode()).hexdigest()[:12]
        # By (sha256, registered files): two names for the same bytes in two
        # places are two checks.
        self._jobs: dict[tuple[str, Path], asyncio.Task[Path]] = {}

    def path_for(self, adapter: Adapter) -> Path:
        """Where ``adapter``'s GGUF is (or will be) in the cache."""
        return self._dir / f"{adapter.sha256}-{self._base_key}.gguf"

    async def gguf_for(self, adapter: Adapter, held: Collection[Path] = ()) -> Path:
        """The GGUF to load for ``adapter``, its registered files checked
        first unless the engine holds that GGUF loaded (``held``)."""
        final = self.path_for(adapter)
        if final in held:
            return final  # no load: nothing is read
        key = (adapter.sha256, adapter.path)
        job = self._jobs.get(key)
        if job is None:
            job = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._materialize, adapter, final)
            )
            self._jobs[key] = job
            job.add_done_callback(lambda _: self._jobs.pop(key, None))
        try:
            # shield: one caller going away must not cancel the others' job.
            return await asyncio.shield(job)
        except OSError as error:
            if not _reading(error, adapter):
                raise  # the cache's own trouble (a full disk): not the adapter's
            raise unreadable(adapter, self._engine, error) from None
        except _MismatchError as mismatch:
            raise files_changed(adapter, self._engine, f"its files hash to {mismatch}") from None
        except ValueError as error:  # the converter's refusals
            raise InvalidRequestError(
                f"adapter `{adapter.name}` cannot be converted to GGUF: {error}", param="model"
            ) from None

    def _materialize(self, adapter: Adapter, final: Path) -> Path:
        """Blocking: check the files; copy, check the copy, convert; publish."""
        if final.is_file():
            _check(source_of(adapter), adapter.sha256)
            return final
        private_dirs(self._dir)
        with tempfile.TemporaryDirectory(dir=self._dir, prefix=".partial-") as scratch:
            # Check a private copy, so the bytes checked are the bytes used.
            source = _copy_source(adapter, Path(scratch))
            _check(source, adapter.sha256)
            if source.format == "gguf":
                made = source.path
            else:
                # Imported here: the converter pulls in gguf and safetensors,
                # which only a llama.cpp engine serving PEFT adapters needs.
                from gateway.lora.convert import convert_peft_to_gguf

                made = Path(scratch) / "converted.gguf"
                convert_peft_to_gguf(source.path, self._base, made)
            # Private (the copy and the converter's file were made with the
            # umask's mode), then atomic: a reader never sees half a file.
            private_file(made)
            made.replace(final)
        return final


class _MismatchError(Exception):
    """From the worker thread: the files hash to this, not to the sha256."""


def _reading(error: OSError, adapter: Adapter) -> bool:
    """Whether ``error`` came from reading the adapter's registered files."""
    return error.filename is not None and adapter.path in (
        Path(error.filename),
        *Path(error.filename).parents,
    )


def _check(source: AdapterSource, expected: str) -> None:
    actual = sha256_of(source)
    if actual != expected:
        raise _MismatchError(actual)


def _copy_source(adapter: Adapter, scratch: Path) -> AdapterSource:
    if adapter.format == "gguf":
        copy = scratch / "adapter.gguf"
        shutil.copyfile(adapter.path, copy)
        return AdapterSource(copy, adapter.relative_path, "gguf")
    folder = scratch / "peft"
    folder.mkdir()
    for file in source_files(source_of(adapter)):
        shutil.copyfile(file, folder / file.name)
    return AdapterSource(folder, adapter.relative_path, "peft")
