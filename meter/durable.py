"""Files that appear whole or not at all, and survive a power cut once written.

The one copy of the temporary-file, fsync, rename, directory-fsync sequence
that the user store, audit log, replay store, labels and provider exports
share. Stdlib only, so every package may use it. OSError passes through:
each caller says in its own words what could not be written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["stage", "sync_directory", "write_atomically"]


def stage(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a new synced temporary file beside ``path``; the caller renames it."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def write_atomically(path: Path, data: bytes, *, overwrite: bool = True, mode: int = 0o600) -> None:
    """Replace (or, without ``overwrite``, create: FileExistsError if it exists) ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = stage(path, data, mode)
    try:
        if overwrite:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename or a new directory entry durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
