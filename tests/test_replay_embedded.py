"""Replay stores: semantics, durability, corruption and crashes (SIGKILL) of the embedded file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meter.errors import InvalidInput, ReplayStoreError
from meter.postoffice import EmbeddedReplayStore, MemoryReplayStore, ReplayStore

HEADER = 16
RECORD = 16
ROOT = Path(__file__).resolve().parents[1]


def open_store(kind: str, path: Path) -> ReplayStore:
    if kind == "memory":
        return MemoryReplayStore()
    return EmbeddedReplayStore.open(path)


@pytest.mark.parametrize("kind", ["memory", "embedded"])
def test_check_and_set(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path / "replay.store")
    assert store.check_and_set([]) == []
    assert store.check_and_set([(1, 1), (1, 2), (2, 1), (1, 1)]) == [False, False, False, True]
    assert store.check_and_set([(2, 1), (2, 2), (2**64 - 1, 2**32 - 1)]) == [True, False, False]
    assert store.check_and_set([(2**64 - 1, 2**32 - 1), (0, 0)]) == [True, False]
    for bad in [(-1, 1), (1, -1), (2**64, 1), (1, 2**32)]:
        with pytest.raises(InvalidInput, match="piece"):
            store.check_and_set([(5, 5), bad])
    assert store.check_and_set([(5, 5)]) == [False]  # the refused batch recorded nothing
    store.close()


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([(7, 1), (7, 2), (8, 1)]) == [False] * 3
        assert store.check_and_set([(7, 2)]) == [True]
        assert len(store) == 3
    assert path.stat().st_size == HEADER + 3 * RECORD
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == 3
        assert store.check_and_set([(8, 1), (7, 1), (7, 3)]) == [True, True, False]
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([(7, 3)]) == [True]


def test_only_new_pieces_are_written(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
    with EmbeddedReplayStore.open(path) as store:
        store.check_and_set([(1, 1), (1, 1), (1, 2)])
        store.check_and_set([(1, 1), (1, 2)])
    assert path.stat().st_size == HEADER + 2 * RECORD


def test_one_process_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
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
        assert store.check_and_set([(1, 1)]) == [False]


CHILD_OPEN = """
import sys
from pathlib import Path
from meter.postoffice import EmbeddedReplayStore
EmbeddedReplayStore.open(Path(sys.argv[1]))
"""


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = EmbeddedReplayStore.open(tmp_path / "replay.store")
    store.close()
    store.close()
    with pytest.raises(ReplayStoreError, match="closed"):
        store.check_and_set([(1, 1)])


def filled(path: Path, pieces: int = 10) -> bytes:
    with EmbeddedReplayStore.open(path) as store:
        store.check_and_set([(100, n) for n in range(1, pieces + 1)])
    return path.read_bytes()


@pytest.mark.parametrize("extra", [1, 8, RECORD - 1])
def test_torn_last_record_is_dropped(tmp_path: Path, extra: int) -> None:
    path = tmp_path / "replay.store"
    whole = filled(path)
    path.write_bytes(whole + os.urandom(extra))
    with EmbeddedReplayStore.open(path) as store:
        assert len(store) == 10
        assert path.stat().st_size == len(whole)
        assert store.check_and_set([(100, 10), (100, 11)]) == [True, False]
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([(100, 11)]) == [True]


@pytest.mark.parametrize(
    "offset", [HEADER, HEADER + 5, HEADER + 4 * RECORD + 13, HEADER + 10 * RECORD - 1]
)
def test_corrupt_record_is_refused_and_left_alone(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "replay.store"
    data = bytearray(filled(path))
    data[offset] ^= 0x01
    path.write_bytes(bytes(data) + b"\x00" * 3)  # a torn tail too: still untouched
    record = HEADER + (offset - HEADER) // RECORD * RECORD
    with pytest.raises(
        ReplayStoreError, match=f"record at offset {record} fails its checksum"
    ) as caught:
        EmbeddedReplayStore.open(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == bytes(data) + b"\x00" * 3


def test_zeroed_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
    data = filled(path) + bytes(RECORD)
    path.write_bytes(data)
    with pytest.raises(ReplayStoreError, match=f"offset {HEADER + 10 * RECORD}"):
        EmbeddedReplayStore.open(path)
    assert path.read_bytes() == data


@pytest.mark.parametrize(
    "header",
    [
        b"PIMREPLX\x00\x01\x00\x10\x00\x00\x00\x00",  # magic
        b"PIMREPLY\x00\x02\x00\x10\x00\x00\x00\x00",  # version
        b"PIMREPLY\x00\x01\x00\x20\x00\x00\x00\x00",  # record size
        b"PIMREPLY\x00\x01\x00\x10\x00\x00\x00\x01",  # reserved
        b"SQLite format 3\x00",
    ],
)
def test_bad_header_is_refused_and_left_alone(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "replay.store"
    data = header + filled(path)[HEADER:]
    path.write_bytes(data)
    with pytest.raises(ReplayStoreError, match="bad header at offset 0"):
        EmbeddedReplayStore.open(path)
    assert path.read_bytes() == data


def test_short_file_that_is_not_a_torn_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
    path.write_bytes(b"hello")
    with pytest.raises(ReplayStoreError, match="bad header"):
        EmbeddedReplayStore.open(path)
    assert path.read_bytes() == b"hello"


@pytest.mark.parametrize("size", [0, 1, 8, HEADER - 1])
def test_header_cut_short_by_a_crash_is_completed(tmp_path: Path, size: int) -> None:
    path = tmp_path / "replay.store"
    header = filled(path, 0)
    assert len(header) == HEADER
    path.write_bytes(header[:size])
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([(1, 1)]) == [False]
    assert path.read_bytes()[:HEADER] == header


def test_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(ReplayStoreError, match="cannot open"):
        EmbeddedReplayStore.open(tmp_path / "missing-dir" / "replay.store")


# The file may grow to 4 records: the third batch crosses that and fails.
CHILD_FILE_TOO_BIG = """
import resource, signal, sys
from pathlib import Path
from meter.errors import ReplayStoreError
from meter.postoffice import EmbeddedReplayStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
store = EmbeddedReplayStore.open(Path(sys.argv[1]))
limit = 16 + 4 * 16
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
print(store.check_and_set([(1, 1), (1, 2)]))
print(store.check_and_set([(1, 3)]))
for batch in ([(2, 1), (2, 2), (2, 3)], [(3, 1)]):
    try:
        store.check_and_set(batch)
    except ReplayStoreError as exc:
        print(exc)
"""


def test_a_failed_write_takes_its_batch_back_and_stops_the_store(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
    child = subprocess.run(
        [sys.executable, "-c", CHILD_FILE_TOO_BIG, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    lines = child.stdout.splitlines()
    assert lines[:2] == ["[False, False]", "[False]"]
    assert "write at offset 64 failed: File too large" in lines[2]
    assert "reopen it before use" in lines[3]
    assert path.stat().st_size == HEADER + 3 * RECORD
    with EmbeddedReplayStore.open(path) as store:
        assert store.check_and_set([(1, 3), (2, 1), (3, 1)]) == [True, False, False]


# The child records random batches and prints each one after check_and_set
# returned: a printed batch is an acknowledged one.
CHILD_RECORD = """
import json, random, sys
from pathlib import Path
from meter.postoffice import EmbeddedReplayStore
store = EmbeddedReplayStore.open(Path(sys.argv[1]))
rng = random.Random(int(sys.argv[2]))
print("open", flush=True)
while True:
    batch = [(rng.randrange(1, 50), rng.randrange(1, 2**32)) for _ in range(rng.randrange(1, 200))]
    store.check_and_set(batch)
    print(json.dumps(batch), flush=True)
"""


def test_sigkill_loses_no_acknowledged_piece(tmp_path: Path) -> None:
    path = tmp_path / "replay.store"
    rng = random.Random(4242)
    acknowledged: list[tuple[int, int]] = []
    for round_number in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_RECORD, str(path), str(round_number)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"open\n"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        output = child.stdout.read()
        child.wait()
        assert child.returncode == -signal.SIGKILL
        lines = output.split(b"\n")
        for line in lines[:-1]:  # the last one may be cut short: not acknowledged
            acknowledged.extend((s, q) for s, q in json.loads(line))
        with EmbeddedReplayStore.open(path) as store:
            assert all(store.check_and_set(acknowledged))
            assert len(store) >= len(set(acknowledged))
    assert len(acknowledged) > 100
