"""Reload benchmarks (docs/reload-protocol.md), each next to what it replaces, in the same run.

- ``reload.per_s``: full reloads between one provider and one meter on this machine: the
  device process (`meterd`) and the provider's HTTP service (uvicorn over the SQLite
  ledger), the host relaying: handshake with ECDH and signatures in both tokens, the
  settle, a durable PREPARE, the meter's durable credit and receipt, a durable COMMIT.
- ``reload.plain_credit_per_s``: today's local signed-grant credit through the same
  device socket (request, the provider's grant signed in its token, apply), measured in
  the same run with the same tokens; ``ratio_to_plain_credit`` is the protocol's cost.
- ``reload.recovery_after_kill_s``: from a SIGKILL of the device (or of the provider) in
  the middle of a reload to the next contact having settled it (restart included; the
  harness keeps a warm process ready, as a service manager's restart would).
- ``reload.soak``: a short run of the fault harness (scripts/soak-reload runs it longer).

Run through scripts/bench.py (``scripts/`` is on sys.path there), or alone:
``.venv/bin/python scripts/bench_reload.py [--seconds S] [--soak-runs N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meter.provider import Provider  # noqa: E402
from tests._reload_harness import Harness, make_home, prepare_lab  # noqa: E402
from tests._reload_plan import soak  # noqa: E402

AMOUNT = 1000  # mills a reload


def bench_reload(seconds: float, soak_runs: int = 30) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meter-bench-reload-") as tmp:
        lab = prepare_lab(make_home(Path(tmp)))
        harness = Harness(lab)
        harness.start_device()
        harness.start_provider()
        try:
            harness.reload(AMOUNT)  # warm: first logon, first connections
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                harness.reload(AMOUNT)
                done += 1
            reload_per_s = done / (time.perf_counter() - start)
            recovery: dict[str, list[float]] = {"device": [], "provider": []}
            for side, point in (("device", "before-create"), ("provider", "after-prepare")):
                for _ in range(3):
                    before = len(harness.recovery_s)
                    outcome = harness.run(f"{side}:{point}", 1, AMOUNT)
                    if outcome.killed == side and len(harness.recovery_s) > before:
                        recovery[side].append(harness.recovery_s[-1])
            counts = harness.check()
            assert harness.provider is not None
            harness.provider.stop()  # its token is the plain credit's signer now
            harness.provider = None
            plain_per_s, plain_mills = _plain_credit(harness, seconds)
            lab.baseline += plain_mills  # credit the reload ledger never granted: not its
        finally:
            harness.close()
        soaked = soak(lab, soak_runs, seed=11)
    return {
        "reload": {
            "per_s": round(reload_per_s, 1),
            "plain_credit_per_s": round(plain_per_s, 1),
            "ratio_to_plain_credit": round(reload_per_s / plain_per_s, 3),
            "amount_mills": AMOUNT,
            "recovery_after_kill_s": {
                side: round(sorted(times)[len(times) // 2], 3) if times else None
                for side, times in recovery.items()
            },
            "invariant_after_bench": counts,
            "soak": {k: v for k, v in soaked.items() if k != "failures"}
            | {"failures": len(soaked["failures"])},
        }
    }


def _plain_credit(harness: Harness, seconds: float) -> tuple[float, int]:
    """The local signed-grant credit through the device socket: request, grant, apply; its
    rate, and the mills it credited."""
    lab = harness.lab
    with lab.home.open_token("provider") as token:
        provider = Provider.open(token, lab.home.ledger)
        with harness.client() as client:  # the harness's Provider session

            def one() -> None:
                request = client.request_credit()
                now = datetime.now(UTC).replace(microsecond=0)
                client.apply_credit(provider.grant_credit(request, AMOUNT, now))

            one()
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                one()
                done += 1
            return done / (time.perf_counter() - start), (done + 1) * AMOUNT


def table_rows(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    r = report["reload"]
    rec = r["recovery_after_kill_s"]
    soaked = r["soak"]
    return [
        ("local signed-grant credit through the socket", r["plain_credit_per_s"], ""),
        (
            "reload: full protocol, device process <-> provider service",
            r["per_s"],
            f"{r['ratio_to_plain_credit']:.2f} x the local signed-grant credit",
        ),
        (
            "reload: recoveries after a kill (1 / seconds to settled)",
            1 / rec["device"] if rec.get("device") else 0.0,
            f"device {rec.get('device')} s, provider {rec.get('provider')} s to settled",
        ),
        (
            f"reload soak, {soaked['runs']} faulty runs",
            float(soaked["runs"]),
            f"kills {soaked['kills']}, cuts {soaked['cuts']}, created "
            f"{soaked['credit_created']}, destroyed {soaked['credit_destroyed']}, twice "
            f"{soaked['applied_twice']}, unresolved {soaked['unresolved']}",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--soak-runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = bench_reload(args.seconds, args.soak_runs)
    if args.json:
        print(json.dumps(report))
        return 0
    for name, value, note in table_rows(report):
        print(f"{name:<62}  {value:>10,.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
