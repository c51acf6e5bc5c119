"""Adapters pushed to this node over the admin API (edge nodes that cannot
read the gateway's files).

The body of ``PUT /admin/adapters/NAME/files`` is exactly what the adapter's
sha256 covers (see :mod:`gateway.lora.sources`): a GGUF file's bytes, or a
PEFT folder's ``adapter_config.json`` followed by its
``adapter_model.safetensors`` (``x-nomoat-config-length`` says where the
first ends).

The node never holds an upload in memory: the body is streamed into a
private scratch folder below ``<adapter root>/uploads/`` (0700, files 0600)
while its sha256 is computed, and refused (413) as soon as it passes
``limits.max_upload_bytes``. Only ``limits.max_concurrent_uploads`` are
received at once; past that an upload gets 503 with ``Retry-After`` before a
byte of it is read. Once complete, the bytes are checked (the sha256, then
the format: a GGUF LoRA adapter, or a PEFT LoRA config and a well-formed
safetensors file) and only then renamed into ``uploads/<sha256>/``. Anything
refused, cut short or cancelled is deleted: no partial file stays behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import AsyncIterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.errors import EngineOverloadedError, InvalidRequestError, PayloadTooLargeError
from gateway.lora.sources import PEFT_FILES
from gateway.private_files import open_private, private_dirs

UPLOADS = "uploads"
GGUF_NAME = "adapter.gguf"
FORMATS = ("peft", "gguf")
# adapter_config.json is a few kB; a larger one is not a PEFT config.
MAX_CONFIG_BYTES = 1 << 20
# A safetensors header lists tensor names, shapes and offsets.
MAX_SAFETENSORS_HEADER_BYTES = 64 << 20
# Received bytes are written (in a worker thread) once this many are buffered.
_FLUSH_BYTES = 1 << 20
# What a refused upload is told to wait before trying again.
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, slots=True)
class UploadSpec:
    """What the upload's headers announce."""

    sha256: str
    format: str  # "peft" or "gguf"
    # PEFT: how many leading bytes of the body are adapter_config.json.
    config_length: int = 0


def spec_from_headers(headers: Mapping[str, str]) -> UploadSpec:
    """The announced upload, checked before a byte of the body is read."""
    sha256 = headers.get("x-nomoat-sha256", "").lower()
    kind = headers.get("x-nomoat-format", "")
    try:
        config_length = int(headers.get("x-nomoat-config-length", "0"))
    except ValueError:
        raise InvalidRequestError("x-nomoat-config-length must be an integer") from None
    if not sha256 or kind not in FORMATS:
        raise InvalidRequestError(
            "an adapter upload needs x-nomoat-base, x-nomoat-sha256 and x-nomoat-format "
            '("peft" or "gguf") headers'
        )
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidRequestError("x-nomoat-sha256 must be 64 hex digits")
    if kind == "peft" and not 0 < config_length <= MAX_CONFIG_BYTES:
        raise InvalidRequestError(
            f"x-nomoat-config-length must be 1..{MAX_CONFIG_BYTES} for a PEFT upload"
        )
    return UploadSpec(sha256, kind, config_length if kind == "peft" else 0)


class UploadSlots:
    """At most ``limit`` uploads received at once; one more is a 503 with
    ``Retry-After`` (uploads are rare and large: they never queue)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.busy >= self.limit:
            raise EngineOverloadedError(
                f"{self.busy} adapter uploads are already in progress; try again later",
                retry_after_seconds=RETRY_AFTER_SECONDS,
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


@dataclass(frozen=True, slots=True)
class StoredUpload:
    """Checked files below the adapter root."""

    # Relative to the adapter root: what the registry registers.
    relative: str
    sha256: str
    folder: Path
    # False: the same bytes were stored already (by an earlier upload).
    created: bool

    def discard(self) -> None:
        """Blocking. Remove the files again if this upload made them."""
        if self.created:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Writer:
    """The scratch folder's files, written in a worker thread, hashed as written."""

    def __init__(self, folder: Path, spec: UploadSpec) -> None:
        self._spec = spec
        self._digest = hashlib.sha256()
        self.received = 0
        names = (GGUF_NAME,) if spec.format == "gguf" else PEFT_FILES
        self._files: list[BinaryIO] = []
        for name in names:
            self._files.append(os.fdopen(open_private(folder / name), "wb"))

    def write(self, data: bytes) -> None:
        self._digest.update(data)
        split = self._spec.config_length - self.received
        if 0 < split < len(data):
            self._files[0].write(data[:split])
            self._files[1].write(data[split:])
        else:
            self._files[0 if split > 0 else -1].write(data)
        self.received += len(data)

    def close(self) -> str:
        """Close the files; the sha256 of everything written."""
        for file in self._files:
            file.close()
        return self._digest.hexdigest()


async def receive(
    root: Path, spec: UploadSpec, chunks: AsyncIterable[bytes], limit: int
) -> StoredUpload:
    """Stream ``chunks`` to disk, check them, and keep them; or remove every
    byte written and raise (413 past ``limit`` bytes, 400 for bytes that are
    not what was announced)."""
    uploads = await asyncio.to_thread(private_dirs, root / UPLOADS)
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=uploads, prefix=".partial-"))
    try:
        writer = _Writer(scratch, spec)
        try:
            await _copy(chunks, writer, limit)
        finally:
            # On this thread: a write still running in a worker (its caller
            # cancelled) finishes first; the file lock makes close() wait.
            actual = writer.close()
        if actual != spec.sha256:
            raise InvalidRequestError(
                f"adapter upload refused: the upload's sha256 is {actual}, not {spec.sha256}"
            )
        if spec.format == "peft" and writer.received <= spec.config_length:
            raise InvalidRequestError(
                "adapter upload refused: x-nomoat-config-length must split the body in two"
            )
        try:
            await asyncio.to_thread(check_format, scratch, spec.format)
        except ValueError as error:
            raise InvalidRequestError(f"adapter upload refused: {error}") from None
        return await asyncio.to_thread(_publish, scratch, root, spec)
    finally:
        # Synchronous: it must happen even while this task is being cancelled
        # (a client that went away mid-upload). Nothing is left once published.
        shutil.rmtree(scratch, ignore_errors=True)


async def drain(chunks: AsyncIterable[bytes], limit: int) -> None:
    """Read a body that will not be kept (an upload refused or not needed),
    so the sender gets the answer rather than a reset connection."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(
                f"adapter upload refused: larger than {limit} bytes (limits.max_upload_bytes)"
            )


async def _copy(chunks: AsyncIterable[bytes], writer: _Writer, limit: int) -> None:
    pending: list[bytes] = []
    buffered = 0
    async for chunk in chunks:
        if writer.received + buffered + len(chunk) > limit:
            raise PayloadTooLargeError(
                f"adapter upload refused: larger than {limit} bytes (limits.max_upload_bytes)"
            )
        pending.append(chunk)
        buffered += len(chunk)
        if buffered >= _FLUSH_BYTES:
            await asyncio.to_thread(writer.write, b"".join(pending))
            pending, buffered = [], 0
    if pending:
        await asyncio.to_thread(writer.write, b"".join(pending))


def _publish(scratch: Path, root: Path, spec: UploadSpec) -> StoredUpload:
    """Blocking. Rename the checked folder into place (atomic: a reader sees
    all of it or none); the same bytes stored already are kept as they are."""
    relative = f"{UPLOADS}/{spec.sha256}"
    final = root / relative
    created = False
    if not final.exists():
        try:
            scratch.rename(final)
            created = True
        except OSError:
            if not final.exists():
                raise
    located = f"{relative}/{GGUF_NAME}" if spec.format == "gguf" else relative
    return StoredUpload(located, spec.sha256, final, created)


# ----------------------------------------------------------------- formats


def check_format(folder: Path, kind: str) -> None:
    """Blocking. Raise ValueError unless ``folder`` holds a LoRA adapter of
    this format: a GGUF adapter file, or a PEFT LoRA config with well-formed
    safetensors weights (engines parse them again before use)."""
    if kind == "gguf":
        _check_gguf(folder / GGUF_NAME)
    else:
        _check_peft_config(folder)
        _check_safetensors(folder / PEFT_FILES[1])


def _check_gguf(path: Path) -> None:
    with path.open("rb") as file:
        if file.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
    import gguf  # the converter's dependency; only nodes that receive uploads need it here

    try:
        reader = gguf.GGUFReader(path)
        kinds = [reader.get_field(key) for key in ("general.type", "adapter.type")]
        found = [field.contents() if field is not None else None for field in kinds]
    except Exception as error:  # the reader raises what numpy and struct raise
        raise ValueError(f"not a readable GGUF file ({type(error).__name__})") from None
    if found != ["adapter", "lora"]:
        raise ValueError("the GGUF file is not a LoRA adapter (general.type, adapter.type)")


def _check_peft_config(folder: Path) -> None:
    from gateway.lora.convert import read_peft_config

    read_peft_config(folder)  # ValueError (AdapterConversionError) when it is not LoRA


def _check_safetensors(path: Path) -> None:
    """The header: a JSON object of tensors whose data lie within the file."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError("adapter_model.safetensors is not a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise ValueError("adapter_model.safetensors has no valid header")
        try:
            header = json.loads(file.read(length))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("adapter_model.safetensors has no valid header") from None
    data = size - 8 - length
    if not isinstance(header, dict):
        raise ValueError("adapter_model.safetensors has no valid header")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise ValueError(f"adapter_model.safetensors: tensor {name!r} lies outside the file")
    if not any("lora_" in name for name in tensors):
        raise ValueError("adapter_model.safetensors holds no LoRA tensors")


# ------------------------------------------------------------ the sender


def upload_body(files: list[Path]) -> tuple[bytes, int]:
    """Blocking. The body to send for an adapter's files (in sha256 order)
    and the length of the first file."""
    contents = [file.read_bytes() for file in files]
    return b"".join(contents), len(contents[0]) if len(contents) > 1 else 0
