"""The GGUF file a llama.cpp engine loads for an adapter, made once.

Before an engine loads an adapter, its registered files are hashed again and
compared with the registered sha256 (they may have changed since). A GGUF
adapter is then copied, and a PEFT one converted, into a content-addressed
cache (``<sha256>-<base>.gguf``): what the engine loads can no longer change
under it, and a later request finds the file ready. Hashing and converting
run in a worker thread; concurrent requests for one adapter wait for one job.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from pathlib import Path

from gateway.contract import Adapter
from gateway.errors import InvalidRequestError
from gateway.lora.sources import AdapterSource, AdapterSourceError, source_files, verify

DEFAULT_CACHE = Path.home() / ".cache" / "nomoat" / "lora-gguf"


class GgufStore:
    """GGUF files of adapters for one base model (``base_gguf``)."""

    def __init__(self, cache_dir: Path | None, base_gguf: Path) -> None:
        self._dir = cache_dir or DEFAULT_CACHE
        self._base = base_gguf
        # Converted adapters depend on the base (its head counts): key by it.
        self._base_key = hashlib.sha256(str(base_gguf.resolve()).encode()).hexdigest()[:12]
        self._ready: dict[str, Path] = {}
        self._jobs: dict[str, asyncio.Task[Path]] = {}

    async def gguf_for(self, adapter: Adapter) -> Path:
        ready = self._ready.get(adapter.sha256)
        if ready is not None and ready.is_file():
            return ready
        job = self._jobs.get(adapter.sha256)
        if job is None:
            job = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._materialize, adapter)
            )
            self._jobs[adapter.sha256] = job
            job.add_done_callback(lambda _: self._jobs.pop(adapter.sha256, None))
        try:
            # shield: one caller going away must not cancel the others' job.
            path = await asyncio.shield(job)
        except AdapterSourceError as error:
            raise InvalidRequestError(f"adapter `{adapter.name}`: {error}", param="model") from None
        except ValueError as error:  # the converter's refusals
            raise InvalidRequestError(
                f"adapter `{adapter.name}` cannot be converted to GGUF: {error}", param="model"
            ) from None
        self._ready[adapter.sha256] = path
        return path

    def forget(self, sha256: str) -> None:
        self._ready.pop(sha256, None)

    def _materialize(self, adapter: Adapter) -> Path:
        """Blocking: copy the files, verify the copy, convert; then publish."""
        self._dir.mkdir(parents=True, exist_ok=True)
        final = self._dir / f"{adapter.sha256}-{self._base_key}.gguf"
        if final.is_file():
            return final
        with tempfile.TemporaryDirectory(dir=self._dir, prefix=".partial-") as scratch:
            # Verify a private copy, so the bytes checked are the bytes used.
            source = _copy_source(adapter, Path(scratch))
            verify(source, adapter.sha256)
            if source.format == "gguf":
                made = source.path
            else:
                # Imported here: the converter pulls in gguf and safetensors,
                # which only a llama.cpp engine serving PEFT adapters needs.
                from gateway.lora.convert import convert_peft_to_gguf

                made = Path(scratch) / "converted.gguf"
                convert_peft_to_gguf(source.path, self._base, made)
            # Atomic: a reader never sees half a file.
            made.replace(final)
        return final


def _copy_source(adapter: Adapter, scratch: Path) -> AdapterSource:
    original = AdapterSource(adapter.path, adapter.relative_path, adapter.format)
    if adapter.format == "gguf":
        copy = scratch / "adapter.gguf"
        shutil.copyfile(adapter.path, copy)
        return AdapterSource(copy, adapter.relative_path, "gguf")
    folder = scratch / "peft"
    folder.mkdir()
    for file in source_files(original):
        shutil.copyfile(file, folder / file.name)
    return AdapterSource(folder, adapter.relative_path, "peft")
