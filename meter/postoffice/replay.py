"""Replay stores: has this (device serial, piece sequence) been accepted before?

The embedded store is one append-only file, big-endian throughout: a 16-byte
header (magic "PIMREPLY", format version u16, record size u16, reserved u32
zero), then 16-byte records (device serial u64, piece sequence u32, CRC-32
of those 12 bytes u32). In memory, one 32-bit bitmap per device. Each batch is written and fsync'ed before check_and_set
returns, so an acknowledged piece survives any crash; a crash mid-write can
leave only a partial last record, which belongs to a batch that was never
acknowledged and is dropped on open. Anything else that does not check out
is corruption: the store refuses to open and leaves the file as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from pyroaring import BitMap

from meter.errors import InvalidInput, ReplayStoreError

Piece = tuple[int, int]  # (device serial, piece sequence)


class ReplayStore(Protocol):
    """Check-and-set over piece identities, one call per batch."""

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        """For each piece in order, True if seen before (earlier in this batch
        included); every piece is recorded durably before this returns."""
        ...

    def close(self) -> None: ...


class _SeenPieces:
    """One 32-bit bitmap of sequences per device serial."""

    def __init__(self) -> None:
        self._by_device: dict[int, BitMap] = {}

    def lookup(self, pieces: Sequence[Piece]) -> tuple[list[bool], list[Piece]]:
        """Flags as check_and_set returns them, and the pieces new to the store."""
        seen: list[bool] = []
        new: list[Piece] = []
        fresh: set[Piece] = set()
        for piece in pieces:
            serial, sequence = piece
            if not (0 <= serial < 2**64 and 0 <= sequence < 2**32):
                raise InvalidInput(f"piece {piece!r} is not (8-byte serial, 4-byte sequence)")
            bitmap = self._by_device.get(serial)
            old = (bitmap is not None and sequence in bitmap) or piece in fresh
            seen.append(old)
            if not old:
                fresh.add(piece)
                new.append(piece)
        return seen, new

    def add(self, pieces: Sequence[Piece]) -> None:
        for serial, sequence in pieces:
            bitmap = self._by_device.get(serial)
            if bitmap is None:
                bitmap = self._by_device[serial] = BitMap()
            bitmap.add(sequence)

    def __len__(self) -> int:
        return sum(len(bitmap) for bitmap in self._by_device.values())


class _Store:
    """What both stores share: a piece count and closing as a context manager."""

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

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        seen, new = self._seen.lookup(pieces)
        self._seen.add(new)
        return seen

    def close(self) -> None:
        pass


_MAGIC = b"PIMREPLY"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHHI")  # magic, format version, record size, reserved (0)
_KEY = struct.Struct(">QI")  # device serial, piece sequence
_RECORD = struct.Struct(">QII")  # ... and CRC-32 of the 12 bytes before it
_HEADER_BYTES = _HEADER.pack(_MAGIC, FORMAT_VERSION, _RECORD.size, 0)
_READ_CHUNK = _RECORD.size * 65536


class EmbeddedReplayStore(_Store):
    """One crash-safe file, held by one process at a time (flock)."""

    def __init__(self, path: Path, fd: int, seen: _SeenPieces, end: int) -> None:
        """Use open(): it locks, checks and loads the file."""
        self._path = path
        self._fd: int | None = fd
        self._seen = seen
        self._end = end  # file size after the last acknowledged batch
        self._failure: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> EmbeddedReplayStore:
        """Open or create the store file; ReplayStoreError if locked or corrupt."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ReplayStoreError(f"replay store {path}: cannot open: {exc.strerror}") from exc
        try:
            _lock(path, fd)
            seen, end = _load(path, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, seen, end)

    @property
    def path(self) -> Path:
        return self._path

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        with self._lock:
            fd = self._usable_fd()
            seen, new = self._seen.lookup(pieces)
            if new:
                records = b"".join(_record(serial, sequence) for serial, sequence in new)
                try:
                    _write_all(fd, records, self._end)
                    os.fdatasync(fd)
                except OSError as exc:
                    # After a failed write or fsync the kernel may have dropped
                    # pages: trust nothing until the file is opened anew. The
                    # batch was not acknowledged, so take back what it wrote.
                    self._failure = f"write at offset {self._end} failed: {exc.strerror}"
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, self._end)
                    raise ReplayStoreError(f"replay store {self._path}: {self._failure}") from exc
                self._end += len(records)
                self._seen.add(new)
            return seen

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # also releases the flock
                self._fd = None

    def _usable_fd(self) -> int:
        if self._fd is None:
            raise ReplayStoreError(f"replay store {self._path} is closed")
        if self._failure is not None:
            raise ReplayStoreError(
                f"replay store {self._path}: {self._failure}; reopen it before use"
            )
        return self._fd


def _lock(path: Path, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ReplayStoreError(f"replay store {path} is in use by another process") from None
    except OSError as exc:
        raise ReplayStoreError(f"replay store {path}: cannot lock: {exc.strerror}") from exc


def _record(serial: int, sequence: int) -> bytes:
    key = _KEY.pack(serial, sequence)
    return key + zlib.crc32(key).to_bytes(4)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _load(path: Path, fd: int) -> tuple[_SeenPieces, int]:
    """Check the header and every record; returns the pieces and the end offset."""
    try:
        size = os.fstat(fd).st_size
        if size < _HEADER.size:
            _initialize(path, fd, size)
            return _SeenPieces(), _HEADER.size
        header = os.pread(fd, _HEADER.size, 0)
        if header != _HEADER_BYTES:
            raise ReplayStoreError(
                f"replay store {path}: bad header at offset 0 (not a version "
                f"{FORMAT_VERSION} replay store); the file was left as it is"
            )
        seen = _SeenPieces()
        whole_end = size - (size - _HEADER.size) % _RECORD.size
        offset = _HEADER.size
        while offset < whole_end:
            chunk = os.pread(fd, min(_READ_CHUNK, whole_end - offset), offset)
            if len(chunk) % _RECORD.size:
                raise ReplayStoreError(f"replay store {path}: short read at offset {offset}")
            pieces = []
            for index, (serial, sequence, checksum) in enumerate(_RECORD.iter_unpack(chunk)):
                start = index * _RECORD.size
                if zlib.crc32(chunk[start : start + _KEY.size]) != checksum:
                    raise ReplayStoreError(
                        f"replay store {path}: record at offset {offset + start} fails its "
                        "checksum; the file was left as it is"
                    )
                pieces.append((serial, sequence))
            seen.add(pieces)
            offset += len(chunk)
        if whole_end != size:
            # A partial last record: the batch it began was never acknowledged.
            os.ftruncate(fd, whole_end)
            os.fsync(fd)
        return seen, whole_end
    except OSError as exc:
        raise ReplayStoreError(f"replay store {path}: {exc.strerror or exc}") from exc


def _initialize(path: Path, fd: int, size: int) -> None:
    """Write the header of a new file, or of one whose creation a crash cut short."""
    if os.pread(fd, size, 0) != _HEADER_BYTES[:size]:
        raise ReplayStoreError(
            f"replay store {path}: bad header at offset 0 ({size} bytes); "
            "the file was left as it is"
        )
    _write_all(fd, _HEADER_BYTES[size:], size)
    os.fsync(fd)
    # Make the new file's directory entry durable too.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
