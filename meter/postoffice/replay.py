"""Replay stores: has this (device serial, piece sequence) been accepted before?

Model. One compressed bitmap of sequences per device (pyroaring). Expiry
works per chunk of 2**16 consecutive sequences (one roaring container): each
chunk remembers the latest date of mailing of any batch that added to it, and
expire(today) drops the chunks whose latest date is more than 183 days before
today. A piece is therefore never forgotten while it could still verify (the
spec makes it EXPIRED once its date of mailing is more than 183 days before
the verifier's date), and the check for a piece is one bitmap lookup: a
sequence lives in exactly one chunk, whatever its date of mailing.

Embedded store: a folder, held by one process at a time (flock on ``lock``):

- ``snapshot.pimr``: a 36-byte header (magic "PIMSNAP2", format version u16,
  chunk bits u16, generation u64, payload length u64, payload CRC-32, header
  CRC-32; little-endian), then per device its serial u64, chunk count u32,
  bitmap length u32, the chunks (u16 each), their latest dates of mailing
  (proleptic ordinals, u32 each) and the portable roaring serialization.
  Written whole to a temporary file, fsync'ed, renamed, directory fsync'ed.
- ``journal.pimj``: a 24-byte header (magic "PIMJRNL2", version, chunk bits,
  generation u64, header CRC-32), then one record per check_and_set that
  added pieces: a 20-byte header (magic "PIMB", payload length u32, latest
  date of mailing of the batch u32, payload CRC-32, header CRC-32) and the
  new pieces: group count u32, the groups' serials (u64 each), their piece
  counts (u32 each), then every group's sequences (u32 each).

check_and_set appends its batch and fdatasyncs before it returns: a piece
reported new is durable, and a SIGKILL at any moment cannot let it be accepted
again; seen() only looks, and writes nothing. When the journal outgrows the
snapshot (and at least 8 MiB), and after expire(), the store compacts: a new
snapshot with generation g+1, then a new empty journal with generation g+1.
On open, a journal older than the snapshot is already inside it and is
replaced; a newer one is corruption.

What a crash can leave after the last acknowledged batch, and open drops by
truncating the journal: a batch cut short (SIGKILL in the middle of the
write), or, after a power loss, a last batch garbled in place or a tail of
zeros (the file size reached the disk, the data did not). Such bytes were
never acknowledged. Anything else that does not check out (bad magic or
checksum, a truncated snapshot, a bad batch followed by more data, a missing
snapshot or journal) raises ReplayStoreError naming the file and the offset,
and the files are left as they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from pyroaring import BitMap

from meter.durable import sync_directory, write_atomically
from meter.errors import ReplayStoreError
from meter.postoffice import replay_format as fmt
from meter.postoffice.replay_format import DeviceState, FormatError
from meter.postoffice.replay_model import (
    FORGET_AFTER_DAYS,
    MAX_SEQUENCE,
    MAX_SERIAL,
    Piece,
    ReplayStore,
    _SeenPieces,
    latest_mailing,
    validate_pieces,
)

__all__ = [
    "FORGET_AFTER_DAYS",
    "JOURNAL_NAME",
    "MAX_SEQUENCE",
    "MAX_SERIAL",
    "SNAPSHOT_NAME",
    "EmbeddedReplayStore",
    "MemoryReplayStore",
    "Piece",
    "ReplayStore",
    "latest_mailing",
    "validate_pieces",
]


class _Store:
    """What both local stores share: a piece count, expiry and closing as a context manager."""

    _seen: _SeenPieces

    def close(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._seen)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MemoryReplayStore(_Store):
    """In memory only: for tests and one-shot checks."""

    def __init__(self) -> None:
        self._seen = _SeenPieces()
        self._lock = threading.Lock()  # a batch is planned and applied as one step

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        if not pieces:
            return []
        with self._lock:
            batch = self._seen.plan(pieces)
            self._seen.apply(batch.additions, batch.stamp)
            return batch.seen

    def seen(self, pieces: Sequence[Piece]) -> list[bool]:
        if not pieces:
            return []
        with self._lock:
            return self._seen.lookup(pieces)

    def expire(self, today: date) -> int:
        with self._lock:
            return self._seen.expire(today)

    def close(self) -> None:
        pass


_T = TypeVar("_T")

SNAPSHOT_NAME = "snapshot.pimr"
JOURNAL_NAME = "journal.pimj"
LOCK_NAME = "lock"
_COMPACT_AT = 8 << 20  # journal bytes before a compaction (or the snapshot's size, if larger)


class EmbeddedReplayStore(_Store):
    """A crash-safe folder of snapshot and journal, held by one process at a time."""

    def __init__(
        self, folder: Path, lock_fd: int, journal_fd: int, seen: _SeenPieces, generation: int
    ) -> None:
        """Use open(): it locks, checks and loads the folder."""
        self._folder = folder
        self._lock_fd: int | None = lock_fd
        self._journal_fd = journal_fd
        self._seen = seen
        self._generation = generation
        self._end = os.fstat(journal_fd).st_size  # journal size after the last acknowledged batch
        self._snapshot_size = _size(folder / SNAPSHOT_NAME)
        self._failure: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> EmbeddedReplayStore:
        """Open or create the store folder; ReplayStoreError if locked, corrupt or unusable."""
        folder = Path(path)
        _make_folder(folder)
        try:
            lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ReplayStoreError(f"replay store {folder}: cannot open: {exc.strerror}") from exc
        try:
            _lock(folder, lock_fd)
            for stale in folder.glob("*.tmp"):  # a compaction a crash cut short
                stale.unlink()
            seen, generation, journal_fd = _load(folder)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(folder, lock_fd, journal_fd, seen, generation)

    @property
    def path(self) -> Path:
        return self._folder

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        if not pieces:
            with self._lock:
                self._usable()
            return []
        with self._lock:
            self._usable()
            batch = self._seen.plan(pieces)
            if batch.additions:
                record = fmt.encode_batch(
                    [(serial, new.to_array()) for serial, new in batch.additions], batch.stamp
                )
                try:
                    _write_all(self._journal_fd, record, self._end)
                    os.fdatasync(self._journal_fd)
                except OSError as exc:
                    # After a failed write or fsync the kernel may have dropped
                    # pages: trust nothing until the store is opened anew. The
                    # batch was not acknowledged, so take back what it wrote.
                    self._failure = f"journal write at offset {self._end} failed: {exc.strerror}"
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._journal_fd, self._end)
                    raise ReplayStoreError(f"replay store {self._folder}: {self._failure}") from exc
                self._end += len(record)
                self._seen.apply(batch.additions, batch.stamp)
                if self._end > max(_COMPACT_AT, self._snapshot_size):
                    # The batch is durable whatever happens here; a failed
                    # compaction stops the store until it is reopened.
                    with contextlib.suppress(ReplayStoreError):
                        self._compact()
            return batch.seen

    def seen(self, pieces: Sequence[Piece]) -> list[bool]:
        """Whether each piece is recorded; writes nothing, takes the lock check_and_set takes."""
        with self._lock:
            self._usable()
            return self._seen.lookup(pieces) if pieces else []

    def expire(self, today: date) -> int:
        """Forget what expired, and compact so the files forget it too."""
        with self._lock:
            self._usable()
            dropped = self._seen.expire(today)
            if dropped:
                self._compact()
            return dropped

    def compact(self) -> None:
        """Write a new snapshot of everything and start an empty journal."""
        with self._lock:
            self._usable()
            self._compact()

    def close(self) -> None:
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._journal_fd)
                os.close(self._lock_fd)  # also releases the flock
                self._lock_fd = None

    def _compact(self) -> None:
        generation = self._generation + 1
        snapshot = fmt.encode_snapshot(self._seen.devices, generation)
        try:
            write_atomically(self._folder / SNAPSHOT_NAME, snapshot)
            write_atomically(self._folder / JOURNAL_NAME, fmt.journal_header(generation))
            journal_fd = _open_journal(self._folder)
        except OSError as exc:
            self._failure = f"compaction to generation {generation} failed: {exc.strerror}"
            raise ReplayStoreError(f"replay store {self._folder}: {self._failure}") from exc
        os.close(self._journal_fd)
        self._journal_fd = journal_fd
        self._generation = generation
        self._end = fmt.JOURNAL_HEADER_SIZE
        self._snapshot_size = len(snapshot)

    def _usable(self) -> None:
        if self._lock_fd is None:
            raise ReplayStoreError(f"replay store {self._folder} is closed")
        if self._failure is not None:
            raise ReplayStoreError(
                f"replay store {self._folder}: {self._failure}; reopen it before use"
            )


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir()
    except FileExistsError:
        if not folder.is_dir():
            raise ReplayStoreError(
                f"replay store {folder} is not a folder (an embedded replay store is a folder "
                "holding snapshot.pimr and journal.pimj); give the path of a folder"
            ) from None
        return
    except OSError as exc:
        raise ReplayStoreError(f"replay store {folder}: cannot open: {exc.strerror}") from exc
    sync_directory(folder.parent)


def _lock(folder: Path, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ReplayStoreError(f"replay store {folder} is in use by another process") from None
    except OSError as exc:
        raise ReplayStoreError(f"replay store {folder}: cannot lock: {exc.strerror}") from exc


def _load(folder: Path) -> tuple[_SeenPieces, int, int]:
    """The pieces, the generation and an open journal; repairs only unacknowledged tails."""
    snapshot_path, journal_path = folder / SNAPSHOT_NAME, folder / JOURNAL_NAME
    try:
        snapshot = snapshot_path.read_bytes() if snapshot_path.exists() else None
        journal = journal_path.read_bytes() if journal_path.exists() else None
    except OSError as exc:
        raise ReplayStoreError(f"replay store {folder}: cannot read: {exc.strerror}") from exc
    generation, devices = 0, dict[int, DeviceState]()
    if snapshot is not None:
        generation, devices = _decoded(snapshot_path, fmt.decode_snapshot, snapshot)
    seen = _SeenPieces(devices)
    try:
        if journal is None:
            if snapshot is not None:
                raise ReplayStoreError(
                    f"replay store {folder}: {JOURNAL_NAME} is missing next to {SNAPSHOT_NAME}; "
                    "the files were left as they are"
                )
            write_atomically(folder / JOURNAL_NAME, fmt.journal_header(0))
            return seen, 0, _open_journal(folder)
        journal_generation = _decoded(journal_path, fmt.decode_journal_header, journal)
        if journal_generation < generation:
            # A compaction stopped between its two renames: the snapshot holds it all.
            write_atomically(folder / JOURNAL_NAME, fmt.journal_header(generation))
            return seen, generation, _open_journal(folder)
        if journal_generation > generation:
            raise ReplayStoreError(
                f"replay store {folder}: {JOURNAL_NAME} has generation {journal_generation} but "
                f"{SNAPSHOT_NAME} has {generation} (missing or older snapshot) at offset 12; "
                "the files were left as they are"
            )
        batches, end = _decoded(journal_path, fmt.decode_batches, journal)
        for batch in batches:
            seen.apply(((serial, BitMap(new)) for serial, new in batch.additions), batch.stamp)
        fd = _open_journal(folder)
        if end != len(journal):
            os.ftruncate(fd, end)  # an unacknowledged tail: see the module docstring
            os.fsync(fd)
        return seen, generation, fd
    except OSError as exc:
        raise ReplayStoreError(f"replay store {folder}: {exc.strerror or exc}") from exc


def _decoded(path: Path, decode: Callable[[bytes], _T], data: bytes) -> _T:
    try:
        return decode(data)
    except FormatError as exc:
        raise ReplayStoreError(
            f"replay store file {path}: {exc}; the file was left as it is"
        ) from None


def _open_journal(folder: Path) -> int:
    return os.open(folder / JOURNAL_NAME, os.O_RDWR | os.O_CLOEXEC)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
