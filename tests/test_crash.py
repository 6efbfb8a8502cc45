"""SIGKILL at many points of issuing: registers stay consistent, nothing released lacks its debit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meter.cli import workflows
from meter.cli.home import Home
from meter.indicium import RateCategory
from meter.psd import IssueRequest, Meter

CHILD = Path(__file__).with_name("_crash_child.py")
CREDIT = 2_000_000
POINTS = [
    ("before-create", 3),
    ("after-create", 2),
    ("after-sync", 4),
    ("after-destroy", 2),
    ("before-sign", 3),
    ("after-sign", 2),
    ("during-label", 3),
]


def run_child(home: Home, released: Path, point: str, nth: int, timeout: float = 60) -> int:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(home.path), str(released), point, str(nth)],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if point == "random":
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": the meter is about to issue
        time.sleep(random.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(
            f"child did not die by SIGKILL at {point}: {proc.returncode} {proc.stderr.read()!r}"
        )  # type: ignore[union-attr]
    return proc.returncode


def released_pieces(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    return [tuple(map(int, line.split()[:3])) for line in path.read_text().splitlines()]  # type: ignore[misc]


def check_consistent(home: Home, released: Path) -> tuple[int, int]:
    with home.open_token("meter") as token:
        r = Meter.open(token).registers
    r.check()
    assert r.control_total == CREDIT, "a crash must never create or destroy credit"
    pieces = released_pieces(released)
    sequences = [seq for seq, _, _ in pieces]
    assert len(sequences) == len(set(sequences)), "a piece sequence was released twice"
    for seq, _, ascending in pieces:
        assert seq <= r.sequence, (
            f"released piece {seq} lacks its debit (registers at {r.sequence})"
        )
        assert ascending <= r.ascending
    # Postage released never exceeds what the registers debited.
    assert sum(p for _, p, _ in pieces) <= r.ascending
    return r.sequence, r.ascending


@pytest.mark.slow
def test_sigkill_at_every_point_of_issuing(provisioned: Home, tmp_path: Path) -> None:
    workflows.credit(provisioned, CREDIT)
    released = tmp_path / "released.txt"
    last_sequence = 0
    runs = [*POINTS, *[("random", 0)] * 8]
    for point, nth in runs:
        run_child(provisioned, released, point, nth)
        sequence, _ = check_consistent(provisioned, released)
        assert sequence >= last_sequence, "the piece sequence went backwards"
        last_sequence = sequence
    pieces = released_pieces(released)
    assert len(pieces) > len(POINTS), "the children released too few pieces to test anything"
    # After all the crashes the meter issues the next sequence, never a used one.
    issued = workflows.issue(
        provisioned,
        IssueRequest(
            postage=100,
            rate_category=RateCategory.FIRST_CLASS_LETTER,
            origin_zip="94043",
            destination_zip="62704",
            address=["x"],
        ),
    )
    assert issued.indicium.sequence == last_sequence + 1
    assert issued.indicium.sequence not in {seq for seq, _, _ in pieces}
