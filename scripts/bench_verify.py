"""Post office benchmarks: verification from label images, and from bytes on every core.

Each figure sits next to the raw rate underneath it, measured in the same run:
the full path from label images (PNG read, zxing-cpp decode, verdict table,
replay store, register ledger) on one core against zxing-cpp decoding the same
PNGs; verification from bytes on all cores against the raw ``cryptography``
P-256 verify on one. Run through scripts/bench.py (``scripts/`` is on
sys.path there), or alone: ``.venv/bin/python scripts/bench_verify.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import zxingcpp
from bench import rate, sample_indicia
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from PIL import Image

from meter.cli import workflows
from meter.indicium import decode
from meter.label import render_label
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import EmbeddedReplayStore
from meter.postoffice.parallel import BatchEngine, Item
from meter.postoffice.reconcile import RegisterLedger

ADDRESS = ["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"]


def _through_engine(
    items: Sequence[Item],
    trust: TrustStore,
    today: Any,
    workers: int,
    seconds: float,
    ledger: bool = True,
) -> float:
    """Items per second through the batch engine, with a new replay store (and register
    ledger) each round, so that every piece is new and VALID, as at a real office."""
    engine = BatchEngine(trust, Revocations.empty(), today, workers)
    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp, engine:
        rounds = {"n": 0}

        def one_round() -> int:
            n = rounds["n"] = rounds["n"] + 1
            with contextlib.ExitStack() as stack:
                replay = stack.enter_context(EmbeddedReplayStore.open(Path(tmp) / f"replay-{n}"))
                books = (
                    stack.enter_context(RegisterLedger.open(Path(tmp) / f"registers-{n}.sqlite"))
                    if ledger
                    else None
                )
                for _ in engine.verify(items, replay, books):
                    pass
            return len(items)

        return rate(one_round, seconds)


def bench_verify_images(seconds: float, count: int = 48) -> dict[str, Any]:
    """Full 4x6 inch label PNGs: raw zxing-cpp decode vs the post office's path, one core."""
    indicia, trust, issued = sample_indicia(count)
    today = (issued + timedelta(days=1)).date()
    with tempfile.TemporaryDirectory(prefix="meter-bench-labels-") as tmp:
        paths = []
        for data in indicia:
            png = Path(tmp) / f"{decode(data).sequence}.png"
            png.write_bytes(render_label(data, workflows.label_info(decode(data), ADDRESS)).png)
            paths.append(png)

        # The same reading the post office does, minus everything of its own: open the
        # PNG, make it 8-bit grey, and ask zxing-cpp for the two PIM-1 formats.
        wanted = zxingcpp.BarcodeFormats(
            (zxingcpp.BarcodeFormat.PDF417, zxingcpp.BarcodeFormat.DataMatrix)
        )

        def raw() -> int:
            for path in paths:
                with Image.open(path) as image:
                    grey = image.convert("L") if image.mode != "L" else image
                    found = zxingcpp.read_barcodes(
                        grey, formats=wanted, try_downscale=False, try_invert=False
                    )
                if not found:
                    raise RuntimeError(f"zxing-cpp found no barcode in {path}")
            return len(paths)

        raw_rate = rate(raw, seconds)
        one_core = _through_engine(paths, trust, today, 1, seconds)
        cores = os.cpu_count() or 1
        all_cores = _through_engine(paths, trust, today, cores, seconds)
    return {
        "verify_images": {
            "per_s": round(one_core, 1),
            "raw_decode_per_s": round(raw_rate, 1),
            "ratio": round(one_core / raw_rate, 3),
            "target_ratio": 0.8,
            "images": count,
            "all_cores_per_s": round(all_cores, 1),
            "cores": cores,
        }
    }


def bench_verify_bytes_all_cores(seconds: float, count: int = 8192) -> dict[str, Any]:
    """Indicium bytes through the batch engine on every core, vs raw verify on one."""
    indicia, trust, issued = sample_indicia(count)
    today = (issued + timedelta(days=1)).date()
    public = trust.candidates(decode(indicia[0]).key_id)[0].meter.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    ders = [
        (d[:84], encode_dss_signature(int.from_bytes(d[84:116]), int.from_bytes(d[116:148])))
        for d in indicia[:512]
    ]

    def raw() -> int:
        for message, signature in ders:
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        return len(ders)

    raw_rate = rate(raw, seconds)
    cores = os.cpu_count() or 1
    # The operation bench.py's verify_bytes measures on one core (verdicts and replay
    # store), then with the register ledger as `meter verify-batch` keeps it too.
    per_s = _through_engine(indicia, trust, today, cores, seconds, ledger=False)
    with_ledger = _through_engine(indicia, trust, today, cores, seconds)
    return {
        "verify_bytes_all_cores": {
            "per_s": round(per_s, 1),
            "cores": cores,
            "raw_verify_per_s_one_core": round(raw_rate, 1),
            "ratio_per_core": round(per_s / cores / raw_rate, 3),
            "per_s_with_ledger": round(with_ledger, 1),
            "window": 2048,
            "replay_store": "embedded (one fsync per window)",
        }
    }


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    report = bench_verify_images(seconds)
    report.update(bench_verify_bytes_all_cores(seconds))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
