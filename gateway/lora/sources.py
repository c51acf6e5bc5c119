"""An adapter's files: where they may live, what format they are, their sha256.

Adapters are read only from under the configured adapter root: a name that
climbs out of it (``..``, an absolute path) or a symlink that points outside
it is refused, and so are pickled weights (``.bin``, ``.pt``, ``.pth``,
``.ckpt``, ``.pkl``), which can run code when loaded.

The sha256 of a GGUF adapter is the file's. The sha256 of a PEFT folder is the
sha256 of ``adapter_config.json``'s bytes followed by
``adapter_model.safetensors``'s bytes, in that order (exactly
``cat adapter_config.json adapter_model.safetensors | sha256sum``): the two
files an engine reads, and nothing else in the folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
_CHUNK = 1 << 20


class AdapterSourceError(ValueError):
    """An adapter's files are missing or unsafe."""


@dataclass(frozen=True, slots=True)
class AdapterSource:
    """Verified location and format of an adapter's files."""

    path: Path
    relative_path: str
    format: str  # "peft" or "gguf"


def locate(root: Path, relative: str) -> AdapterSource:
    """Resolve ``relative`` under ``root``, refusing anything that escapes it,
    pickled weights, and unknown formats."""
    if not relative or Path(relative).is_absolute():
        raise AdapterSourceError(f"adapter path {relative!r} must be relative to the adapter root")
    real_root = root.resolve()
    candidate = real_root / relative
    # resolve() follows symlinks: a link inside the root pointing outside it
    # ends up outside, and is refused like a literal "..".
    resolved = candidate.resolve()
    if not resolved.is_relative_to(real_root):
        raise AdapterSourceError(f"adapter path {relative!r} escapes the adapter root")
    if not resolved.exists():
        raise AdapterSourceError(f"adapter path {relative!r}: no such file or folder")
    if resolved.is_dir():
        _check_peft_folder(resolved, real_root, relative)
        return AdapterSource(resolved, str(resolved.relative_to(real_root)), "peft")
    if resolved.suffix in PICKLED_SUFFIXES:
        raise AdapterSourceError(
            f"adapter path {relative!r}: pickled weights ({resolved.suffix}) are refused; "
            "use safetensors (PEFT) or GGUF"
        )
    if resolved.suffix != ".gguf":
        raise AdapterSourceError(
            f"adapter path {relative!r}: expected a PEFT folder or a .gguf file"
        )
    return AdapterSource(resolved, str(resolved.relative_to(real_root)), "gguf")


def _check_peft_folder(folder: Path, real_root: Path, relative: str) -> None:
    for entry in folder.iterdir():
        if entry.suffix in PICKLED_SUFFIXES:
            raise AdapterSourceError(
                f"adapter path {relative!r}: pickled weights ({entry.name}) are refused; "
                "use adapter_model.safetensors"
            )
    for name in PEFT_FILES:
        file = folder / name
        if not file.is_file():
            raise AdapterSourceError(f"adapter path {relative!r}: {name} is missing")
        if not file.resolve().is_relative_to(real_root):
            raise AdapterSourceError(f"adapter path {relative!r}: {name} escapes the adapter root")


def source_files(source: AdapterSource) -> tuple[Path, ...]:
    """The files that make up the adapter, in the order they are hashed."""
    if source.format == "peft":
        return tuple(source.path / name for name in PEFT_FILES)
    return (source.path,)


def sha256_of(source: AdapterSource) -> str:
    """Blocking (reads every byte): call it from a worker thread."""
    digest = hashlib.sha256()
    for file in source_files(source):
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
