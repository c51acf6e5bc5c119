"""Adapters pushed to this node over the admin API (edge nodes that cannot
read the gateway's files).

The body of ``PUT /admin/adapters/NAME/files`` is exactly what the adapter's
sha256 covers (see :mod:`gateway.lora.sources`): a GGUF file's bytes, or a
PEFT folder's ``adapter_config.json`` followed by its
``adapter_model.safetensors`` (``x-nomoat-config-length`` says where the
first ends). So the node checks the sha256 of the body itself, then writes the
files below ``<adapter root>/uploads/<sha256>/`` (atomically: a folder is
renamed into place once complete) and registers the adapter from there.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.lora.sources import PEFT_FILES

UPLOADS = "uploads"
GGUF_NAME = "adapter.gguf"


@dataclass(frozen=True, slots=True)
class Upload:
    sha256: str
    format: str  # "peft" or "gguf"
    body: bytes
    # PEFT: how many leading bytes of the body are adapter_config.json.
    config_length: int = 0


def upload_body(files: list[Path]) -> tuple[bytes, int]:
    """Blocking. The body to send for an adapter's files (in sha256 order)
    and the length of the first file."""
    contents = [file.read_bytes() for file in files]
    return b"".join(contents), len(contents[0]) if len(contents) > 1 else 0


def store(root: Path, upload: Upload) -> str:
    """Blocking. Check and write an upload; its path relative to ``root``."""
    actual = hashlib.sha256(upload.body).hexdigest()
    if actual != upload.sha256:
        raise ValueError(f"the upload's sha256 is {actual}, not {upload.sha256}")
    if upload.format not in ("peft", "gguf"):
        raise ValueError('format must be "peft" or "gguf"')
    if upload.format == "peft" and not 0 < upload.config_length < len(upload.body):
        raise ValueError("x-nomoat-config-length must split the body in two")
    relative = f"{UPLOADS}/{upload.sha256}"
    final = root / relative
    if not final.exists():
        (root / UPLOADS).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root / UPLOADS, prefix=".partial-"))
        try:
            _write(scratch, upload)
            scratch.rename(final)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if not final.exists():
                raise
    return f"{relative}/{GGUF_NAME}" if upload.format == "gguf" else relative


def _write(folder: Path, upload: Upload) -> None:
    if upload.format == "gguf":
        (folder / GGUF_NAME).write_bytes(upload.body)
        return
    config, weights = PEFT_FILES
    (folder / config).write_bytes(upload.body[: upload.config_length])
    (folder / weights).write_bytes(upload.body[upload.config_length :])
