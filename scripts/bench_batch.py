"""Batch issuing benchmarks, each next to the raw rate underneath, measured in the same run.

- ``issue_batch``: signed indicia per second in device batches of 1,000 through the
  device's socket (client, HTTP, firmware, one durable register write per batch),
  against the raw sign rate of the very same token (opened by the bench itself
  before and after the device runs, as bench.py's ``raw_token_rates`` does).
- ``labels_parallel``: labels per second into one print-ready PDF with a process
  pool on every core, against pdf417gen encoding plus rendering one label's PDF in
  one process (the way `meter issue` makes a label), and against the same sheet
  pipeline in one process (what the pool adds on its own).

Run through scripts/bench.py (``scripts/`` is on sys.path there), or alone:
``.venv/bin/python scripts/bench_batch.py [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from meter.cli import workflows
from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.host import DeviceClient
from meter.indicium import RateCategory
from meter.label import LabelInfo
from meter.label.layout import render_label_pdf
from meter.label.sheets import SheetLabel, write_sheets
from meter.protocol.issue import IssueRequest
from meter.token import KeyAlgorithm

BATCH = 1000
ADDRESS = ["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"]


def _rate(fn: Any, seconds: float) -> float:
    """Operations per second of ``fn`` (which returns how many it did), run for ~seconds."""
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def _raw_sign(home: Home, pin: str, seconds: float) -> float:
    """The meter token's own ECDSA P-256 sign rate, as bench.py measures it."""
    with home.open_token("meter", pin) as token:
        return _rate(
            lambda: [token.sign("indicium-signing", KeyAlgorithm.ECDSA_P256, b"x" * 84)] and 1,
            seconds,
        )


def bench_issue_batch(seconds: float) -> dict[str, Any]:
    """Device batches of 1,000 through the socket, next to the same token's raw sign rate."""
    from bench import lab_home

    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp:
        home, pins, passwords = lab_home(Path(tmp), device_serial=123456789013)
        raw_before = _raw_sign(home, pins["user_pin"], seconds)
        batch = [
            IssueRequest(
                postage=730 + i % 50,
                rate_category=RateCategory.FIRST_CLASS_LETTER,
                origin_zip="94043",
                destination_zip=f"{10001 + i % 89999:05d}",
                address=[f"Customer {i}", f"{i} Main St.", "Springfield, IL 62704"],
            )
            for i in range(BATCH)
        ]
        with running_device(home):
            workflows.setup_demo_device(home, passwords, 2**39)
            with DeviceClient(home.socket) as client:
                client.logon("customer", passwords["customer"])
                client.issue_batch(batch[:10])  # warm: the first logon's work is done
                per_s = _rate(lambda: len(client.issue_batch(batch).indicia), seconds)
                pieces = client.get("/v1/psd-status")["piece_count"]
        raw_after = _raw_sign(home, pins["user_pin"], seconds)
    raw = (raw_before + raw_after) / 2
    return {
        "issue_batch": {
            "per_s": round(per_s, 1),
            "batch": BATCH,
            "raw_sign_per_s": round(raw, 1),
            "raw_sign_before_and_after_per_s": [round(raw_before, 1), round(raw_after, 1)],
            "ratio_to_raw_sign": round(per_s / raw, 3),
            "target_ratio": 0.5,
            "pieces": pieces,
            "path": "client -> device socket -> firmware -> token, 1,000 pieces a request, "
            "one durable register write each",
        }
    }


def _sample_labels(count: int) -> list[SheetLabel]:
    """Labels of real ECDSA-sized indicia (148 bytes), each with its own bytes and sequence."""
    info = LabelInfo(
        postage="$0.730",
        date_of_mailing="2026-11-22",
        origin_zip="94043",
        device_serial="983973031309",
        sequence="1",
        rate=RateCategory.FIRST_CLASS_LETTER.title,
        destination_lines=tuple(ADDRESS),
    )
    return [
        SheetLabel((i.to_bytes(4, "big") * 37)[:148], replace(info, sequence=str(i + 1)), "pdf417")
        for i in range(count)
    ]


def bench_labels_parallel(seconds: float, count: int = 200) -> dict[str, Any]:
    """Labels into one PDF on every core, next to encode+render of one label on one core."""
    labels = _sample_labels(count)
    cores = os.cpu_count() or 1

    def raw() -> int:
        # pdf417gen's encoding and the label's one-page PDF, one label at a time.
        for label in labels[:20]:
            render_label_pdf(label.indicium, label.info, symbology=label.symbology)
        return 20

    raw_rate = _rate(raw, seconds)
    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp:
        out = Path(tmp) / "labels.pdf"
        single = _rate(lambda: write_sheets(labels, out, workers=1).labels, seconds)
        parallel = _rate(lambda: write_sheets(labels, out, workers=cores).labels, seconds)
    return {
        "labels_parallel": {
            "per_s": round(parallel, 1),
            "cores": cores,
            "raw_single_core_per_s": round(raw_rate, 1),
            "ratio_to_raw_single_core": round(parallel / raw_rate, 3),
            "target_ratio": 1.6,
            "single_process_per_s": round(single, 1),
            "ratio_to_single_process": round(parallel / single, 3),
            "labels_per_document": count,
            "layout": "4x6",
        }
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    report = bench_issue_batch(args.seconds) | bench_labels_parallel(args.seconds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
