"""Bytes of the embedded replay store: its snapshot and its journal (layouts in replay.py).

Pure functions over bytes. A check that fails raises FormatError with the
offset in the file where the bad part starts; the store adds the file's name.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from pyroaring import BitMap

FORMAT_VERSION = 2
CHUNK_BITS = 16  # one roaring container: 65,536 sequences share one "latest date of mailing"

SNAPSHOT_MAGIC = b"PIMSNAP2"
JOURNAL_MAGIC = b"PIMJRNL2"
BATCH_MAGIC = b"PIMB"

# magic, format version, chunk bits, generation, payload length, payload CRC-32; then the
# CRC-32 of those 32 bytes.
_SNAPSHOT_HEAD = struct.Struct("<8sHHQQI")
SNAPSHOT_HEADER_SIZE = _SNAPSHOT_HEAD.size + 4
# magic, format version, chunk bits, generation; then the CRC-32 of those 20 bytes.
_JOURNAL_HEAD = struct.Struct("<8sHHQ")
JOURNAL_HEADER_SIZE = _JOURNAL_HEAD.size + 4
# magic, payload length, stamp (ordinal of the latest date of mailing), payload CRC-32;
# then the CRC-32 of those 16 bytes.
_BATCH_HEAD = struct.Struct("<4sIII")
BATCH_HEADER_SIZE = _BATCH_HEAD.size + 4
_DEVICE = struct.Struct("<QII")  # snapshot entry: serial, chunk count, bitmap bytes
_COUNT = struct.Struct("<I")
_CRC = struct.Struct("<I")


class FormatError(Exception):
    """Bytes that do not check out, at an offset in their file."""

    def __init__(self, offset: int, problem: str) -> None:
        super().__init__(f"{problem} at offset {offset}")
        self.offset = offset


@dataclass
class DeviceState:
    """One device: the sequences seen, and per chunk the latest date of mailing (ordinal)."""

    bitmap: BitMap
    latest: dict[int, int]


def _sealed(head: bytes) -> bytes:
    return head + _CRC.pack(zlib.crc32(head))


def _unseal(data: bytes, size: int, what: str) -> bytes:
    head, (checksum,) = data[: size - 4], _CRC.unpack_from(data, size - 4)
    if zlib.crc32(head) != checksum:
        raise FormatError(0, f"{what} header fails its checksum")
    return head


# -- snapshot ---------------------------------------------------------------------------------


def encode_snapshot(devices: dict[int, DeviceState], generation: int) -> bytes:
    parts: list[bytes] = []
    for serial, device in devices.items():
        device.bitmap.run_optimize()
        blob = device.bitmap.serialize()
        chunks = sorted(device.latest)
        parts.append(_DEVICE.pack(serial, len(chunks), len(blob)))
        parts.append(struct.pack(f"<{len(chunks)}H", *chunks))
        parts.append(struct.pack(f"<{len(chunks)}I", *(device.latest[c] for c in chunks)))
        parts.append(blob)
    payload = b"".join(parts)
    head = _SNAPSHOT_HEAD.pack(
        SNAPSHOT_MAGIC, FORMAT_VERSION, CHUNK_BITS, generation, len(payload), zlib.crc32(payload)
    )
    return _sealed(head) + payload


def decode_snapshot(data: bytes) -> tuple[int, dict[int, DeviceState]]:
    """(generation, devices) of a whole snapshot file."""
    if len(data) < SNAPSHOT_HEADER_SIZE:
        raise FormatError(
            len(data), f"snapshot truncated: header needs {SNAPSHOT_HEADER_SIZE} bytes"
        )
    if data[:8] != SNAPSHOT_MAGIC:
        raise FormatError(0, f"bad magic (not a format {FORMAT_VERSION} replay snapshot)")
    head = _unseal(data, SNAPSHOT_HEADER_SIZE, "snapshot")
    _, version, chunk_bits, generation, length, checksum = _SNAPSHOT_HEAD.unpack(head)
    _check_version(version, chunk_bits)
    end = SNAPSHOT_HEADER_SIZE + length
    if len(data) < end:
        raise FormatError(len(data), f"snapshot truncated: payload ends at {end}")
    if len(data) > end:
        raise FormatError(end, "unexpected bytes after the snapshot payload")
    payload = memoryview(data)[SNAPSHOT_HEADER_SIZE:end]
    if zlib.crc32(payload) != checksum:
        raise FormatError(SNAPSHOT_HEADER_SIZE, "snapshot payload fails its checksum")
    devices: dict[int, DeviceState] = {}
    at = 0
    try:
        while at < length:
            serial, count, size = _DEVICE.unpack_from(payload, at)
            at += _DEVICE.size
            chunks = struct.unpack_from(f"<{count}H", payload, at)
            at += 2 * count
            dates = struct.unpack_from(f"<{count}I", payload, at)
            at += 4 * count
            if at + size > length or serial in devices:
                raise ValueError("entry overruns the payload or repeats a device")
            bitmap = BitMap.deserialize(bytes(payload[at : at + size]))
            at += size
            devices[serial] = DeviceState(bitmap, dict(zip(chunks, dates, strict=True)))
    except (struct.error, ValueError) as exc:
        raise FormatError(SNAPSHOT_HEADER_SIZE + at, f"bad snapshot entry ({exc})") from None
    return generation, devices


# -- journal ----------------------------------------------------------------------------------


def journal_header(generation: int) -> bytes:
    return _sealed(_JOURNAL_HEAD.pack(JOURNAL_MAGIC, FORMAT_VERSION, CHUNK_BITS, generation))


def decode_journal_header(data: bytes) -> int:
    """The generation of a journal whose first bytes are data."""
    if len(data) < JOURNAL_HEADER_SIZE:
        raise FormatError(len(data), f"journal truncated: header needs {JOURNAL_HEADER_SIZE} bytes")
    if data[:8] != JOURNAL_MAGIC:
        raise FormatError(0, f"bad magic (not a format {FORMAT_VERSION} replay journal)")
    _, version, chunk_bits, generation = _JOURNAL_HEAD.unpack(
        _unseal(data, JOURNAL_HEADER_SIZE, "journal")
    )
    _check_version(version, chunk_bits)
    return int(generation)


def encode_batch(additions: Sequence[tuple[int, Sequence[int]]], stamp: int) -> bytes:
    """Group count u32, the groups' serials (u64 each), their piece counts (u32 each), then
    every group's sequences (u32 each), little-endian: packed in C, whatever the batch
    (sequences given as array("I") are copied whole, a step per group, not per piece)."""
    serials = array("Q", [serial for serial, _ in additions])
    counts = array("I", [len(sequences) for _, sequences in additions])
    flat = array("I")
    for _, sequences in additions:
        flat.extend(sequences)
    payload = b"".join(
        [_COUNT.pack(len(additions)), _little(serials), _little(counts), _little(flat)]
    )
    return (
        _sealed(_BATCH_HEAD.pack(BATCH_MAGIC, len(payload), stamp, zlib.crc32(payload))) + payload
    )


@dataclass
class JournalBatch:
    offset: int
    stamp: int
    additions: list[tuple[int, Sequence[int]]]


def decode_batches(data: bytes) -> tuple[list[JournalBatch], int]:
    """The batches after the header, and the offset where the acknowledged journal ends.

    What follows that offset was never acknowledged and may be dropped: a torn
    last batch (cut short, or complete in length but failing its checksum with
    nothing but zeros after it) or an all-zero tail left by a power loss.
    Anything else that does not check out raises FormatError.
    """
    view = memoryview(data)
    batches: list[JournalBatch] = []
    at = JOURNAL_HEADER_SIZE
    while at < len(data):
        rest = view[at:]
        if not any(rest):  # an all-zero tail: file size extended, data never written
            break
        if len(rest) < BATCH_HEADER_SIZE:
            break  # a torn header
        if bytes(rest[:4]) != BATCH_MAGIC or zlib.crc32(rest[:16]) != _CRC.unpack_from(rest, 16)[0]:
            raise FormatError(at, "journal batch header is corrupt")
        _, length, stamp, checksum = _BATCH_HEAD.unpack_from(rest)
        end = BATCH_HEADER_SIZE + length
        if end > len(rest):
            break  # cut short: never acknowledged
        payload = rest[BATCH_HEADER_SIZE:end]
        if zlib.crc32(payload) != checksum:
            if not any(rest[end:]):
                break  # the last batch, garbled by a power loss before its fdatasync returned
            raise FormatError(at, "journal batch fails its checksum")
        try:
            additions = _additions(payload)
        except (struct.error, ValueError) as exc:
            raise FormatError(at, f"bad journal batch ({exc})") from None
        batches.append(JournalBatch(at, stamp, additions))
        at += end
    return batches, at


def _additions(payload: memoryview) -> list[tuple[int, Sequence[int]]]:
    (groups,) = _COUNT.unpack_from(payload)
    serials, counts, flat = array("Q"), array("I"), array("I")
    at = _COUNT.size
    serials.frombytes(payload[at : at + 8 * groups])
    at += 8 * groups
    counts.frombytes(payload[at : at + 4 * groups])
    at += 4 * groups
    if len(counts) != groups or at + 4 * sum(counts) != len(payload):
        raise ValueError("group counts do not match the batch's length")
    flat.frombytes(payload[at:])
    if sys.byteorder == "big":
        for part in (serials, counts, flat):
            part.byteswap()
    additions: list[tuple[int, Sequence[int]]] = []
    at = 0
    for serial, count in zip(serials, counts, strict=True):
        additions.append((serial, flat[at : at + count]))
        at += count
    return additions


def _little(numbers: array[int]) -> bytes:
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tobytes()


def _check_version(version: int, chunk_bits: int) -> None:
    if version != FORMAT_VERSION or chunk_bits != CHUNK_BITS:
        raise FormatError(
            8,
            f"format version {version} with {chunk_bits}-bit chunks (this program reads "
            f"version {FORMAT_VERSION} with {CHUNK_BITS}-bit chunks)",
        )
