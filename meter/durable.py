"""Files that appear whole or not at all, and survive a power cut once written.

The one copy of the temporary-file, fsync, rename, directory-fsync sequence
that the user store, audit log, replay store, labels and provider exports
share. Stdlib only, so every package may use it. OSError passes through:
each caller says in its own words what could not be written.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

__all__ = ["remove_abandoned", "stage", "sync_directory", "write_atomically"]

_ORPHAN_AGE_S = 3600  # a temporary file that names no writer is abandoned after this


def stage(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a new synced temporary file beside ``path``; the caller renames it.

    Its name, ``.NAME.PID.RANDOM.tmp``, says which process writes it, so that
    `remove_abandoned` can tell one a killed writer left from one being written.
    """
    fd, temp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
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


def remove_abandoned(folder: Path) -> int:
    """Remove the temporary files of `stage` in ``folder`` whose writer has exited; the count."""
    removed = 0
    for temp in Path(folder).glob(".*.tmp"):
        parts = temp.name[: -len(".tmp")].rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            if _running(int(parts[1])):
                continue
        else:
            try:  # not ours to judge by its name: only by its age
                if time.time() - temp.stat().st_mtime < _ORPHAN_AGE_S:
                    continue
            except FileNotFoundError:
                continue
        temp.unlink(missing_ok=True)
        removed += 1
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process: alive
    return True


def sync_directory(directory: Path) -> None:
    """Make a rename or a new directory entry durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
