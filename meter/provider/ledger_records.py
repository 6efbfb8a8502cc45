"""The accounts ledger's audits, refunds, whole-ledger totals and copying (see ledger_sql)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from meter.errors import InvalidInput, ProtocolError
from meter.provider.ledger import TransactionState
from meter.provider.ledger_core import (
    TX_COLUMNS,
    LedgerCore,
    Statements,
    check_amount,
    check_text,
    dollars,
    plain,
    stored_instant,
    unknown_meter,
)
from meter.provider.ledger_schema import TABLES, instant, serial

__all__ = ["LedgerRecords", "copy_ledger"]

_MAX_REPORT = 64 * 1024


class LedgerRecords(LedgerCore):
    """Device audits and refunds of withdrawn meters; totals, checks and copies."""

    # -- audits, withdrawals, refunds ---------------------------------------------

    def record_audit(
        self,
        device_serial: int,
        report: bytes,
        outcome: str,
        details: dict[str, Any],
        now: datetime,
    ) -> None:
        key = serial(device_serial)
        if not isinstance(report, bytes) or not 0 < len(report) <= _MAX_REPORT:
            raise InvalidInput(f"a device audit report is 1 to {_MAX_REPORT} bytes")
        check_text(outcome, "audit outcome")
        try:
            text = json.dumps(details, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"audit details are not JSON: {exc}") from exc
        if not isinstance(details, dict):
            raise InvalidInput("audit details must be a JSON object")
        at = instant(now)
        with self._transaction() as db:
            if db.one("SELECT 1 FROM meters WHERE device_serial = ?", key) is None:
                raise unknown_meter(device_serial)
            db.run(
                "INSERT INTO audits (device_serial, report, outcome, details, at) "
                "VALUES (?, ?, ?, ?, ?)",
                key,
                report,
                outcome,
                text,
                at,
            )

    def last_audit(self, device_serial: int) -> dict[str, Any] | None:
        key = serial(device_serial)
        with self._transaction() as db:
            row = db.one(
                "SELECT report, outcome, details, at FROM audits WHERE device_serial = ? "
                "ORDER BY id DESC LIMIT 1",
                key,
            )
        if row is None:
            return None
        return {
            "device_serial": device_serial,
            "report": bytes(row[0]),
            "outcome": str(row[1]),
            "details": json.loads(row[2]),
            "at": stored_instant(row[3]),
        }

    def record_refund(
        self,
        customer: str,
        device_serial: int,
        amount: int,
        reason: str,
        now: datetime,
        refund_id: str | None = None,
    ) -> int:
        """Credit ``amount`` back; with the same ``refund_id`` for the meter again, nothing
        more (the database's refunds_once constraint): the customer's available funds."""
        key = serial(device_serial)
        check_amount(amount, "refund")
        check_text(reason, "refund reason")
        once = f"r-{secrets.token_hex(12)}" if refund_id is None else refund_id
        check_text(once, "refund id")
        at = instant(now)
        try:
            with self._transaction() as db:
                available = self._lock_customer(db, customer)
                owner = db.one("SELECT customer FROM meters WHERE device_serial = ?", key)
                if owner is None:
                    raise unknown_meter(device_serial)
                if owner[0] != customer:
                    raise InvalidInput(
                        f"meter {device_serial} is authorized to another customer, not "
                        f"{customer!r}; nothing was refunded"
                    )
                made = _made(db, key, once, customer, amount, device_serial)
                if made:
                    return available  # refunded already: the rerun changes nothing
                credited = db.number(
                    "SELECT SUM(amount) FROM transactions WHERE device_serial = ? "
                    "AND state = 'committed'",
                    key,
                )
                refunded = db.number("SELECT SUM(amount) FROM refunds WHERE device_serial = ?", key)
                if refunded + amount > credited:
                    raise InvalidInput(
                        f"a refund of {dollars(amount)} for meter {device_serial} exceeds what "
                        f"it was credited ({dollars(credited)}, {dollars(refunded)} refunded "
                        "before); nothing was refunded"
                    )
                db.run(
                    "INSERT INTO refunds (customer, device_serial, amount, reason, at, refund_id) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    customer,
                    key,
                    amount,
                    reason,
                    at,
                    once,
                )
                db.run(
                    "UPDATE customers SET available = available + ? WHERE customer = ?",
                    amount,
                    customer,
                )
                return available + amount
        except self._conflicts:
            # Another session recorded this refund id between our look and insert: the rerun
            # now finds it (and refuses it if its amount differs).
            if refund_id is None:
                raise
            return self.record_refund(customer, device_serial, amount, reason, now, refund_id)

    def refunded(self, device_serial: int) -> int:
        """Everything refunded for one meter, in mills."""
        key = serial(device_serial)
        with self._transaction() as db:
            return db.number("SELECT SUM(amount) FROM refunds WHERE device_serial = ?", key)

    def refund_made(self, device_serial: int, refund_id: str) -> int | None:
        """The amount of the meter's refund ``refund_id``, or None if there is none."""
        key = serial(device_serial)
        with self._transaction() as db:
            row = db.one(
                "SELECT amount FROM refunds WHERE device_serial = ? AND refund_id = ?",
                key,
                refund_id,
            )
        return None if row is None else int(row[0])

    # -- checking and copying -------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """Whole-ledger figures (a copy must have the same ones)."""
        with self._transaction() as db:
            return _totals(db)

    def check_totals(self) -> list[str]:
        """Every customer whose running balance disagrees with its records (empty: none)."""
        with self._transaction() as db:
            return _problems(db)

    def rows(self) -> Iterator[tuple[str, list[str], list[tuple[Any, ...]]]]:
        """Every table's (name, columns, rows), in load order: what a copy reads."""
        with self._transaction() as db:
            for table in TABLES:
                columns = self._columns(db, table)
                order = "key" if table == "ledger_meta" else columns[0]
                rows = db.all(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
                yield table, columns, [tuple(plain(v) for v in r) for r in rows]

    def load(
        self,
        tables: Iterator[tuple[str, list[str], list[tuple[Any, ...]]]],
        expected: dict[str, int],
    ) -> None:
        """Fill this empty ledger with another's rows, in one transaction that commits only
        if its totals come out as ``expected`` and every balance adds up."""
        with self._transaction() as db:
            if _totals(db)["customers"] or _totals(db)["transactions"]:
                raise InvalidInput(f"{self.where} holds accounts already: copy into an empty one")
            for table, columns, rows in tables:
                if table == "ledger_meta":
                    continue  # created with the tables
                if rows:
                    marks = ", ".join("?" for _ in columns)
                    db.many(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
            self._after_load(db)
            found = _totals(db)
            differ = {k: (v, found.get(k)) for k, v in expected.items() if found.get(k) != v}
            problems = _problems(db)
            if differ or problems:
                raise InvalidInput(
                    f"the copy into {self.where} does not match its source "
                    f"({differ or '; '.join(problems)}); nothing was copied"
                )

    def _after_load(self, db: Statements) -> None:
        """Back-end housekeeping once rows were copied in with their ids (SQLite: none)."""
        return None

    @staticmethod
    def _columns(db: Statements, table: str) -> list[str]:
        return {
            "ledger_meta": ["key", "value"],
            "customers": ["customer", "name", "available", "created_at"],
            "payments": ["id", "customer", "amount", "reference", "at"],
            "meters": ["device_serial", "customer", "authorized_at"],
            "transactions": [c.strip() for c in TX_COLUMNS.split(",")],
            "refunds": ["id", "customer", "device_serial", "amount", "reason", "at", "refund_id"],
            "audits": ["id", "device_serial", "report", "outcome", "details", "at"],
        }[table]


def copy_ledger(source: LedgerRecords, target: LedgerRecords) -> dict[str, int]:
    """Copy every row of ``source`` into the empty ``target`` (``meter provider migrate``).

    All or nothing: the target's one transaction commits only once its totals
    equal the source's and every balance adds up. The source is held (its
    write lock or transaction) while it is read, so nothing changes under the copy.
    """
    problems = source.check_totals()
    if problems:
        raise InvalidInput(
            f"{source.where} does not add up, so it is not copied: {'; '.join(problems)}"
        )
    expected = source.totals()
    target.load(source.rows(), expected)
    return target.totals()


def _made(
    db: Statements, key: str, refund_id: str, customer: str, amount: int, device_serial: int
) -> bool:
    """Whether the meter's refund ``refund_id`` exists (same customer and amount), inside the
    refund's transaction; ProtocolError if it exists with other figures."""
    row = db.one(
        "SELECT customer, amount FROM refunds WHERE device_serial = ? AND refund_id = ?",
        key,
        refund_id,
    )
    if row is None:
        return False
    if (str(row[0]), int(row[1])) != (customer, amount):
        raise ProtocolError(
            f"refund {refund_id!r} of meter {device_serial} was recorded as {dollars(int(row[1]))} "
            f"to {row[0]!r}, not {dollars(amount)} to {customer!r}; nothing was refunded"
        )
    return True


def _totals(db: Statements) -> dict[str, int]:
    figures = {
        "customers": db.number("SELECT COUNT(*) FROM customers"),
        "meters": db.number("SELECT COUNT(*) FROM meters"),
        "payments": db.number("SELECT COUNT(*) FROM payments"),
        "funded": db.number("SELECT SUM(amount) FROM payments"),
        "refunds": db.number("SELECT COUNT(*) FROM refunds"),
        "refunded": db.number("SELECT SUM(amount) FROM refunds"),
        "available": db.number("SELECT SUM(available) FROM customers"),
        "transactions": db.number("SELECT COUNT(*) FROM transactions"),
        "audits": db.number("SELECT COUNT(*) FROM audits"),
    }
    for state in TransactionState:
        figures[state.value] = db.number(
            "SELECT SUM(amount) FROM transactions WHERE state = ?", state.value
        )
    return figures


def _problems(db: Statements) -> list[str]:
    problems = []
    for customer, available in db.all("SELECT customer, available FROM customers"):
        paid = db.number("SELECT SUM(amount) FROM payments WHERE customer = ?", customer)
        back = db.number("SELECT SUM(amount) FROM refunds WHERE customer = ?", customer)
        spent = db.number(
            "SELECT SUM(amount) FROM transactions WHERE customer = ? AND state <> 'aborted'",
            customer,
        )
        if int(available) != paid + back - spent:
            problems.append(
                f"customer {customer!r}: available {available} mills, but payments "
                f"{paid} + refunds {back} - credit {spent} = {paid + back - spent}"
            )
    return problems
