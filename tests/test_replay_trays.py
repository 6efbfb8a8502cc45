"""Local replay stores against a plain model, on batches shaped like a sorting centre's work,
and seen(): it answers like the model and changes nothing."""

from __future__ import annotations

import random
import sys
import threading
from array import array
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meter.errors import InvalidInput, ReplayStoreError
from meter.postoffice import EmbeddedReplayStore, MemoryReplayStore, Piece, replay_model
from meter.postoffice import replay as replay_module
from meter.postoffice import replay_format as fmt

DAY = date(2026, 11, 22)
CHUNK = 1 << fmt.CHUNK_BITS
JOURNAL = "journal.pimj"
SNAPSHOT = "snapshot.pimr"

Store = MemoryReplayStore | EmbeddedReplayStore
Key = tuple[int, int]


class Model:
    """What the stores promise, the slow way: a set of pieces and a date per chunk."""

    def __init__(self) -> None:
        self.recorded: set[Key] = set()
        self.latest: dict[tuple[int, int], int] = {}  # (serial, chunk): stamp

    def check_and_set(self, batch: list[Any]) -> list[bool]:
        flags, new = [], set()
        for serial, sequence, _ in batch:
            key = (serial, sequence)
            flags.append(key in self.recorded or key in new)
            new.add(key)
        new -= self.recorded
        if new:
            stamp = max(mailed for _, _, mailed in batch).toordinal()
            for serial, sequence in new:
                chunk = (serial, sequence // CHUNK)
                self.latest[chunk] = max(self.latest.get(chunk, stamp), stamp)
        self.recorded |= new
        return flags

    def seen(self, batch: list[Any]) -> list[bool]:
        return [(serial, sequence) in self.recorded for serial, sequence, _ in batch]

    def expire(self, today: date) -> int:
        cutoff = today.toordinal() - replay_module.FORGET_AFTER_DAYS
        old = {chunk for chunk, stamp in self.latest.items() if stamp < cutoff}
        dropped = {(s, q) for s, q in self.recorded if (s, q // CHUNK) in old}
        self.recorded -= dropped
        for chunk in old:
            del self.latest[chunk]
        return len(dropped)


class Centre:
    """Batches as a sorting centre sees them, from meters whose counters sit where the
    edges are: across chunk boundaries, at the top of the sequence space, serials 0 and
    2**64 - 1. Earlier trays come back (fed twice), and some pieces repeat in a batch."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        serials = [0, 2**64 - 1, *(self.rng.randrange(1, 2**64 - 1) for _ in range(14))]
        starts = [CHUNK * self.rng.randrange(1, 2**16) - self.rng.randrange(600) for _ in serials]
        starts[1] = 2**32 - 700  # runs up to the last sequence there is
        self.next = dict(zip(serials, starts, strict=True))
        self.weights = [self.rng.paretovariate(1.16) for _ in serials]
        self.weights[0] = self.weights[1] = max(self.weights)
        self.trays: list[list[Piece]] = []

    def tray(self, mailed: date) -> list[Piece]:
        rng = self.rng
        (serial,) = rng.choices(list(self.next), self.weights)
        start = self.next[serial]
        end = min(2**32, start + rng.randrange(1, 400))
        self.next[serial] = end if end < 2**32 else 2**32 - 700  # then it repeats itself
        tray = [Piece(serial, q, mailed) for q in range(start, end) if rng.random() >= 0.03]
        self.trays.append(tray)
        return tray

    def batch(self, shape: str, size: int = 3000) -> list[Any]:
        rng = self.rng
        mailed = DAY - timedelta(days=rng.randrange(0, 200))
        pieces: list[Any] = []
        while len(pieces) < size:
            draw = rng.random()
            if draw < 0.08 and self.trays:  # a tray of an earlier batch, fed again
                pieces.extend(rng.choice(self.trays))
            elif draw < 0.12 and pieces:  # a piece read twice
                pieces.append(rng.choice(pieces))
            else:
                pieces.extend(self.tray(mailed - timedelta(days=rng.randrange(3))))
        if shape == "one by one":
            rng.shuffle(pieces)
        elif shape == "trays, then one by one":
            tail = pieces[400:]
            rng.shuffle(tail)
            pieces[400:] = tail
        elif shape == "tuples":
            pieces = [tuple(piece) for piece in pieces]
        return pieces


SHAPES = ["trays", "one by one", "trays, then one by one", "tuples"]


def open_store(kind: str, path: Path) -> Store:
    return MemoryReplayStore() if kind == "memory" else EmbeddedReplayStore.open(path)


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_tray_batches_answer_as_the_model_does(kind: str, tmp_path: Path) -> None:
    centre, model = Centre(2026), Model()
    store = open_store(kind, tmp_path / "replay")
    repeats = forgotten = 0
    for number in range(32):
        batch = centre.batch(SHAPES[number % len(SHAPES)])
        asked = [*batch[:50], *centre.batch("trays", 200)[:50]]
        assert store.seen(asked) == model.seen(asked), number
        flags = model.check_and_set(batch)
        assert store.check_and_set(batch) == flags, number
        assert len(store) == len(model.recorded), number
        repeats += sum(flags)
        if number % 8 == 7:
            today = DAY + timedelta(days=30 * (number // 8))
            dropped = model.expire(today)
            assert store.expire(today) == dropped, number
            forgotten += dropped
    store.close()
    # The batches did meet what the model looks for.
    assert repeats > 1000
    assert forgotten > 1000
    assert any(q % CHUNK == 0 and (s, q - 1) in model.recorded for s, q in model.recorded)
    assert any(s == 2**64 - 1 and q >= 2**32 - 400 for s, q in model.recorded)
    assert any(s == 0 for s, _ in model.recorded)


def test_the_shapes_take_both_ways_of_grouping() -> None:
    """The model test above covers the grouping by runs and the one piece by piece."""
    centre = Centre(5)
    assert replay_model._in_runs(centre.batch("trays"))
    assert not replay_model._in_runs(centre.batch("one by one"))


def test_reopened_store_answers_the_same(tmp_path: Path) -> None:
    centre, model = Centre(77), Model()
    path = tmp_path / "replay"
    with EmbeddedReplayStore.open(path) as store:
        for number in range(12):
            batch = centre.batch(SHAPES[number % len(SHAPES)])
            assert store.check_and_set(batch) == model.check_and_set(batch)
            if number == 5:
                store.compact()  # half the batches in the snapshot, half in the journal
    recorded = [Piece(s, q, DAY) for s, q in sorted(model.recorded)]
    unrecorded = [Piece(s, (q + 1) % 2**32, DAY) for s, q in sorted(model.recorded)]
    asked = [*recorded, *unrecorded]
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == len(model.recorded)
        assert store.seen(asked) == model.seen(asked)
        for _ in range(4):
            batch = centre.batch("trays")
            assert store.check_and_set(batch) == model.check_and_set(batch)
    with EmbeddedReplayStore.open(path) as store:
        assert store.seen(asked) == model.seen(asked)
        assert all(store.seen(recorded))


def test_a_journal_record_is_the_same_bytes_from_lists_or_arrays() -> None:
    lists = [(5, [70_000, 3, 65_535]), (2**64 - 1, [2**32 - 1])]
    arrays = [(serial, array("I", sequences)) for serial, sequences in lists]
    record = fmt.encode_batch(lists, DAY.toordinal())
    assert fmt.encode_batch(arrays, DAY.toordinal()) == record
    batches, end = fmt.decode_batches(fmt.journal_header(0) + record)
    assert end == fmt.JOURNAL_HEADER_SIZE + len(record)
    assert [(s, list(q)) for s, q in batches[0].additions] == lists


# -- seen ------------------------------------------------------------------------------------


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_seen_looks_without_recording(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay")
    tray = [Piece(9, q, DAY) for q in range(CHUNK - 100, CHUNK + 100)]
    assert store.check_and_set(tray[::2]) == [False] * 100
    before = files(tmp_path / "replay") if kind == "embedded" else {}
    asked = [*tray, *tray[:3], Piece(8, CHUNK, DAY), Piece(9, CHUNK - 2, DAY - timedelta(90))]
    expected = [n % 2 == 0 for n in range(200)] + [True, False, True, False, True]
    assert store.seen(asked) == expected
    assert store.seen(asked) == expected  # asking twice records nothing either
    assert store.seen([]) == []
    assert len(store) == 100
    if kind == "embedded":
        assert files(tmp_path / "replay") == before  # no journal record, nothing written
    assert store.check_and_set(tray[1::2]) == [False] * 100
    assert store.seen(tray) == [True] * 200
    store.close()


BAD_FIELDS: list[Any] = [
    (-1, 1, DAY),
    (2**64, 1, DAY),
    (7, -1, DAY),
    (7, 2**32, DAY),
    (7, 1.0, DAY),
    (7.0, 1, DAY),  # equal to the serial 7 of the pieces around it: must not join device 7
    (Decimal(7), 1, DAY),
    ([7], 1, DAY),
    ("7", 1, DAY),
    (7, 1, "2026-11-22"),
    (7, 1, None),
]
# As plain tuples, and as Pieces (the type the batches of trays are grouped by runs for).
BAD: list[Any] = [
    *BAD_FIELDS,
    *(Piece(*fields) for fields in BAD_FIELDS),
    [7, 1, DAY],  # a list of three unpacks like a piece, but is not one
    (7, 1),
    (7, 1, DAY, 0),
    None,
]


@pytest.mark.parametrize("kind", ["memory", "embedded"])
@pytest.mark.parametrize("bad", BAD, ids=lambda bad: f"{type(bad).__name__}{bad!r}")
@pytest.mark.parametrize("where", [1, 300])
def test_a_bad_piece_is_named_by_seen_and_check_and_set_alike(
    kind: str, bad: Any, where: int, tmp_path: Path
) -> None:
    """After one piece, or deep inside a tray, where only the checks over the batch see it."""
    store = open_store(kind, tmp_path / "replay")
    tray: list[Any] = [Piece(7, q, DAY) for q in range(1000, 1400)]
    assert not any(store.check_and_set(tray[where + 1 :]))
    before = files(tmp_path / "replay") if kind == "embedded" else {}
    tray[where] = bad
    batch = tray[: where + 1] if where == 1 else tray
    messages = []
    for call in (store.seen, store.check_and_set):
        with pytest.raises(InvalidInput, match=rf"piece {where} .*no piece of the batch") as caught:
            call(batch)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert len(store) == 399 - where
    if kind == "embedded":
        assert files(tmp_path / "replay") == before
    assert store.seen([Piece(7, 1000, DAY)]) == [False]
    store.close()


def test_seen_on_a_closed_store_refuses(tmp_path: Path) -> None:
    store = EmbeddedReplayStore.open(tmp_path / "replay")
    store.close()
    for asked in ([Piece(1, 1, DAY)], []):
        with pytest.raises(ReplayStoreError, match="closed"):
            store.seen(asked)


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_seen_sees_a_batch_whole_or_not_at_all(kind: str, tmp_path: Path) -> None:
    """seen() takes the lock check_and_set holds from its check to its update."""
    store = open_store(kind, tmp_path / "replay")
    # Many devices a batch, so that its update takes many steps.
    batches = [
        [Piece(serial, q, DAY) for serial in range(2000) for q in range(n * 3, n * 3 + 3)]
        for n in range(15)
    ]
    answers: list[list[bool]] = []
    writing = [0]  # the batch check_and_set is recording: what the readers ask about
    done = threading.Event()

    def look() -> None:
        while not done.wait(0):  # a lock is not fair: let the writer in now and then
            answers.append(store.seen(batches[writing[0]]))

    readers = [threading.Thread(target=look) for _ in range(2)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns inside a batch's update, if they may
    for reader in readers:
        reader.start()
    try:
        for number, batch in enumerate(batches):
            writing[0] = number
            assert not any(store.check_and_set(batch))
    finally:
        done.set()
        for reader in readers:
            reader.join()
        sys.setswitchinterval(switching)
    assert {answer[0] for answer in answers} == {False, True}  # looked before and after
    assert all(len(set(answer)) == 1 for answer in answers)
    assert all(store.seen(batch) == [True] * 6000 for batch in batches)
    store.close()
