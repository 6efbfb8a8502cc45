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
import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import zxingcpp
from bench import rate, sample_indicia
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from PIL import Image, ImageFilter

from meter.cli import workflows
from meter.errors import BarcodeError
from meter.indicium import decode
from meter.label import decode_image, render_label
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import EmbeddedReplayStore
from meter.postoffice.parallel import BatchEngine, Item
from meter.postoffice.reconcile import RegisterLedger

ADDRESS = ["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"]
_PDF417 = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.PDF417)
_BOTH = zxingcpp.BarcodeFormats((zxingcpp.BarcodeFormat.PDF417, zxingcpp.BarcodeFormat.DataMatrix))


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


def scanned_200dpi(image: Image.Image, seed: int) -> Image.Image:
    """A 300 dpi label as a 200 dpi office scanner gives it back: resampled to 2/3,
    a little skewed, blurred and noisy."""
    rng = random.Random(seed)
    grey = image.convert("L")
    small = grey.resize((grey.width * 2 // 3, grey.height * 2 // 3), Image.Resampling.BILINEAR)
    skewed = small.rotate(
        rng.uniform(-1.0, 1.0), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=255
    )
    noisy = Image.blend(skewed, Image.effect_noise(skewed.size, 24), 0.25)
    return noisy.filter(ImageFilter.GaussianBlur(0.6))


def label_images(
    indicia: Sequence[bytes], folder: Path, rotated_count: int = 8
) -> dict[str, list[Path]]:
    """The benchmark's label PNGs: straight PDF417 labels, the first ``rotated_count``
    of them (and their Data Matrix twins) turned 90 and 180 degrees, and 200 dpi scans."""
    images: dict[str, list[Path]] = {"straight": [], "rotated": [], "scanned": []}

    def save(kind: str, name: str, image: Image.Image) -> None:
        path = folder / f"{kind}-{name}.png"
        image.save(path, "PNG", compress_level=1)
        images[kind].append(path)

    for number, data in enumerate(indicia):
        info = workflows.label_info(decode(data), ADDRESS)
        png = render_label(data, info).png
        path = folder / f"straight-{number}.png"
        path.write_bytes(png)
        images["straight"].append(path)
        if number >= rotated_count:
            continue
        with Image.open(io.BytesIO(png)) as label:
            save("scanned", f"{number}", scanned_200dpi(label, number))
            twin = Image.open(io.BytesIO(render_label(data, info, symbology="datamatrix").png))
            for symbology, image in (("pdf417", label), ("datamatrix", twin)):
                for turn, angle in (
                    (Image.Transpose.ROTATE_90, 90),
                    (Image.Transpose.ROTATE_180, 180),
                ):
                    save("rotated", f"{symbology}-{angle}-{number}", image.transpose(turn))
    return images


def paired_rates(fns: dict[str, Callable[[], int]], seconds: float) -> dict[str, float]:
    """Each function's rate, the functions run in turn (A B A B ...) for ~seconds each.

    On a shared machine the speed drifts; taking turns puts the same drift on every
    figure, so their ratios mean something (one after the other, they did not).
    """
    done = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    while min(spent.values()) < seconds:
        for name, fn in fns.items():
            start = time.perf_counter()
            done[name] += fn()
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in fns}


def _zxing_reader(paths: Sequence[Path], **options: Any) -> Callable[[], int]:
    """zxing-cpp alone over the PNGs: open, make 8-bit grey, read with ``options``."""

    def read() -> int:
        for path in paths:
            with Image.open(path) as image:
                grey = image.convert("L") if image.mode != "L" else image
                if not zxingcpp.read_barcodes(grey, **options):
                    raise RuntimeError(f"zxing-cpp found no barcode in {path}")
        return len(paths)

    return read


def _engine_round(
    items: Sequence[Item], trust: TrustStore, today: Any, engine: BatchEngine, tmp: Path
) -> Callable[[], int]:
    """One pass of the items through the engine, with a new replay store and ledger."""
    rounds = {"n": 0}

    def one_round() -> int:
        n = rounds["n"] = rounds["n"] + 1
        with (
            EmbeddedReplayStore.open(tmp / f"replay-{n}") as replay,
            RegisterLedger.open(tmp / f"registers-{n}.sqlite") as books,
        ):
            for _ in engine.verify(items, replay, books):
                pass
        return len(items)

    return one_round


def bench_verify_images(seconds: float, count: int = 48) -> dict[str, Any]:
    """Full 4x6 inch label PNGs: raw zxing-cpp decode vs the post office's path, one core.

    The post office's path (PNG read, decode, verdicts, replay store, register
    ledger) on straight labels takes turns with zxing-cpp's tuned read (PDF417
    only; no rotation, inversion or downscaling) of the same PNGs, and with the
    read the project made before (both formats, every orientation). Rotated
    labels (90 and 180 degrees, PDF417 and Data Matrix) and noisy 200 dpi scans
    are counted as read or not, and timed.
    """
    indicia, trust, issued = sample_indicia(count)
    today = (issued + timedelta(days=1)).date()
    fast = {"try_rotate": False, "try_invert": False, "try_downscale": False}
    with tempfile.TemporaryDirectory(prefix="meter-bench-labels-") as tmp:
        images = label_images(indicia, Path(tmp))
        straight: list[Item] = list(images["straight"])
        engine = BatchEngine(trust, Revocations.empty(), today, 1)
        with engine:
            rates = paired_rates(
                {
                    "project": _engine_round(straight, trust, today, engine, Path(tmp)),
                    "tuned": _zxing_reader(images["straight"], formats=_PDF417, **fast),
                    "both_formats": _zxing_reader(
                        images["straight"], formats=_BOTH, try_downscale=False, try_invert=False
                    ),
                },
                seconds,
            )
        harder = {kind: images[kind] for kind in ("rotated", "scanned")}
        read = {kind: _decoded(paths, indicia) for kind, paths in harder.items()}
        hard_rates = paired_rates(
            {
                **{kind: _project_reader(paths) for kind, paths in harder.items()},
                **{f"{kind}_default": _zxing_reader(paths) for kind, paths in harder.items()},
            },
            seconds / 2,
        )
        cores = os.cpu_count() or 1
        all_cores = _through_engine(straight, trust, today, cores, seconds)
    one_core, tuned = rates["project"], rates["tuned"]
    return {
        "verify_images": {
            "per_s": round(one_core, 1),
            "raw_decode_per_s": round(rates["both_formats"], 1),
            "ratio": round(one_core / rates["both_formats"], 3),
            "target_ratio": 0.8,
            "raw_decode_tuned_per_s": round(tuned, 1),
            "ratio_to_tuned": round(one_core / tuned, 3),
            "target_ratio_to_tuned": 0.8,
            "images": count,
            "rotated_decoded": read["rotated"],
            "scanned_200dpi_decoded": read["scanned"],
            "rotated_decode_per_s": round(hard_rates["rotated"], 1),
            "rotated_raw_default_decode_per_s": round(hard_rates["rotated_default"], 1),
            "scanned_200dpi_decode_per_s": round(hard_rates["scanned"], 1),
            "scanned_200dpi_raw_default_decode_per_s": round(hard_rates["scanned_default"], 1),
            "all_cores_per_s": round(all_cores, 1),
            "cores": cores,
        }
    }


def _project_reader(paths: Sequence[Path]) -> Callable[[], int]:
    """decode_image over the PNGs, failures included (they are counted elsewhere)."""

    def read() -> int:
        for path in paths:
            with contextlib.suppress(BarcodeError):
                decode_image(path)
        return len(paths)

    return read


def _decoded(paths: Sequence[Path], indicia: Sequence[bytes]) -> dict[str, int]:
    """How many images decode_image reads back byte-exact, out of how many."""
    wanted = set(indicia)
    read = 0
    for path in paths:
        with contextlib.suppress(BarcodeError):
            read += decode_image(path) in wanted
    return {"read": read, "of": len(paths)}


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
