"""Local replay stores: semantics, expiry, durability, corruption and SIGKILL of the embedded folder."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from meter.errors import InvalidInput, ReplayStoreError
from meter.postoffice import EmbeddedReplayStore, MemoryReplayStore, Piece, open_replay_store
from meter.postoffice.replay_format import BATCH_HEADER_SIZE, JOURNAL_HEADER_SIZE

ROOT = Path(__file__).resolve().parents[1]
DAY = date(2026, 11, 22)
JOURNAL = "journal.pimj"
SNAPSHOT = "snapshot.pimr"

Store = MemoryReplayStore | EmbeddedReplayStore


def p(serial: int, sequence: int, mailed: date = DAY) -> Piece:
    return Piece(serial, sequence, mailed)


def open_store(kind: str, path: Path) -> Store:
    return MemoryReplayStore() if kind == "memory" else EmbeddedReplayStore.open(path)


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_check_and_set(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay")
    assert store.check_and_set([]) == []
    assert store.check_and_set([p(1, 1), p(1, 2), p(2, 1), p(1, 1)]) == [False, False, False, True]
    assert store.check_and_set([p(2, 1), p(2, 2), p(2**64 - 1, 2**32 - 1)]) == [True, False, False]
    assert store.check_and_set([p(2**64 - 1, 2**32 - 1), p(0, 0)]) == [True, False]
    # The same piece with another date of mailing is the same piece.
    assert store.check_and_set([p(1, 2, DAY - timedelta(days=90)), p(1, 70_000)]) == [True, False]
    assert len(store) == 7
    store.close()


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_repeats_inside_one_batch(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay")
    rng = random.Random(7)
    pieces = [
        p(rng.randrange(5), rng.randrange(40), DAY - timedelta(rng.randrange(3)))
        for _ in range(300)
    ]
    first: set[tuple[int, int]] = set()
    expected = []
    for piece in pieces:
        expected.append((piece.device_serial, piece.sequence) in first)
        first.add((piece.device_serial, piece.sequence))
    assert store.check_and_set(pieces) == expected
    assert store.check_and_set(pieces) == [True] * len(pieces)
    store.close()


BAD: list[Any] = [
    (-1, 1, DAY),
    (1, -1, DAY),
    (2**64, 1, DAY),
    (1, 2**32, DAY),
    (1, 1.0, DAY),
    (1.0, 1, DAY),
    ("1", 1, DAY),
    (1, 1, "2026-11-22"),
    (1, 1),
    (1, 1, DAY, 0),
    None,
]


@pytest.mark.parametrize("kind", ["memory", "embedded"])
@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_input_changes_nothing(kind: str, bad: Any, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay")
    store.check_and_set([p(9, 9)])
    journal = (tmp_path / "replay" / JOURNAL).read_bytes() if kind == "embedded" else b""
    with pytest.raises(InvalidInput, match=r"piece 1 .*no piece of the batch was recorded"):
        store.check_and_set([p(5, 5), bad, p(6, 6)])
    assert len(store) == 1
    if kind == "embedded":
        assert (tmp_path / "replay" / JOURNAL).read_bytes() == journal
    assert store.check_and_set([p(5, 5), p(6, 6), p(9, 9)]) == [False, False, True]
    store.close()


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([p(7, 1), p(7, 2), p(8, 1)]) == [False] * 3
        assert store.check_and_set([p(7, 2)]) == [True]
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == 3
        assert store.check_and_set([p(8, 1), p(7, 1), p(7, 3)]) == [True, True, False]
    reopened = open_replay_store(str(path))
    try:
        assert isinstance(reopened, EmbeddedReplayStore)
        assert reopened.check_and_set([p(7, 3)]) == [True]
    finally:
        reopened.close()


def test_only_new_pieces_are_written(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    with EmbeddedReplayStore.open(path) as store:
        store.check_and_set([p(1, 1), p(1, 1), p(1, 2)])
        size = (path / JOURNAL).stat().st_size
        assert store.check_and_set([p(1, 1), p(1, 2)]) == [True, True]
        assert (path / JOURNAL).stat().st_size == size


def test_one_process_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    with EmbeddedReplayStore.open(path):
        with pytest.raises(ReplayStoreError, match="in use by another process"):
            EmbeddedReplayStore.open(path)
        child = subprocess.run(
            [sys.executable, "-c", CHILD_OPEN, str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert "in use by another process" in child.stderr
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([p(1, 1)]) == [False]


CHILD_OPEN = """
import sys
from meter.postoffice import EmbeddedReplayStore
EmbeddedReplayStore.open(sys.argv[1])
"""


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = EmbeddedReplayStore.open(tmp_path / "replay")
    store.close()
    store.close()
    with pytest.raises(ReplayStoreError, match="closed"):
        store.check_and_set([p(1, 1)])


def test_a_file_where_the_folder_should_be(tmp_path: Path) -> None:
    path = tmp_path / "replay.log"
    path.write_bytes(b"PIMREPLY old format")
    with pytest.raises(ReplayStoreError, match="is not a folder"):
        EmbeddedReplayStore.open(path)
    assert path.read_bytes() == b"PIMREPLY old format"
    with pytest.raises(ReplayStoreError, match="cannot open"):
        EmbeddedReplayStore.open(tmp_path / "missing" / "replay")


# -- expiry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_expiry_forgets_only_what_can_no_longer_verify(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay")
    old, recent = DAY - timedelta(days=200), DAY - timedelta(days=10)
    # Device 1: chunk 0 last added to 200 days ago, chunk 1 ten days ago.
    store.check_and_set([p(1, n, old) for n in range(1, 101)])
    store.check_and_set([p(1, 65_536 + n, recent) for n in range(50)])
    # Device 2: its only chunk got an old piece and, later, a recent one: it stays.
    store.check_and_set([p(2, 5, old)])
    store.check_and_set([p(2, 6, recent)])
    assert store.expire(old + timedelta(days=183)) == 0  # V - D = 183: still verifiable
    assert store.expire(old + timedelta(days=184)) == 100
    assert len(store) == 52
    assert store.check_and_set([p(1, 1, DAY), p(1, 65_536, DAY), p(2, 5, DAY)]) == [
        False,
        True,
        True,
    ]
    store.close()
    if kind == "embedded":  # the files forgot too
        with EmbeddedReplayStore.open(tmp_path / "replay") as reopened:
            assert len(reopened) == 53
            assert reopened.check_and_set([p(1, 2, DAY)]) == [False]


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_expiry_never_forgets_a_piece_that_could_still_verify(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay")
    rng = random.Random(183)
    pieces: list[Piece] = []
    for round_number in range(60):
        today = DAY + timedelta(days=7 * round_number)
        batch = [
            p(rng.randrange(4), rng.randrange(2**18), today - timedelta(rng.randrange(-1, 190)))
            for _ in range(50)
        ]
        seen = store.check_and_set(batch)
        pieces.extend(piece for piece, old in zip(batch, seen, strict=True) if not old)
        store.expire(today)
        live = [q for q in pieces if (today - q.mailed).days <= 183]
        assert all(store.check_and_set(live)), round_number
    store.close()


# -- compaction -----------------------------------------------------------------------------------


def test_compaction_keeps_everything_and_starts_an_empty_journal(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    pieces = [p(serial, n) for serial in range(20) for n in range(0, 300_000, 7)]
    with EmbeddedReplayStore.open(path) as store:
        store.check_and_set(pieces)
        store.compact()
        assert (path / JOURNAL).stat().st_size == JOURNAL_HEADER_SIZE
        store.check_and_set([p(99, 1)])
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == len(pieces) + 1
        assert all(store.check_and_set([*pieces, p(99, 1)]))


def test_a_compaction_cut_between_its_renames(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    with EmbeddedReplayStore.open(path) as store:
        store.check_and_set([p(1, 1), p(1, 2)])
        old_journal = (path / JOURNAL).read_bytes()
        store.compact()
    (path / JOURNAL).write_bytes(old_journal)  # the new snapshot is there, the old journal too
    (path / f"{SNAPSHOT}.tmp").write_bytes(b"half a snapshot")
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([p(1, 1), p(1, 2), p(1, 3)]) == [True, True, False]
    assert not (path / f"{SNAPSHOT}.tmp").exists()
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([p(1, 3)]) == [True]


# -- torn tails and corruption --------------------------------------------------------------------


def filled(path: Path) -> tuple[bytes, int]:
    """A store with two batches; the journal's bytes and where its second batch starts."""
    with EmbeddedReplayStore.open(path) as store:
        store.check_and_set([p(100, n) for n in range(1, 11)])
        second = (path / JOURNAL).stat().st_size
        store.check_and_set([p(200, n) for n in range(1, 6)])
    return (path / JOURNAL).read_bytes(), second


@pytest.mark.parametrize(
    "cut", [1, BATCH_HEADER_SIZE - 1, BATCH_HEADER_SIZE, BATCH_HEADER_SIZE + 3, -1]
)
def test_a_torn_last_batch_is_dropped(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "replay"
    journal, second = filled(path)
    (path / JOURNAL).write_bytes(journal[: second + cut] if cut > 0 else journal[:cut])
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == 10
        assert (path / JOURNAL).stat().st_size == second
        assert store.check_and_set([p(100, 10), p(200, 1)]) == [True, False]
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([p(200, 1)]) == [True]


@pytest.mark.parametrize("zeros", [1, 7, BATCH_HEADER_SIZE, 4096 * 3])
def test_a_zero_filled_tail_is_dropped(tmp_path: Path, zeros: int) -> None:
    path = tmp_path / "replay"
    journal, _ = filled(path)
    (path / JOURNAL).write_bytes(journal + bytes(zeros))
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == 15
        assert (path / JOURNAL).stat().st_size == len(journal)


def test_a_last_batch_garbled_by_power_loss_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    journal, second = filled(path)
    garbled = bytearray(journal)
    garbled[second + BATCH_HEADER_SIZE :] = bytes(len(journal) - second - BATCH_HEADER_SIZE)
    (path / JOURNAL).write_bytes(bytes(garbled) + bytes(100))
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == 10


def corrupt(path: Path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    return bytes(data)


def refused(folder: Path, file: Path, match: str) -> None:
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    with pytest.raises(ReplayStoreError, match=match) as caught:
        EmbeddedReplayStore.open(folder)
    assert str(file) in str(caught.value)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


@pytest.mark.parametrize("where", ["first-header", "first-payload"])
def test_a_corrupt_batch_before_the_last_is_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "replay"
    filled(path)
    offset = JOURNAL_HEADER_SIZE + (2 if where == "first-header" else BATCH_HEADER_SIZE + 5)
    corrupt(path / JOURNAL, offset)
    what = "header is corrupt" if where == "first-header" else "fails its checksum"
    refused(path, path / JOURNAL, f"{what} at offset {JOURNAL_HEADER_SIZE}")


def test_a_corrupt_last_batch_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    _, second = filled(path)
    corrupt(path / JOURNAL, second + 6)
    refused(path, path / JOURNAL, f"header is corrupt at offset {second}")


@pytest.mark.parametrize("offset", [0, 9, 12, JOURNAL_HEADER_SIZE - 1])
def test_a_corrupt_journal_header_is_refused(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "replay"
    filled(path)
    corrupt(path / JOURNAL, offset)
    refused(path, path / JOURNAL, "journal.pimj: (bad magic|format version|journal header)")


def compacted(path: Path) -> bytes:
    filled(path)
    with EmbeddedReplayStore.open(path) as store:
        store.compact()
    return (path / SNAPSHOT).read_bytes()


@pytest.mark.parametrize(
    ("offset", "problem"),
    [
        (0, r"bad magic \(not a format 2 replay snapshot\) at offset 0"),
        (11, "snapshot header fails its checksum"),
        (20, "snapshot header fails its checksum"),
        (40, "snapshot payload fails its checksum at offset 36"),
        (-1, "snapshot payload fails its checksum at offset 36"),
    ],
)
def test_a_corrupt_snapshot_is_refused(tmp_path: Path, offset: int, problem: str) -> None:
    path = tmp_path / "replay"
    snapshot = compacted(path)
    corrupt(path / SNAPSHOT, offset % len(snapshot))
    refused(path, path / SNAPSHOT, problem)


@pytest.mark.parametrize("keep", [0, 20, 36, 50, -1])
def test_a_truncated_snapshot_is_refused(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "replay"
    snapshot = compacted(path)
    (path / SNAPSHOT).write_bytes(snapshot[:keep])
    refused(path, path / SNAPSHOT, "snapshot truncated")


def test_a_missing_journal_or_snapshot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    snapshot = compacted(path)
    (path / JOURNAL).unlink()
    refused(path, path, "journal.pimj is missing")
    with EmbeddedReplayStore.open(tmp_path / "other"):
        pass
    (path / SNAPSHOT).unlink()
    (path / JOURNAL).write_bytes((tmp_path / "other" / JOURNAL).read_bytes())
    (path / SNAPSHOT).write_bytes(snapshot)
    with EmbeddedReplayStore.open(path) as store:  # generation 0 journal, generation 1 snapshot
        assert len(store) == 15
    (path / SNAPSHOT).unlink()
    refused(path, path, "generation 1 but snapshot.pimr has 0")


# -- failures and crashes -------------------------------------------------------------------------

# The journal may not grow past its limit: the third batch crosses it and fails.
CHILD_FILE_TOO_BIG = """
import resource, signal, sys
from datetime import date
from meter.errors import ReplayStoreError
from meter.postoffice import EmbeddedReplayStore, Piece
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = date(2026, 11, 22)
store = EmbeddedReplayStore.open(sys.argv[1])
print(store.check_and_set([Piece(1, 1, d), Piece(1, 2, d)]))
print(store.check_and_set([Piece(1, 3, d)]))
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
for batch in ([Piece(2, n, d) for n in range(5000)], [Piece(3, 1, d)]):
    try:
        store.check_and_set(batch)
    except ReplayStoreError as exc:
        print(exc)
"""


def test_a_failed_write_takes_its_batch_back_and_stops_the_store(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    with EmbeddedReplayStore.open(tmp_path / "probe") as probe:  # the same first two batches
        probe.check_and_set([p(1, 1), p(1, 2)])
        probe.check_and_set([p(1, 3)])
    size = (tmp_path / "probe" / JOURNAL).stat().st_size
    child = subprocess.run(
        [sys.executable, "-c", CHILD_FILE_TOO_BIG, str(path), str(size + 40)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    lines = child.stdout.splitlines()
    assert lines[:2] == ["[False, False]", "[False]"]
    assert f"journal write at offset {size} failed: File too large" in lines[2]
    assert "reopen it before use" in lines[3]
    assert (path / JOURNAL).stat().st_size == size
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([p(1, 3), p(2, 1), p(3, 1)]) == [True, False, False]


# The child records random batches (compacting and expiring now and then) and prints each
# batch after check_and_set returned: a printed batch is an acknowledged one.
CHILD_RECORD = """
import json, random, sys
from datetime import date, timedelta
from meter.postoffice import EmbeddedReplayStore, Piece
store = EmbeddedReplayStore.open(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
today = date(2026, 11, 22)
print("open", flush=True)
for n in range(10**9):
    batch = [
        Piece(rng.randrange(1, 50), rng.randrange(1, 2**32), today - timedelta(rng.randrange(0, 30)))
        for _ in range(rng.randrange(1, 2000))
    ]
    store.check_and_set(batch)
    print(json.dumps([(s, q) for s, q, _ in batch]), flush=True)
    if n % 7 == 6:
        store.compact()
    if n % 11 == 10:
        store.expire(today)
"""


def test_sigkill_loses_no_acknowledged_piece(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    rng = random.Random(4242)
    acknowledged: list[Piece] = []
    for round_number in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_RECORD, str(path), str(round_number)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"open\n"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        output = child.stdout.read()
        child.wait()
        assert child.returncode == -signal.SIGKILL
        for line in output.split(b"\n")[:-1]:  # the last one may be cut short: not acknowledged
            acknowledged.extend(p(s, q) for s, q in json.loads(line))
        with EmbeddedReplayStore.open(path) as store:
            assert all(store.check_and_set(acknowledged))
            assert len(store) >= len({(x.device_serial, x.sequence) for x in acknowledged})
    assert len(acknowledged) > 1000
