"""Fault injection of the reload protocol: SIGKILL of the device process or of the provider
process at every step (and at random points), and cuts of the host's link, then recovery.

Each run is one reload with one fault (tests/_reload_plan.py over tests/_reload_harness.py):
the device is `meterd` and the provider a uvicorn service over the accounts ledger (SQLite,
and a shorter plan on PostgreSQL), both real processes, SIGKILLed on cue; the host relays
and cuts. After each run the killed process restarts and the next contact settles what was
open, except after the runs left unsettled on purpose: then the next run begins with a
transaction open, and its fault meets the settle (the meter signing NOT_APPLIED or handing
a stored receipt, the provider's commit or abort of the older transaction). The invariant,
after every settled run: the funds taken from the customer equal the credit the meter
applied and the ledger's COMMITTED credit; nothing left PREPARED; and, at the end, no
transaction applied twice (the meter's audit log) and the ledger's running balances agree
with its records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from _postgres import fresh_database

from meter.cli.home import Home
from meter.provider.ledger_sql import open_ledger
from tests._reload_harness import ROOT, Harness, Outcome, prepare_lab
from tests._reload_plan import (
    APPLIED,
    CUT_POINTS,
    DEVICE_POINTS,
    PROVIDER_POINTS,
    SETTLE_FAULTS,
    UNAPPLIED,
    Run,
    fault_plan,
    fixed_runs,
    soak,
)

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

RUNS = 100


def test_the_plan_covers_every_step_and_settle_then_random_points() -> None:
    plan = fault_plan(RUNS, seed=7)
    assert len(plan) == RUNS
    fixed = len(fixed_runs())
    faults = [r.fault for r in plan[:fixed]]
    assert set(faults) >= {f"device:{p}" for p, _ in DEVICE_POINTS}
    assert set(faults) >= {f"provider:{p}" for p, _ in PROVIDER_POINTS}
    assert set(faults) >= {"provider:before-abort", "provider:after-abort"}
    # Each settle fault right after the unsettled run that leaves its case open.
    pairs = list(pairwise(plan[:fixed]))
    for (prelude, count), fault, nth in SETTLE_FAULTS:
        assert (Run(prelude, count, settle=False), Run(fault, nth)) in pairs
    randoms = plan[fixed:]
    assert {r.fault for r in randoms} <= {"device:random", "provider:random"} | {
        p for p, _ in CUT_POINTS
    }
    assert len({r.fault for r in randoms}) > 2  # random points of every kind
    assert any(not r.settle for r in randoms)  # some random runs' settle is faulted too
    assert all(a.settle or b.settle for a, b in pairwise(plan))
    assert plan[-1].settle


def _assert_conserved(report: dict[str, object]) -> None:
    assert report["failures"] == []
    assert report["credit_created"] == 0
    assert report["credit_destroyed"] == 0
    assert report["applied_twice"] == 0
    assert report["unresolved"] == 0
    assert report["ledger_mismatches"] == 0
    assert report["credited"] == report["applied"]


def test_a_hundred_faulty_reloads_neither_create_nor_destroy_credit(device_home: Home) -> None:
    lab = prepare_lab(device_home)
    outcomes: list[Outcome] = []
    report = soak(lab, RUNS, seed=7, progress=lambda number, outcome: outcomes.append(outcome))
    _assert_conserved(report)
    assert report["runs"] == RUNS == len(outcomes)
    # The faults happened: both processes were killed, links were cut, and some runs'
    # credit still reached the meter and the ledger.
    killed = {o.killed for o in outcomes}
    assert {"device", "provider"} <= killed
    assert report["kills"] >= 40
    assert report["cuts"] >= 8
    assert int(str(report["applied"])) > 0
    # Every settle fault began with its transaction open and killed its side in the settle.
    settle_faults = {f for _, f, _ in SETTLE_FAULTS}
    fixed = outcomes[: len(fixed_runs())]
    hit = [o for o in fixed if o.opened and o.fault in settle_faults]
    assert len(hit) == len(SETTLE_FAULTS), [o for o in fixed if o.fault in settle_faults]
    assert all(o.killed == o.fault.split(":")[0] for o in hit), hit
    assert int(str(report["open_at_start"])) > len(SETTLE_FAULTS)  # random ones too


# A shorter plan on PostgreSQL: the provider killed at each ledger write, its abort and the
# settle's commit, a device kill and a lost receipt, then random points.
POSTGRES_FIXED = [
    Run("provider:before-prepare", 1),
    Run("provider:after-prepare", 1),
    Run("provider:before-commit", 1),
    Run("provider:after-commit", 1),
    Run(*UNAPPLIED, settle=False),
    Run("provider:before-abort", 1),
    Run(*APPLIED, settle=False),
    Run("provider:before-commit", 1),
    Run("device:after-create", 1),
    Run("cut-before-4", 4),
]


def test_faulty_reloads_on_postgresql_neither_create_nor_destroy_credit(
    device_home: Home,
) -> None:
    outcomes: list[Outcome] = []
    with fresh_database() as url:
        lab = prepare_lab(device_home, url)
        plan = fault_plan(16, seed=3, fixed=POSTGRES_FIXED)
        report = soak(lab, len(plan), plan=plan, progress=lambda n, o: outcomes.append(o))
    _assert_conserved(report)
    assert report["runs"] == 16
    provider_kills = [o for o in outcomes[: len(POSTGRES_FIXED)] if o.killed == "provider"]
    assert len(provider_kills) == 6  # every provider point of the fixed runs was reached
    assert [o.opened for o in outcomes if o.fault == "provider:before-abort"] == [1]
    assert int(str(report["applied"])) > 0


def test_a_credit_whose_receipt_was_lost_is_committed_at_the_next_contact(
    device_home: Home,
) -> None:
    """The receipt never reaches the provider: the meter keeps it, the provider keeps the
    transaction PREPARED, and the next reload commits it from the meter's stored receipt."""
    from meter.provider.ledger import TransactionState

    lab = prepare_lab(device_home)
    harness = Harness(lab)
    harness.start_device()
    harness.start_provider()
    try:
        result = harness.reload(7000, cut="cut-before-4")
        assert result["provider_settled"] is False and result["amount"] == 7000
        txid = bytes.fromhex(result["transaction_id"])
        ledger = open_ledger(lab.ledger)
        try:
            assert [t.transaction_id for t in ledger.open_transactions(lab.serial)] == [txid]
        finally:
            ledger.close()
        before = harness.check()
        assert before["applied"] == 7000 and before["credited"] == 0 and before["reserved"] == 7000
        settled = harness.settle()
        ledger = open_ledger(lab.ledger)
        try:
            done = ledger.transaction(txid)
            assert done is not None and done.state is TransactionState.COMMITTED
            assert (
                done.receipt is not None and bytes.fromhex(result["transaction_id"]) in done.receipt
            )
        finally:
            ledger.close()
        after = harness.check()
        assert after["credited"] == after["applied"] == 7000 + settled["amount"]
        assert after["unresolved"] == 0
    finally:
        harness.close()


def test_a_grant_that_never_reached_the_meter_is_aborted_at_the_next_contact(
    device_home: Home,
) -> None:
    """The provider PREPARED a grant the host lost: nothing pending on the meter; the next
    contact's signed "not applied" aborts it and releases the funds."""
    from meter.provider.ledger import TransactionState

    lab = prepare_lab(device_home)
    harness = Harness(lab)
    harness.start_device()
    harness.start_provider()
    try:
        with pytest.raises(Exception, match="cut the link after request 3"):
            harness.reload(9000, cut="cut-after-3")
        with harness.client() as client:
            status = client.get("/v1/status")
        assert status["registers"]["control_total"] == lab.baseline
        ledger = open_ledger(lab.ledger)
        try:
            (open_one,) = ledger.open_transactions(lab.serial)
            assert ledger.account("DEMO-0001").reserved == 9000
        finally:
            ledger.close()
        harness.settle()
        ledger = open_ledger(lab.ledger)
        try:
            aborted = ledger.transaction(open_one.transaction_id)
            assert aborted is not None and aborted.state is TransactionState.ABORTED
            assert ledger.account("DEMO-0001").reserved == 0
        finally:
            ledger.close()
        assert harness.check()["credit_destroyed"] == 0
    finally:
        harness.close()


def test_the_soak_script_runs_and_reports_its_last_line_as_json(tmp_path: Path) -> None:
    """scripts/soak-reload as an operator runs it, briefly: its arguments, its exit status
    and the JSON object of its last line."""
    script = [sys.executable, str(ROOT / "scripts" / "soak-reload")]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its home, under this test's folder
    refused = subprocess.run([*script, "--runs", "0"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--runs must be at least 1" in refused.stderr
    done = subprocess.run(
        [*script, "--runs", "3", "--seed", "5", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["runs"] == 3
    assert report["kills"] + report["cuts"] == 3  # the plan's first runs: every fault hit
    for zero in ("credit_created", "credit_destroyed", "applied_twice", "unresolved"):
        assert report[zero] == 0, report
    assert report["failures"] == 0 and report["ledger_mismatches"] == 0
    assert report["credited"] == report["applied"] and report["seconds"] > 0
    assert list(tmp_path.iterdir()) == []  # its temporary home is gone
