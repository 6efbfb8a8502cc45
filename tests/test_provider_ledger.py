"""The provider's accounts ledger, the same tests on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _postgres import fresh_database
from _postgres import ledger_location as ledger_location  # a fixture: sqlite, postgresql

from meter.errors import ConfigurationError, InsufficientFunds, InvalidInput, ProtocolError
from meter.provider.audits import AuditDesk
from meter.provider.ledger import TransactionState
from meter.provider.ledger_sql import SqlLedger, copy_ledger, open_ledger
from meter.provider.ledger_sqlite import SqliteLedger
from meter.provider.withdrawal import RevocationBook, WithdrawalOutcome, Withdrawals
from tests._audit_lab import unused_certificate, unused_signer

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=10)
METER = 983973031309
OTHER_METER = 2**64 - 1  # the largest serial: beyond both databases' signed integers


@pytest.fixture
def location(ledger_location: str) -> str:
    return ledger_location


@pytest.fixture
def ledger(location: str) -> Iterator[SqlLedger]:
    opened = open_ledger(location)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def funded(ledger: SqlLedger) -> SqlLedger:
    """Customer ACME with $100.000 and METER; customer OTHER with OTHER_METER and $5."""
    ledger.create_customer("ACME", "Acme Mailing Ltd", NOW)
    ledger.fund("ACME", 100_000, "pay-1", NOW)
    ledger.authorize_meter("ACME", METER, NOW)
    ledger.create_customer("OTHER", "Other Co", NOW)
    ledger.fund("OTHER", 5_000, "pay-1", NOW)
    ledger.authorize_meter("OTHER", OTHER_METER, NOW)
    return ledger


def txid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def snapshot(ledger: SqlLedger) -> tuple[Any, ...]:
    return (
        ledger.totals(),
        [ledger.account(c) for c in ledger.customers()],
        ledger.credited_totals(),
    )


# -- customers, funds, meters ----------------------------------------------------------


def test_fund_and_account(ledger: SqlLedger) -> None:
    ledger.create_customer("ACME", "Acme Mailing Ltd", NOW)
    assert ledger.available("ACME") == 0
    assert ledger.fund("ACME", 50_000, "pay-1", NOW) == 50_000
    assert ledger.fund("ACME", 25_500, "pay-2", NOW) == 75_500
    ledger.authorize_meter("ACME", METER, NOW)
    ledger.authorize_meter("ACME", METER, NOW)  # again: nothing changes
    ledger.authorize_meter("ACME", OTHER_METER, NOW)
    account = ledger.account("ACME")
    assert account.available == account.funded == 75_500
    assert account.meters == (METER, OTHER_METER)
    assert account.name == "Acme Mailing Ltd"
    assert ledger.customer_of(OTHER_METER) == "ACME"
    assert ledger.customer_of(12345) is None
    assert ledger.customers() == ["ACME"]
    assert ledger.check_totals() == []


def test_ledger_survives_reopening(location: str) -> None:
    first = open_ledger(location)
    first.create_customer("ACME", "Acme", NOW)
    first.fund("ACME", 9_000, "pay-1", NOW)
    first.close()
    again = open_ledger(location)
    try:
        assert again.available("ACME") == 9_000
    finally:
        again.close()


# -- two-phase credit --------------------------------------------------------------------


def test_prepare_commit_moves_funds_to_the_meter(funded: SqlLedger) -> None:
    prepared = funded.prepare(txid(1), "ACME", METER, 30_000, NOW, LATER)
    assert prepared.state is TransactionState.PREPARED
    assert funded.available("ACME") == 70_000
    assert funded.account("ACME").reserved == 30_000
    assert [t.transaction_id for t in funded.open_transactions(METER)] == [txid(1)]
    assert funded.credited(METER) == 0
    committed = funded.commit(txid(1), b"receipt-1", NOW + timedelta(minutes=1))
    assert committed.state is TransactionState.COMMITTED
    assert committed.receipt == b"receipt-1"
    assert funded.transaction(txid(1)) == committed
    assert funded.available("ACME") == 70_000
    assert funded.credited(METER) == 30_000
    assert funded.credited_totals() == {METER: 30_000}
    assert funded.open_transactions(METER) == []
    assert funded.check_totals() == []


def test_abort_releases_the_reservation(funded: SqlLedger) -> None:
    funded.prepare(txid(1), "ACME", METER, 40_000, NOW, LATER)
    aborted = funded.abort(txid(1), "meter never applied it", LATER)
    assert aborted.state is TransactionState.ABORTED
    assert aborted.reason == "meter never applied it"
    assert funded.available("ACME") == 100_000
    assert funded.credited(METER) == 0
    assert funded.check_totals() == []


def test_prepare_is_idempotent_for_the_same_parameters(funded: SqlLedger) -> None:
    first = funded.prepare(txid(7), "ACME", METER, 10_000, NOW, LATER)
    again = funded.prepare(txid(7), "ACME", METER, 10_000, NOW + timedelta(seconds=5), LATER)
    assert again == first
    assert funded.available("ACME") == 90_000  # reserved once


def test_same_transaction_id_with_other_parameters_is_refused(funded: SqlLedger) -> None:
    funded.prepare(txid(7), "ACME", METER, 10_000, NOW, LATER)
    before = snapshot(funded)
    for customer, meter, amount in (("ACME", METER, 10_001), ("OTHER", OTHER_METER, 10_000)):
        with pytest.raises(ProtocolError, match="prepared already"):
            funded.prepare(txid(7), customer, meter, amount, NOW, LATER)
    assert snapshot(funded) == before


def test_commit_is_idempotent_for_the_same_receipt_only(funded: SqlLedger) -> None:
    funded.prepare(txid(1), "ACME", METER, 1_000, NOW, LATER)
    first = funded.commit(txid(1), b"receipt", NOW)
    assert funded.commit(txid(1), b"receipt", LATER) == first
    before = snapshot(funded)
    with pytest.raises(ProtocolError, match="another receipt"):
        funded.commit(txid(1), b"forged receipt", LATER)
    with pytest.raises(ProtocolError, match="only a prepared"):
        funded.abort(txid(1), "too late", LATER)
    assert snapshot(funded) == before


def test_no_commit_after_abort_and_no_second_abort(funded: SqlLedger) -> None:
    funded.prepare(txid(1), "ACME", METER, 1_000, NOW, LATER)
    funded.abort(txid(1), "expired", LATER)
    before = snapshot(funded)
    with pytest.raises(ProtocolError, match="aborted"):
        funded.commit(txid(1), b"receipt", LATER)
    with pytest.raises(ProtocolError, match="only a prepared"):
        funded.abort(txid(1), "again", LATER)
    assert snapshot(funded) == before
    assert funded.available("ACME") == 100_000


def test_unknown_transactions_are_refused(funded: SqlLedger) -> None:
    before = snapshot(funded)
    with pytest.raises(ProtocolError, match="unknown transaction"):
        funded.commit(txid(99), b"receipt", NOW)
    with pytest.raises(ProtocolError, match="unknown transaction"):
        funded.abort(txid(99), "why", NOW)
    assert funded.transaction(txid(99)) is None
    assert snapshot(funded) == before


def test_expired_lists_prepared_transactions_past_their_time(funded: SqlLedger) -> None:
    funded.prepare(txid(1), "ACME", METER, 1_000, NOW, NOW + timedelta(minutes=1))
    funded.prepare(txid(2), "ACME", METER, 1_000, NOW, NOW + timedelta(minutes=5))
    funded.prepare(txid(3), "ACME", METER, 1_000, NOW, NOW + timedelta(minutes=1))
    funded.commit(txid(3), b"receipt", NOW)
    assert funded.expired(NOW) == []
    assert [t.transaction_id for t in funded.expired(NOW + timedelta(minutes=2))] == [txid(1)]
    assert len(funded.expired(NOW + timedelta(minutes=6))) == 2


def test_transactions_of_a_customer_newest_first(funded: SqlLedger) -> None:
    for n in range(3):
        funded.prepare(txid(n), "ACME", METER, 1_000, NOW + timedelta(seconds=n), LATER)
    assert [t.transaction_id for t in funded.transactions_of("ACME")] == [
        txid(2),
        txid(1),
        txid(0),
    ]
    assert funded.transactions_of("OTHER") == []


# -- refusals: each leaves every balance as it was ------------------------------------------


REFUSALS: dict[str, tuple[type[Exception], str, Callable[[SqlLedger], object]]] = {
    "above the funds": (
        InsufficientFunds,
        "available",
        lambda ledger: ledger.prepare(txid(50), "ACME", METER, 100_001, NOW, LATER),
    ),
    "zero credit": (
        InvalidInput,
        "positive",
        lambda ledger: ledger.prepare(txid(51), "ACME", METER, 0, NOW, LATER),
    ),
    "negative credit": (
        InvalidInput,
        "positive",
        lambda ledger: ledger.prepare(txid(52), "ACME", METER, -5_000, NOW, LATER),
    ),
    "credit beyond a register": (
        InvalidInput,
        "at most",
        lambda ledger: ledger.prepare(txid(53), "ACME", METER, 2**40, NOW, LATER),
    ),
    "a boolean amount": (
        InvalidInput,
        "positive",
        lambda ledger: ledger.prepare(txid(54), "ACME", METER, True, NOW, LATER),
    ),
    "unknown customer": (
        InvalidInput,
        "unknown customer",
        lambda ledger: ledger.prepare(txid(55), "NOBODY", METER, 1_000, NOW, LATER),
    ),
    "unknown meter": (
        InvalidInput,
        "unknown meter",
        lambda ledger: ledger.prepare(txid(56), "ACME", 4242, 1_000, NOW, LATER),
    ),
    "meter of another customer": (
        InvalidInput,
        "another customer",
        lambda ledger: ledger.prepare(txid(57), "ACME", OTHER_METER, 1_000, NOW, LATER),
    ),
    "expiry before now": (
        InvalidInput,
        "not after",
        lambda ledger: ledger.prepare(txid(58), "ACME", METER, 1_000, NOW, NOW),
    ),
    "short transaction id": (
        InvalidInput,
        "16 bytes",
        lambda ledger: ledger.prepare(b"short", "ACME", METER, 1_000, NOW, LATER),
    ),
    "naive time": (
        InvalidInput,
        "time zone",
        lambda ledger: ledger.prepare(
            txid(59), "ACME", METER, 1_000, NOW.replace(tzinfo=None), LATER
        ),
    ),
    "zero payment": (InvalidInput, "positive", lambda ledger: ledger.fund("ACME", 0, "p0", NOW)),
    "negative payment": (
        InvalidInput,
        "positive",
        lambda ledger: ledger.fund("ACME", -1, "p-neg", NOW),
    ),
    "payment to an unknown customer": (
        InvalidInput,
        "unknown customer",
        lambda ledger: ledger.fund("NOBODY", 1_000, "p9", NOW),
    ),
    "the same payment twice": (
        InvalidInput,
        "recorded already",
        lambda ledger: ledger.fund("ACME", 1_000, "pay-1", NOW),
    ),
    "meter authorized to another customer": (
        InvalidInput,
        "another customer",
        lambda ledger: ledger.authorize_meter("ACME", OTHER_METER, NOW),
    ),
    "meter to an unknown customer": (
        InvalidInput,
        "unknown customer",
        lambda ledger: ledger.authorize_meter("NOBODY", 777, NOW),
    ),
    "serial zero": (
        InvalidInput,
        "device serial",
        lambda ledger: ledger.authorize_meter("ACME", 0, NOW),
    ),
    "serial beyond 8 bytes": (
        InvalidInput,
        "device serial",
        lambda ledger: ledger.authorize_meter("ACME", 2**64, NOW),
    ),
    "a customer twice": (
        InvalidInput,
        "exists already",
        lambda ledger: ledger.create_customer("ACME", "Again", NOW),
    ),
    "a malformed customer id": (
        InvalidInput,
        "customer account",
        lambda ledger: ledger.create_customer("bad id!", "Name", NOW),
    ),
    "refund beyond the credit": (
        InvalidInput,
        "exceeds",
        lambda ledger: ledger.record_refund("ACME", METER, 1, "withdrawn", NOW),
    ),
    "refund for another customer's meter": (
        InvalidInput,
        "another customer",
        lambda ledger: ledger.record_refund("ACME", OTHER_METER, 1, "withdrawn", NOW),
    ),
    "audit of an unknown meter": (
        InvalidInput,
        "unknown meter",
        lambda ledger: ledger.record_audit(4242, b"report", "ok", {}, NOW),
    ),
    "audit details not JSON": (
        InvalidInput,
        "not JSON",
        lambda ledger: ledger.record_audit(METER, b"report", "ok", {"x": object()}, NOW),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_changes_nothing(funded: SqlLedger, case: str) -> None:
    kind, message, call = REFUSALS[case]
    before = snapshot(funded)
    with pytest.raises(kind, match=message):
        call(funded)
    assert snapshot(funded) == before
    assert funded.check_totals() == []


# -- audits and refunds ------------------------------------------------------------------------


def test_audits_keep_the_latest(funded: SqlLedger) -> None:
    assert funded.last_audit(METER) is None
    funded.record_audit(METER, b"report-1", "ok", {"ascending": 10}, NOW)
    funded.record_audit(METER, b"report-2", "mismatch", {"ascending": 12, "why": "x"}, LATER)
    last = funded.last_audit(METER)
    assert last is not None
    assert (last["report"], last["outcome"], last["details"]) == (
        b"report-2",
        "mismatch",
        {"ascending": 12, "why": "x"},
    )
    assert last["at"] == LATER


def test_refund_of_a_withdrawn_meter_returns_funds(funded: SqlLedger) -> None:
    funded.prepare(txid(1), "ACME", METER, 60_000, NOW, LATER)
    funded.commit(txid(1), b"receipt", NOW)
    assert funded.record_refund("ACME", METER, 25_000, "withdrawn: descending", LATER) == 65_000
    assert funded.account("ACME").refunded == 25_000
    with pytest.raises(InvalidInput, match="exceeds"):
        funded.record_refund("ACME", METER, 35_001, "again", LATER)
    assert funded.available("ACME") == 65_000
    assert funded.check_totals() == []


def test_a_refund_id_refunds_once_per_meter(funded: SqlLedger) -> None:
    funded.prepare(txid(1), "ACME", METER, 60_000, NOW, LATER)
    funded.commit(txid(1), b"receipt", NOW)
    assert funded.record_refund("ACME", METER, 25_000, "final", LATER, refund_id="w") == 65_000
    assert funded.record_refund("ACME", METER, 25_000, "final", LATER, refund_id="w") == 65_000
    assert funded.refunded(METER) == 25_000
    assert funded.refund_made(METER, "w") == 25_000
    assert funded.refund_made(METER, "other") is None
    before = snapshot(funded)
    with pytest.raises(ProtocolError, match="recorded as"):
        funded.record_refund("ACME", METER, 24_000, "final", LATER, refund_id="w")
    assert snapshot(funded) == before  # refused, nothing changed
    # The id is per meter: another meter's refund may carry the same one.
    funded.prepare(txid(2), "OTHER", OTHER_METER, 5_000, NOW, LATER)
    funded.commit(txid(2), b"receipt", NOW)
    assert funded.record_refund("OTHER", OTHER_METER, 1_000, "final", LATER, refund_id="w") == 1_000
    assert funded.refunded(OTHER_METER) == 1_000 and funded.refunded(METER) == 25_000
    assert funded.check_totals() == []


def test_the_database_itself_refuses_a_second_refund_of_one_id(funded: SqlLedger) -> None:
    """The refunds_once constraint, not only the ledger's look before it inserts."""
    funded.prepare(txid(1), "ACME", METER, 60_000, NOW, LATER)
    funded.commit(txid(1), b"receipt", NOW)
    funded.record_refund("ACME", METER, 1_000, "final", LATER, refund_id="w")
    with pytest.raises(funded._conflicts), funded._transaction() as db:
        db.run(
            "INSERT INTO refunds (customer, device_serial, amount, reason, at, refund_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            "ACME",
            f"{METER:020d}",
            1_000,
            "raced",
            "2026-12-02T09:10:00.000000+00:00",
            "w",
        )
    assert funded.refunded(METER) == 1_000


def test_a_format_1_ledger_is_migrated_with_its_withdrawal_refund(location: str) -> None:
    """A ledger written before refund ids: opened, it gets them; its withdrawal refund takes
    the withdrawal's id, so a rerun of that withdrawal refunds nothing more."""
    from meter.provider.ledger_schema import POSTGRES, SQLITE

    dialect = POSTGRES if location.startswith("postgresql") else SQLITE
    old = [
        st.replace(",\n    refund_id TEXT NOT NULL", "")
        for st in dialect.ddl()
        if "refunds_once" not in st
    ]
    key = f"{METER:020d}"
    rows: list[tuple[Any, ...]] = [
        ("INSERT INTO ledger_meta (key, value) VALUES ('format', '1')",),
        ("INSERT INTO customers VALUES ('ACME', 'Acme', 75000, ?)", "2026-12-02T09:00:00+00:00"),
        (
            "INSERT INTO payments (customer, amount, reference, at) "
            "VALUES ('ACME', 50000, 'p', 'x')",
        ),
        ("INSERT INTO meters VALUES (?, 'ACME', 'x')", key),
        (
            "INSERT INTO transactions (transaction_id, customer, device_serial, amount, state, "
            "prepared_at, expires_at) VALUES (?, 'ACME', ?, 40000, 'committed', 'x', 'x')",
            txid(1),
            key,
        ),
        (
            "INSERT INTO refunds (customer, device_serial, amount, reason, at) "
            "VALUES ('ACME', ?, 5000, 'partial', 'x')",
            key,
        ),
        (
            "INSERT INTO refunds (customer, device_serial, amount, reason, at) "
            f"VALUES ('ACME', ?, 60000, 'withdrawal of meter {METER}: final descending', 'x')",
            key,
        ),
    ]
    if dialect is SQLITE:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(location) as db:
            db.execute("PRAGMA application_id=1346454339")
            for statement in old:
                db.execute(statement)
            for sql, *params in rows:
                db.execute(sql, params)
        db.close()
    else:
        import psycopg

        with psycopg.connect(location, autocommit=True) as pg:
            for statement in old:
                pg.execute(statement)
            for sql, *params in rows:
                pg.execute(dialect.sql(sql), params)
    ledger = open_ledger(location)
    try:
        assert ledger.refund_made(METER, "withdrawal") == 60_000
        assert ledger.refunded(METER) == 65_000
        again = ledger.record_refund("ACME", METER, 60_000, "again", NOW, refund_id="withdrawal")
        assert again == 75_000
        assert ledger.check_totals() == []
        assert ledger.refunded(METER) == 65_000
    finally:
        ledger.close()
    reopened = open_ledger(location)  # format 2 now: opens as it is
    try:
        assert reopened.refunded(METER) == 65_000
    finally:
        reopened.close()


# -- concurrency and crashes ----------------------------------------------------------------------


def test_sigkill_between_the_refund_and_its_journal_refunds_once(location: str) -> None:
    """The provider dies right after the ledger made the withdrawal refund; another refund of
    the same customer lands before the rerun; the rerun refunds nothing more."""
    withdrawn, other = METER, OTHER_METER
    at = datetime.now(UTC)
    ledger = open_ledger(location)
    try:
        ledger.create_customer("ACME", "Demo mailer", at)
        ledger.fund("ACME", 500_000, "wire-1", at)
        for n, (meter, amount) in enumerate(((withdrawn, 100_000), (other, 50_000))):
            ledger.authorize_meter("ACME", meter, at)
            tx = n.to_bytes(16, "big")
            ledger.prepare(tx, "ACME", meter, amount, at, at + timedelta(hours=1))
            ledger.commit(tx, b"receipt", at)
        details = {
            "ascending": 40_000,
            "descending": 60_000,
            "piece_count": 12,
            "meter_time": at.isoformat(),
            "withdrawal_audited_at": at.isoformat(),
        }
        ledger.record_audit(withdrawn, b"the final report", WithdrawalOutcome.AUDITED, details, at)
        dying = ["refund-then-die", location, str(withdrawn)]
        child = subprocess.run(
            [sys.executable, "-m", "tests._audit_lab", *dying],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parent.parent,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert json.loads(child.stdout)["refunded"] is True
        assert ledger.refunded(withdrawn) == 60_000
        last = ledger.last_audit(withdrawn)
        assert last is not None and last["outcome"] == WithdrawalOutcome.AUDITED  # no journal
        # Between the crash and the rerun: another refund to the same customer.
        ledger.record_refund("ACME", other, 7_000, "partial", datetime.now(UTC))
        withdrawals = Withdrawals(
            AuditDesk(ledger, unused_certificate(), unused_signer, 1),
            RevocationBook(Path(os.devnull)),
        )
        assert withdrawals.refund(withdrawn, datetime.now(UTC)) == 60_000
        assert withdrawals.refund(withdrawn, datetime.now(UTC)) == 60_000  # and again: still once
        assert ledger.refunded(withdrawn) == 60_000
        assert ledger.account("ACME").refunded == 67_000
        last = ledger.last_audit(withdrawn)
        assert last is not None and last["outcome"] == WithdrawalOutcome.REFUNDED
        assert ledger.check_totals() == []
    finally:
        ledger.close()


def test_concurrent_prepares_never_overdraw(location: str) -> None:
    """Eight connections race 40 prepares of $10 against $95: exactly 9 succeed."""
    setup = open_ledger(location)
    setup.create_customer("ACME", "Acme", NOW)
    setup.fund("ACME", 95_000, "pay-1", NOW)
    setup.authorize_meter("ACME", METER, NOW)
    setup.close()
    ledgers = [open_ledger(location) for _ in range(8)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(ledgers))

    def worker(index: int, ledger: SqlLedger) -> None:
        barrier.wait()
        for n in range(5):
            try:
                ledger.prepare(txid(index * 100 + n), "ACME", METER, 10_000, NOW, LATER)
                outcomes.append("ok")
            except InsufficientFunds:
                outcomes.append("refused")

    threads = [threading.Thread(target=worker, args=(i, lg)) for i, lg in enumerate(ledgers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert outcomes.count("ok") == 9
        assert outcomes.count("refused") == 31
        assert ledgers[0].available("ACME") == 5_000
        assert ledgers[0].check_totals() == []
    finally:
        for ledger in ledgers:
            ledger.close()


def test_one_meter_raced_to_many_customers_goes_to_exactly_one(location: str) -> None:
    setup = open_ledger(location)
    for n in range(6):
        setup.create_customer(f"C{n}", "racer", NOW)
    setup.close()
    ledgers = [open_ledger(location) for _ in range(6)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(ledgers))

    def worker(n: int, ledger: SqlLedger) -> None:
        barrier.wait()
        try:
            ledger.authorize_meter(f"C{n}", METER, NOW)
            outcomes.append(f"C{n}")
        except InvalidInput as exc:
            assert "another customer" in str(exc)
            outcomes.append("refused")

    threads = [threading.Thread(target=worker, args=(n, lg)) for n, lg in enumerate(ledgers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        winners = [o for o in outcomes if o != "refused"]
        assert len(winners) == 1 and outcomes.count("refused") == 5
        assert ledgers[0].customer_of(METER) == winners[0]
    finally:
        for ledger in ledgers:
            ledger.close()


_CHILD_PREPARES = """
import os, sys
from datetime import UTC, datetime, timedelta
from meter.errors import InsufficientFunds
from meter.provider.ledger_sql import open_ledger
ledger = open_ledger(sys.argv[1])
now = datetime.now(UTC)
sys.stdin.readline()  # all start together
won = 0
for _ in range(5):
    try:
        ledger.prepare(os.urandom(16), "ACME", int(sys.argv[2]), 10_000, now,
                       now + timedelta(minutes=5))
        won += 1
    except InsufficientFunds:
        pass
print(won, flush=True)
"""


def test_concurrent_processes_never_overdraw(location: str) -> None:
    """Four processes race 20 prepares of $10 against $95: exactly 9 succeed."""
    setup = open_ledger(location)
    setup.create_customer("ACME", "Acme", NOW)
    setup.fund("ACME", 95_000, "pay-1", NOW)
    setup.authorize_meter("ACME", METER, NOW)
    setup.close()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD_PREPARES, location, str(METER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in range(4)
    ]
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    won = [int(child.communicate(timeout=300)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert sum(won) == 9
    check = open_ledger(location)
    try:
        assert check.available("ACME") == 5_000
        assert check.check_totals() == []
    finally:
        check.close()


_CHILD_INSIDE = """
import sys, time
from datetime import UTC, datetime, timedelta
from meter.provider.ledger_sql import open_ledger
ledger = open_ledger(sys.argv[1])
now = datetime.now(UTC)
with ledger._transaction() as db:
    db.run("INSERT INTO transactions (transaction_id, customer, device_serial, amount, state, "
           "prepared_at, expires_at) VALUES (?, 'ACME', ?, 30000, 'prepared', ?, ?)",
           bytes(16), f"{int(sys.argv[2]):020d}", now.isoformat(), now.isoformat())
    db.run("UPDATE customers SET available = available - 30000 WHERE customer = 'ACME'")
    print("inside", flush=True)
    time.sleep(600)
"""

_CHILD_LOOP = """
import os, sys
from datetime import UTC, datetime, timedelta
from meter.provider.ledger_sql import open_ledger
ledger = open_ledger(sys.argv[1])
now = datetime.now(UTC)
n = 0
while True:
    n += 1
    ledger.fund("ACME", 1_000, f"loop-{os.getpid()}-{n}", now)
    t = ledger.prepare(os.urandom(16), "ACME", int(sys.argv[2]), 700, now,
                       now + timedelta(minutes=5))
    if n % 2:
        ledger.commit(t.transaction_id, b"receipt", now)
    else:
        ledger.abort(t.transaction_id, "test", now)
    if n == 20:
        print("running", flush=True)
"""


def _child(code: str, location: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, location, str(METER)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def _kill(child: subprocess.Popen[str], wait_for: str) -> None:
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == wait_for
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


def test_writer_killed_inside_a_transaction_leaves_nothing(
    funded: SqlLedger, location: str
) -> None:
    before = snapshot(funded)
    _kill(_child(_CHILD_INSIDE, location), "inside")
    again = open_ledger(location)
    try:
        assert snapshot(again) == before
        assert again.transaction(bytes(16)) is None
        # The lock died with the writer: the next one goes on.
        again.prepare(txid(1), "ACME", METER, 30_000, NOW, LATER)
        assert again.available("ACME") == 70_000
        if isinstance(again, SqliteLedger):
            assert again.integrity() == "ok"
    finally:
        again.close()


def test_writer_killed_at_any_moment_keeps_the_books_whole(
    funded: SqlLedger, location: str
) -> None:
    for _ in range(3):
        _kill(_child(_CHILD_LOOP, location), "running")
        again = open_ledger(location)
        try:
            assert again.check_totals() == []
            totals = again.totals()
            # Whatever call was cut short left all of itself or none.
            assert totals["funded"] == 105_000 + 1_000 * (totals["payments"] - 2)
            assert again.available("ACME") >= 0
            if isinstance(again, SqliteLedger):
                assert again.integrity() == "ok"
        finally:
            again.close()


# -- moving to PostgreSQL ----------------------------------------------------------------------


def test_copy_sqlite_to_postgresql(tmp_path: Path) -> None:
    source = SqliteLedger(tmp_path / "accounts.db")
    source.create_customer("ACME", "Acme", NOW)
    source.fund("ACME", 100_000, "pay-1", NOW)
    source.authorize_meter("ACME", OTHER_METER, NOW)
    source.prepare(txid(1), "ACME", OTHER_METER, 30_000, NOW, LATER)
    source.commit(txid(1), b"receipt", NOW)
    source.prepare(txid(2), "ACME", OTHER_METER, 5_000, NOW, LATER)
    source.record_audit(OTHER_METER, b"report", "ok", {"a": 1}, NOW)
    source.record_refund("ACME", OTHER_METER, 1_000, "partial", NOW)
    with fresh_database() as url:
        target = open_ledger(url)
        try:
            totals = copy_ledger(source, target)
            assert totals == source.totals()
            assert target.account("ACME") == source.account("ACME")
            assert target.transaction(txid(1)) == source.transaction(txid(1))
            assert target.credited_totals() == {OTHER_METER: 30_000}
            assert target.last_audit(OTHER_METER) == source.last_audit(OTHER_METER)
            # The copy goes on where the source stopped (its numbering too).
            target.fund("ACME", 1_000, "pay-2", LATER)
            target.record_audit(OTHER_METER, b"report-2", "ok", {}, LATER)
            target.commit(txid(2), b"receipt-2", LATER)
            assert target.check_totals() == []
            with pytest.raises(InvalidInput, match="holds accounts already"):
                copy_ledger(source, target)
        finally:
            target.close()
    source.close()


def test_copy_refuses_a_source_that_does_not_add_up(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    source = SqliteLedger(path)
    source.create_customer("ACME", "Acme", NOW)
    source.fund("ACME", 10_000, "pay-1", NOW)
    source.close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE customers SET available = 999999")
    source = SqliteLedger(path)
    target = SqliteLedger(tmp_path / "copy.db")
    try:
        with pytest.raises(InvalidInput, match="does not add up"):
            copy_ledger(source, target)
        assert target.totals()["customers"] == 0
    finally:
        source.close()
        target.close()


# -- the files and servers themselves -------------------------------------------------------------


def test_sqlite_file_is_private_and_durable(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "provider" / "accounts.db")
    try:
        assert (ledger.path.stat().st_mode & 0o777) == 0o600
        with ledger._transaction() as db:
            assert db.one("PRAGMA journal_mode") == ("wal",)
            assert db.one("PRAGMA synchronous") == (2,)  # FULL
    finally:
        ledger.close()


def test_sqlite_refuses_files_that_are_not_ledgers(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is no database at all" * 100)
    with pytest.raises(ConfigurationError, match="not a usable SQLite file"):
        SqliteLedger(garbage)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE customers (x)")
    with pytest.raises(ConfigurationError, match="another program's database"):
        SqliteLedger(foreign)


def test_newer_format_is_refused(location: str) -> None:
    ledger = open_ledger(location)
    with ledger._transaction() as db:
        db.run("UPDATE ledger_meta SET value = '99' WHERE key = 'format'")
    ledger.close()
    with pytest.raises(InvalidInput, match="format '99'"):
        open_ledger(location)


def test_postgresql_bad_password_names_no_secret() -> None:
    with fresh_database() as url:
        parts = urlsplit(url)
        wrong = parts._replace(
            netloc=f"{parts.username}:wrong-secret@{parts.hostname}:{parts.port}"
        )
        wrong_url = wrong.geturl()
        with pytest.raises(ConfigurationError, match="cannot connect") as refused:
            open_ledger(wrong_url)
        assert "wrong-secret" not in str(refused.value)


def test_unknown_ledger_scheme_is_refused() -> None:
    with pytest.raises(InvalidInput, match="postgresql://"):
        open_ledger("mysql://localhost/ledger")


def test_postgresql_session_lost_is_reported_then_reopened() -> None:
    """The server ends the ledger's session (a restart, a dropped network): that call fails
    with a clear error and changes nothing, the next one opens a new session."""
    import psycopg

    from meter.provider.ledger_postgres import PostgresLedger

    with fresh_database() as url:
        ledger = PostgresLedger(url)
        try:
            ledger.create_customer("ACME", "Acme", NOW)
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (ledger._db.info.backend_pid,))
            with pytest.raises(ConfigurationError, match="the database failed"):
                ledger.fund("ACME", 1_000, "pay-1", NOW)
            assert ledger.available("ACME") == 0
            assert ledger.fund("ACME", 1_000, "pay-1", NOW) == 1_000
        finally:
            ledger.close()
