"""What a replay store is asked, and the in-memory model both embedded stores keep.

A piece is (device serial, sequence, date of mailing). The model holds one
compressed bitmap of sequences per device, with, per chunk of 2**16
sequences, the latest date of mailing of any batch that added to it (see
``replay.py`` for the stores and their files). Batches are validated here,
grouped by device (by runs, for batches that arrive in trays), and checked
and applied with one bitmap per device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from itertools import compress, count, groupby, islice
from operator import itemgetter, ne
from typing import NamedTuple, Protocol

from pyroaring import AbstractBitMap, BitMap, FrozenBitMap

from meter.errors import InvalidInput
from meter.postoffice.replay_format import CHUNK_BITS, DeviceState

FORGET_AFTER_DAYS = 183  # spec, Verdicts: EXPIRED once V - D > 183 days
MAX_SERIAL = 2**64
MAX_SEQUENCE = 2**32


class Piece(NamedTuple):
    """What the replay check looks at in an indicium."""

    device_serial: int  # 0 <= x < 2**64
    sequence: int  # 0 <= x < 2**32
    mailed: date  # the date of mailing


class ReplayStore(Protocol):
    """Check-and-set over piece identities, one call per batch."""

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        """For each piece in order, True if seen before (earlier in this batch
        included); every new piece is recorded durably before this returns."""
        ...

    def seen(self, pieces: Sequence[Piece]) -> list[bool]:
        """For each piece, True if it is recorded; records nothing (a piece asked about
        twice gets the same answer twice). Bad pieces raise as in check_and_set."""
        ...

    def expire(self, today: date) -> int:
        """Forget pieces mailed more than 183 days before today; how many (0 if unknowable)."""
        ...

    def close(self) -> None: ...


def validate_pieces(pieces: Sequence[Piece]) -> date:
    """InvalidInput naming the first bad piece; the latest date of mailing if all are good.

    The slow, exact check: stores run it when their fast checks find something odd.
    """
    latest: date | None = None
    for index, piece in enumerate(pieces):
        problem = _piece_problem(piece)
        if problem is not None:
            raise InvalidInput(
                f"piece {index} ({piece!r}): {problem}; no piece of the batch was recorded"
            )
        mailed = piece[2]
        if latest is None or mailed > latest:
            latest = mailed
    if latest is None:
        raise InvalidInput("an empty batch has no date of mailing")
    return latest


def latest_mailing(pieces: Sequence[Piece]) -> date:
    """The latest date of mailing of a non-empty batch (InvalidInput if one is not a date)."""
    try:
        dates = set(map(_MAILED, pieces))
        latest: date = max(dates)
    except (TypeError, ValueError, IndexError, KeyError):
        return validate_pieces(pieces)
    if not all(isinstance(d, date) for d in dates):
        return validate_pieces(pieces)
    return latest


def _piece_problem(piece: object) -> str | None:
    if not isinstance(piece, tuple) or len(piece) != 3:
        return "not a (device serial, sequence, date of mailing) piece"
    serial, sequence, mailed = piece
    if not isinstance(serial, int) or not 0 <= serial < MAX_SERIAL:
        return "device serial must be an integer 0 <= serial < 2**64"
    if not isinstance(sequence, int) or not 0 <= sequence < MAX_SEQUENCE:
        return "piece sequence must be an integer 0 <= sequence < 2**32"
    if not isinstance(mailed, date):
        return "date of mailing must be a date"
    return None


_SERIAL = itemgetter(0)
_SEQUENCE = itemgetter(1)
_MAILED = itemgetter(2)
_INT = {int}
_CHUNK = 1 << CHUNK_BITS


class _Group(NamedTuple):
    """One device's pieces in a batch."""

    serial: int
    sequences: list[int]  # in the batch's order, repeats kept
    bitmap: BitMap  # the same sequences


@dataclass
class _Batch:
    """What check_and_set decided before anything is recorded."""

    seen: list[bool]
    additions: list[tuple[int, BitMap]]  # (serial, its sequences new to the store)
    stamp: int  # ordinal of the latest date of mailing in the batch


class _SeenPieces:
    """The pieces of every device, and per chunk of sequences the latest date of mailing.

    A batch costs a few passes in C over its pieces, the grouping by device (a step in
    Python per run of one device's pieces, or per piece when they come one by one),
    and per device a handful of calls into CRoaring: a bitmap of its sequences (built
    once, then used for the check, the journal and the update), one intersection, one
    in-place union. Only devices whose pieces meet what is stored, or repeat inside the
    batch, are walked piece by piece.
    """

    def __init__(self, devices: dict[int, DeviceState] | None = None) -> None:
        self.devices: dict[int, DeviceState] = devices if devices is not None else {}

    def plan(self, pieces: Sequence[Piece]) -> _Batch:
        """Flags and additions for a non-empty batch, checking it whole first; changes nothing."""
        groups, stamp = _checked_groups(pieces)
        devices = self.devices
        additions: list[tuple[int, BitMap]] = []
        hits: dict[int, AbstractBitMap] = {}  # serial: what is stored of it
        for serial, sequences, new in groups:
            device = devices.get(serial)
            if len(new) != len(sequences) or (device is not None and device.bitmap.intersect(new)):
                hits[serial] = device.bitmap if device is not None else _EMPTY
            else:
                additions.append((serial, new))
        seen = [False] * len(pieces)
        if hits:
            fresh = {serial: BitMap() for serial in hits}
            for index, serial, sequence in _pieces_of(pieces, hits):
                new = fresh[serial]
                if sequence in new or sequence in hits[serial]:
                    seen[index] = True
                else:
                    new.add(sequence)
            for serial, new in fresh.items():
                if new:
                    new.run_optimize()
                    additions.append((serial, new))
        return _Batch(seen, additions, stamp)

    def lookup(self, pieces: Sequence[Piece]) -> list[bool]:
        """For each piece of a non-empty batch, whether it is recorded; changes nothing."""
        groups, _ = _checked_groups(pieces)
        devices = self.devices
        hits: dict[int, AbstractBitMap] = {}
        for serial, _, asked in groups:
            device = devices.get(serial)
            if device is not None and device.bitmap.intersect(asked):
                hits[serial] = device.bitmap
        seen = [False] * len(pieces)
        for index, serial, sequence in _pieces_of(pieces, hits):
            seen[index] = sequence in hits[serial]
        return seen

    def apply(self, additions: Iterable[tuple[int, BitMap]], stamp: int) -> None:
        devices = self.devices
        for serial, new in additions:
            if not new:
                continue
            device = devices.get(serial)
            if device is None:
                device = devices[serial] = DeviceState(BitMap(), {})
            device.bitmap |= new
            latest = device.latest
            for chunk in _chunks(new):
                if latest.get(chunk, -1) < stamp:
                    latest[chunk] = stamp

    def expire(self, today: date) -> int:
        """Drop the chunks last added to by pieces mailed before the window; how many pieces."""
        cutoff = today.toordinal() - FORGET_AFTER_DAYS
        dropped = 0
        for serial, device in list(self.devices.items()):
            for chunk in [c for c, mailed in device.latest.items() if mailed < cutoff]:
                start = chunk << CHUNK_BITS
                dropped += device.bitmap.range_cardinality(start, start + _CHUNK)
                device.bitmap.remove_range(start, start + _CHUNK)
                del device.latest[chunk]
            if not device.latest:
                del self.devices[serial]
        return dropped

    def __len__(self) -> int:
        return sum(len(device.bitmap) for device in self.devices.values())


_EMPTY = FrozenBitMap()  # what is stored of a device the store does not know


def _checked_groups(pieces: Sequence[Piece]) -> tuple[list[_Group], int]:
    """The pieces grouped by device, and the batch's stamp; InvalidInput for a bad piece.

    The fast checks are exact (a check in C over the whole batch where one per device
    would miss something, e.g. a serial 7.0 next to a 7, which would join device 7);
    whatever they find odd, validate_pieces then names.
    """
    by_serial: defaultdict[int, list[int]] = defaultdict(list)
    kinds = set(map(type, pieces))
    try:
        if kinds == _PIECE and _in_runs(pieces):
            # Trays: a step in Python per run of one device's pieces, the rest in C.
            for serial, run in groupby(pieces, _SERIAL):
                by_serial[serial].extend(map(_SEQUENCE, run))
        else:
            if not kinds <= _PIECE_TYPES:
                validate_pieces(pieces)  # e.g. a list of three, which unpacks like a piece
            for serial, sequence, _ in pieces:
                by_serial[serial].append(sequence)
    except (TypeError, ValueError):
        validate_pieces(pieces)
        raise  # validate_pieces found nothing wrong: a bug, not bad input
    if not set(map(type, map(_SERIAL, pieces))) <= _INT:
        validate_pieces(pieces)
    stamp = latest_mailing(pieces).toordinal()
    groups: list[_Group] = []
    for serial, sequences in by_serial.items():
        if not 0 <= serial < MAX_SERIAL:
            validate_pieces(pieces)
        if not set(map(type, sequences)) <= _INT:
            validate_pieces(pieces)  # BitMap would truncate a float
        try:
            bitmap = BitMap(sequences)  # runs of consecutive sequences become run containers
        except (OverflowError, TypeError):
            validate_pieces(pieces)
            raise
        groups.append(_Group(serial, sequences, bitmap))
    return groups, stamp


_PIECE = {Piece}
_PIECE_TYPES = {Piece, tuple}
_PROBE = 256  # pieces looked at to tell trays from pieces one by one
_LONG_RUN = 8  # pieces of one device in a row, on average, for grouping by runs to pay


def _in_runs(pieces: Sequence[Piece]) -> bool:
    """Whether the batch's first pieces come in runs of one device (the grouping is the
    same either way; only its speed differs)."""
    head = list(map(_SERIAL, islice(pieces, _PROBE)))
    changes: int = sum(map(ne, head, islice(head, 1, None)))
    return changes * _LONG_RUN <= len(head)


def _pieces_of(
    pieces: Sequence[Piece], serials: dict[int, AbstractBitMap]
) -> Iterator[tuple[int, int, int]]:
    """(index, serial, sequence) of the pieces of these devices, in order.

    The search for them runs in C: only their pieces cost a step in Python.
    """
    if not serials:
        return
    column = list(map(_SERIAL, pieces))
    for index in compress(count(), map(serials.__contains__, column)):
        yield index, column[index], pieces[index][1]


def _chunks(bitmap: BitMap) -> list[int]:
    """The chunks a non-empty bitmap has sequences in: one step per chunk, not per sequence."""
    last = bitmap.max()
    chunks = [bitmap.min() >> CHUNK_BITS]
    while (start := (chunks[-1] + 1) << CHUNK_BITS) <= last:
        chunks.append(bitmap.next_set_bit(start) >> CHUNK_BITS)
    return chunks
