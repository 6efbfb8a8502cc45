"""Fault injection of the reload protocol: SIGKILL of the device process or of the provider
process at every step (and at random points), and cuts of the host's link, then recovery.

Each run is one reload with one fault (tests/_reload_harness.py): the device is `meterd`
and the provider a uvicorn service over the SQLite accounts ledger, both real processes,
SIGKILLed on cue; the host relays and cuts. After each run the killed process restarts
and the next contact settles what was open. The invariant, after every run: the funds
taken from the customer equal the credit the meter applied and the ledger's COMMITTED
credit; nothing left PREPARED; and, at the end, no transaction applied twice (the
meter's audit log) and the ledger's running balances agree with its records.
"""

from __future__ import annotations

import pytest

from meter.cli.home import Home
from tests._reload_harness import (
    CUT_POINTS,
    DEVICE_POINTS,
    PROVIDER_POINTS,
    Harness,
    fault_plan,
    prepare_lab,
    soak,
)

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

RUNS = 100


def test_the_plan_covers_every_step_then_random_points() -> None:
    plan = fault_plan(RUNS, seed=7)
    assert len(plan) == RUNS
    fixed = len(DEVICE_POINTS) + len(PROVIDER_POINTS) + len(CUT_POINTS)
    assert {f for f, _ in plan[:fixed]} >= {f"device:{p}" for p, _ in DEVICE_POINTS}
    assert {f for f, _ in plan[:fixed]} >= {f"provider:{p}" for p, _ in PROVIDER_POINTS}
    assert {f for f, _ in plan[fixed:]} <= {"device:random", "provider:random"} | {
        p for p, _ in CUT_POINTS
    }
    assert len({f for f, _ in plan[fixed:]}) > 2  # random points of every kind


def test_a_hundred_faulty_reloads_neither_create_nor_destroy_credit(device_home: Home) -> None:
    lab = prepare_lab(device_home)
    outcomes = []
    report = soak(lab, RUNS, seed=7, progress=lambda number, outcome: outcomes.append(outcome))
    assert report["failures"] == []
    assert report["runs"] == RUNS == len(outcomes)
    assert report["credit_created"] == 0
    assert report["credit_destroyed"] == 0
    assert report["applied_twice"] == 0
    assert report["unresolved"] == 0
    assert report["ledger_mismatches"] == 0
    # The faults happened: both processes were killed, links were cut, and some runs'
    # credit still reached the meter and the ledger.
    killed = {o.killed for o in outcomes}
    assert {"device", "provider"} <= killed
    assert report["kills"] >= 40
    assert report["cuts"] >= 8
    assert report["credited"] == report["applied"] > 0


def test_a_credit_whose_receipt_was_lost_is_committed_at_the_next_contact(
    device_home: Home,
) -> None:
    """The receipt never reaches the provider: the meter keeps it, the provider keeps the
    transaction PREPARED, and the next reload commits it from the meter's stored receipt."""
    from meter.provider.ledger import TransactionState
    from meter.provider.ledger_sqlite import SqliteLedger

    lab = prepare_lab(device_home)
    harness = Harness(lab)
    harness.start_device()
    harness.start_provider()
    try:
        result = harness.reload(7000, cut="cut-before-4")
        assert result["provider_settled"] is False and result["amount"] == 7000
        txid = bytes.fromhex(result["transaction_id"])
        ledger = SqliteLedger(lab.ledger)
        try:
            assert [t.transaction_id for t in ledger.open_transactions(lab.serial)] == [txid]
        finally:
            ledger.close()
        before = harness.check()
        assert before["applied"] == 7000 and before["credited"] == 0 and before["reserved"] == 7000
        settled = harness.settle()
        ledger = SqliteLedger(lab.ledger)
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
    from meter.provider.ledger_sqlite import SqliteLedger

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
        ledger = SqliteLedger(lab.ledger)
        try:
            (open_one,) = ledger.open_transactions(lab.serial)
            assert ledger.account("DEMO-0001").reserved == 9000
        finally:
            ledger.close()
        harness.settle()
        ledger = SqliteLedger(lab.ledger)
        try:
            aborted = ledger.transaction(open_one.transaction_id)
            assert aborted is not None and aborted.state is TransactionState.ABORTED
            assert ledger.account("DEMO-0001").reserved == 0
        finally:
            ledger.close()
        assert harness.check()["credit_destroyed"] == 0
    finally:
        harness.close()
