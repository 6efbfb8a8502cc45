"""The reload fault plans and the soak over tests/_reload_harness.py.

A plan is a list of runs, each one reload with one fault: every fixed kill point of the
device and of the provider, every cut of the host's link, the faults of a settle (a run
that begins with a transaction left open by the run before it, whose settle is itself
faulted), then random points. Used by tests/test_reload_faults.py, scripts/soak-reload and
scripts/bench_reload.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

from tests._reload_harness import Harness, Lab, Outcome

__all__ = [
    "CUT_POINTS",
    "DEVICE_POINTS",
    "PROVIDER_POINTS",
    "SETTLE_FAULTS",
    "Run",
    "fault_plan",
    "soak",
]

# Kill points of the device: token and audit operations, the ECDH derivation. Counted from
# the reload's begin, in a session with nothing open to settle.
DEVICE_POINTS = [
    ("before-derive", 1),
    ("before-sign", 1),  # the finish signature
    ("after-sign", 1),
    ("before-sign", 2),  # the receipt
    ("before-create", 1),  # the credit's register record
    ("after-create", 1),
    ("before-create", 2),  # the receipt object
    ("after-create", 2),
    ("after-sync", 1),
    ("after-destroy", 1),  # the previous reload's receipt, committed at the provider
    ("before-audit", 3),
    ("after-audit", 3),
    ("after-audit", 4),
]
# Kill points of the provider: each protocol step and each ledger write, before and after.
# (Abort and the settle's commit need a transaction open: SETTLE_FAULTS.)
PROVIDER_POINTS = [
    ("before-hello", 1),
    ("after-hello", 1),
    ("before-finish", 1),
    ("after-finish", 1),
    ("before-answers", 1),
    ("before-prepare", 1),
    ("after-prepare", 1),
    ("after-answers", 1),
    ("before-receipt", 1),
    ("before-commit", 1),
    ("after-commit", 1),
    ("after-receipt", 1),
]
# Cuts of the host's link to the provider: request N not sent, or its answer lost.
CUT_POINTS = [(f"{when}-{n}", n) for n in (1, 2, 3, 4) for when in ("cut-before", "cut-after")]

# What a run left unsettled leaves open for the next run's settle:
UNAPPLIED = ("cut-after-3", 3)  # the grant lost: PREPARED, never applied -> NOT_APPLIED
APPLIED = ("cut-before-4", 4)  # the receipt lost: applied, its receipt stored -> commit
REMADE = ("device:before-create", 2)  # killed before the receipt object: the receipt is
# made again from the register record at the settle -> commit
# The settle's own faults, each after the run (not settled) that leaves its case open.
SETTLE_FAULTS = [
    (UNAPPLIED, "device:before-sign", 2),  # the meter signing NOT_APPLIED (finish is 1)
    (UNAPPLIED, "device:after-sign", 2),
    (UNAPPLIED, "provider:before-abort", 1),
    (UNAPPLIED, "provider:after-abort", 1),  # aborted; the new prepare never made
    (APPLIED, "device:after-audit", 3),  # the stored receipt handed out, never sent
    (APPLIED, "provider:before-commit", 1),  # the settle's commit (the receipt's is 2)
    (APPLIED, "provider:after-commit", 1),
    (REMADE, "device:before-sign", 2),  # signing the receipt made again
    (REMADE, "provider:after-commit", 1),
]


class Run(NamedTuple):
    fault: str  # device:POINT, provider:POINT, cut-..., or a side's "random"
    nth: int  # the point's count, or the random point's seed
    settle: bool = True  # False: left open for the next run's settle


def fixed_runs() -> list[Run]:
    """Every fixed point once (device kills, provider kills, cuts), then every settle
    fault behind its unsettled prelude."""
    runs = [Run(f"device:{p}", n) for p, n in DEVICE_POINTS]
    runs += [Run(f"provider:{p}", n) for p, n in PROVIDER_POINTS]
    runs += [Run(p, n) for p, n in CUT_POINTS]
    for (prelude, count), fault, nth in SETTLE_FAULTS:
        runs += [Run(prelude, count, settle=False), Run(fault, nth)]
    return runs


def fault_plan(runs: int, seed: int, fixed: list[Run] | None = None) -> list[Run]:
    """``fixed`` (by default every fixed point and settle fault), then random points: one
    random run in four is left unsettled, so the next one's settle meets its fault. Never
    two unsettled in a row, and never the last: the final recovery settles everything."""
    rng = random.Random(seed)
    plan = (fixed_runs() if fixed is None else fixed)[:runs]
    if plan and not plan[-1].settle:
        plan[-1] = plan[-1]._replace(settle=True)
    while len(plan) < runs:
        kind = rng.choice(["device:random", "provider:random", rng.choice(CUT_POINTS)[0]])
        roll = rng.random()
        leave = roll < 0.25 and bool(plan) and plan[-1].settle and len(plan) < runs - 1
        plan.append(Run(kind, rng.randint(1, 10**6), settle=not leave))
    return plan


def soak(
    lab: Lab,
    runs: int,
    seed: int = 1,
    progress: Callable[[int, Outcome], None] | None = None,
    plan: list[Run] | None = None,
) -> dict[str, Any]:
    """The fault runs (``plan``, by default ``fault_plan(runs, seed)``), with recovery after
    each; the invariant checked after each run: in full after a settled one, and after
    one left open, that nothing was created or destroyed beyond what is still PREPARED."""
    harness = Harness(lab)
    harness.start_device()
    harness.start_provider()
    failures: list[str] = []
    worst = {"credit_created": 0, "credit_destroyed": 0, "unresolved": 0, "ledger_mismatches": 0}
    rng = random.Random(seed)
    runs_of = fault_plan(runs, seed) if plan is None else plan
    open_at_start = 0
    try:
        for number, run in enumerate(runs_of, 1):
            outcome = harness.run(run.fault, run.nth, rng.randint(1, 50_000), settle=run.settle)
            open_at_start += outcome.opened > 0
            counts = harness.check()
            checked = [k for k in worst if run.settle or k != "unresolved"]
            for key in checked:
                worst[key] = max(worst[key], counts[key])
            if any(counts[k] for k in checked):
                failures.append(f"run {number} ({run}): {counts} after {outcome}")
            if progress is not None:
                progress(number, outcome)
        final = harness.check()
        twice = harness.applied_twice()
    finally:
        harness.close()
    recovery = sorted(harness.recovery_s)
    return {
        "runs": len(runs_of),
        "kills": harness.kills,
        "cuts": harness.cuts,
        "open_at_start": open_at_start,  # runs that began with a transaction open
        "credit_created": worst["credit_created"],
        "credit_destroyed": worst["credit_destroyed"],
        "applied_twice": twice,
        "unresolved": final["unresolved"],
        "ledger_mismatches": worst["ledger_mismatches"],
        "credited": final["credited"],
        "applied": final["applied"],
        "recovery_s_median": recovery[len(recovery) // 2] if recovery else None,
        "recovery_s_max": recovery[-1] if recovery else None,
        "failures": failures,
    }
