"""Files and folders nomoat writes are its user's alone: 0600 and 0700.

Decision logs hold prompts (with ``decision_log_prompts``), the adapter cache
and uploads hold fine-tunes an operator may not want to share. Modes are set
explicitly after creation, so they do not depend on the process's umask (a
umask of 0 would otherwise leave a decision log world-writable). Folders that
already exist and are not nomoat's own (``/var/log``, an adapter root) are
left as they are; the ones created here are 0700.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dirs(path: Path) -> Path:
    """``path`` and any missing parents, each created 0700; the existing ones
    untouched."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made meanwhile by another writer: theirs
        folder.chmod(DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Make a file nomoat wrote (by any means) 0600."""
    path.chmod(FILE_MODE)


def open_private(path: Path, *, append: bool = False) -> int:
    """A file descriptor for writing ``path``, created 0600 (or truncated, or
    appended to); an existing file of this user's is made 0600 too (one of
    another user's, shared on purpose, is left as it is)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    descriptor = os.open(path, flags, FILE_MODE)
    try:
        status = os.fstat(descriptor)
        if status.st_uid == os.geteuid() and status.st_mode & 0o777 != FILE_MODE:
            os.fchmod(descriptor, FILE_MODE)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or replaced), 0600."""
    with os.fdopen(open_private(path), "wb") as file:
        file.write(data)
