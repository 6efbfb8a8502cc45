"""The accounts ledger's rules, once, over either SQL back end (ledger_sqlite, ledger_postgres).

Every public call runs in one database transaction (``_transaction``): a
refusal raises inside it, so it rolls back and nothing is recorded. Changes
to a customer's funds first lock the customer's row (``_lock_customer``),
which on PostgreSQL serializes them per customer and on SQLite is already
covered by BEGIN IMMEDIATE; so two prepares against one customer cannot both
spend the same funds.

Refusals: ``InvalidInput`` for a bad value or an unknown or foreign customer
or meter, ``InsufficientFunds`` for an amount above the available funds,
``ProtocolError`` for a transaction id misused (reused with other parameters,
unknown, or moved out of order: commit after abort, abort after commit).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from meter.errors import InsufficientFunds, InvalidInput, ProtocolError
from meter.protocol.authorization import check_customer_id
from meter.provider.ledger import Account, Transaction, TransactionState
from meter.provider.ledger_core import (
    TX_COLUMNS,
    Statements,
    check_amount,
    check_text,
    check_transaction_id,
    dollars,
    row_transaction,
    stored_instant,
    unknown_customer,
    unknown_transaction,
)
from meter.provider.ledger_records import LedgerRecords, copy_ledger
from meter.provider.ledger_schema import from_serial, instant, serial

__all__ = ["SqlLedger", "Statements", "copy_ledger", "open_ledger"]

_MAX_RECEIPT = 4096


def open_ledger(location: str | Path) -> SqlLedger:
    """The ledger at a postgresql:// URL, or in the SQLite file at a path."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from meter.provider.ledger_postgres import PostgresLedger

        return PostgresLedger(text)
    if "://" in text:
        raise InvalidInput(
            f"ledger location {text.split('://')[0]}://...: give a SQLite file's path or a "
            "postgresql:// URL"
        )
    from meter.provider.ledger_sqlite import SqliteLedger

    return SqliteLedger(Path(text))


class SqlLedger(LedgerRecords):
    """``meter.provider.ledger.Ledger`` over one SQL database."""

    # -- customers, funds, meters ---------------------------------------------

    def create_customer(self, customer: str, name: str, now: datetime) -> None:
        check_customer_id(customer)
        check_text(name, "customer name")
        at = instant(now)
        exists = InvalidInput(f"customer {customer!r} exists already; nothing was changed")
        try:
            with self._transaction() as db:
                if db.one("SELECT 1 FROM customers WHERE customer = ?", customer) is not None:
                    raise exists
                db.run(
                    "INSERT INTO customers (customer, name, available, created_at) "
                    "VALUES (?, ?, 0, ?)",
                    customer,
                    name,
                    at,
                )
        except self._conflicts as exc:  # another session created it between look and insert
            raise exists from exc

    def fund(self, customer: str, amount: int, reference: str, now: datetime) -> int:
        check_amount(amount, "payment")
        check_text(reference, "payment reference")
        at = instant(now)
        with self._transaction() as db:
            available = self._lock_customer(db, customer)
            if (
                db.one(
                    "SELECT 1 FROM payments WHERE customer = ? AND reference = ?",
                    customer,
                    reference,
                )
                is not None
            ):
                raise InvalidInput(
                    f"payment {reference!r} of customer {customer!r} is recorded already; "
                    "nothing was changed (give each payment its own reference)"
                )
            db.run(
                "INSERT INTO payments (customer, amount, reference, at) VALUES (?, ?, ?, ?)",
                customer,
                amount,
                reference,
                at,
            )
            db.run(
                "UPDATE customers SET available = available + ? WHERE customer = ?",
                amount,
                customer,
            )
            return available + amount

    def available(self, customer: str) -> int:
        with self._transaction() as db:
            return self._customer_row(db, customer, lock=False)

    def authorize_meter(self, customer: str, device_serial: int, now: datetime) -> None:
        key = serial(device_serial)
        at = instant(now)
        foreign = InvalidInput(
            f"meter {device_serial} is authorized to another customer, not "
            f"{customer!r}; nothing was changed (withdraw it from that account first)"
        )
        try:
            with self._transaction() as db:
                self._lock_customer(db, customer)
                found = db.one("SELECT customer FROM meters WHERE device_serial = ?", key)
                if found is not None:
                    if found[0] == customer:
                        return  # authorized already: nothing to do
                    raise foreign
                db.run(
                    "INSERT INTO meters (device_serial, customer, authorized_at) VALUES (?, ?, ?)",
                    key,
                    customer,
                    at,
                )
        except self._conflicts as exc:  # another customer's session took it meanwhile
            raise foreign from exc

    def customer_of(self, device_serial: int) -> str | None:
        key = serial(device_serial)
        with self._transaction() as db:
            row = db.one("SELECT customer FROM meters WHERE device_serial = ?", key)
        return None if row is None else str(row[0])

    def account(self, customer: str) -> Account:
        """A customer's name, funds and meters."""
        with self._transaction() as db:
            row = db.one(
                "SELECT customer, name, available, created_at FROM customers WHERE customer = ?",
                customer,
            )
            if row is None:
                raise unknown_customer(customer)
            meters = db.all(
                "SELECT device_serial FROM meters WHERE customer = ? ORDER BY device_serial",
                customer,
            )
            funded = db.number("SELECT SUM(amount) FROM payments WHERE customer = ?", customer)
            refunded = db.number("SELECT SUM(amount) FROM refunds WHERE customer = ?", customer)
            reserved = db.number(
                "SELECT SUM(amount) FROM transactions WHERE customer = ? AND state = 'prepared'",
                customer,
            )
            committed = db.number(
                "SELECT SUM(amount) FROM transactions WHERE customer = ? AND state = 'committed'",
                customer,
            )
        return Account(
            customer=str(row[0]),
            name=str(row[1]),
            available=int(row[2]),
            funded=funded,
            refunded=refunded,
            reserved=reserved,
            credited=committed,
            created_at=stored_instant(row[3]),
            meters=tuple(from_serial(m[0]) for m in meters),
        )

    def customers(self) -> list[str]:
        with self._transaction() as db:
            return [str(r[0]) for r in db.all("SELECT customer FROM customers ORDER BY customer")]

    def transactions_of(self, customer: str, limit: int = 100) -> list[Transaction]:
        """The customer's latest transactions, newest first."""
        if not 0 < limit <= 10_000:
            raise InvalidInput(f"limit {limit}: give 1 to 10000")
        with self._transaction() as db:
            self._customer_row(db, customer, lock=False)
            rows = db.all(
                f"SELECT {TX_COLUMNS} FROM transactions WHERE customer = ? "
                "ORDER BY prepared_at DESC, transaction_id LIMIT ?",
                customer,
                limit,
            )
        return [row_transaction(r) for r in rows]

    # -- two-phase credit ---------------------------------------------------------

    def prepare(
        self,
        transaction_id: bytes,
        customer: str,
        device_serial: int,
        amount: int,
        now: datetime,
        expires_at: datetime,
    ) -> Transaction:
        check_transaction_id(transaction_id)
        check_amount(amount, "credit")
        key = serial(device_serial)
        at, until = instant(now), instant(expires_at)
        if until <= at:
            raise InvalidInput(
                f"transaction {transaction_id.hex()}: expires_at {until} is not after now {at}"
            )
        try:
            with self._transaction() as db:
                available = self._lock_customer(db, customer)
                existing = db.one(
                    f"SELECT {TX_COLUMNS} FROM transactions WHERE transaction_id = ?",
                    transaction_id,
                )
                if existing is not None:
                    return _same_prepare(row_transaction(existing), customer, device_serial, amount)
                owner = db.one("SELECT customer FROM meters WHERE device_serial = ?", key)
                if owner is None:
                    raise InvalidInput(
                        f"unknown meter {device_serial}: authorize it to customer {customer!r} "
                        "first; nothing was reserved"
                    )
                if owner[0] != customer:
                    raise InvalidInput(
                        f"meter {device_serial} is authorized to another customer, not "
                        f"{customer!r}; nothing was reserved"
                    )
                if amount > available:
                    raise InsufficientFunds(
                        f"customer {customer!r} has {dollars(available)} available, "
                        f"{dollars(amount)} was asked for meter {device_serial}; nothing was "
                        "reserved (fund the account first)"
                    )
                db.run(
                    "INSERT INTO transactions (transaction_id, customer, device_serial, amount, "
                    "state, prepared_at, expires_at) VALUES (?, ?, ?, ?, 'prepared', ?, ?)",
                    transaction_id,
                    customer,
                    key,
                    amount,
                    at,
                    until,
                )
                db.run(
                    "UPDATE customers SET available = available - ? WHERE customer = ?",
                    amount,
                    customer,
                )
        except self._conflicts as exc:
            # Another customer's prepare took this id between our look and our insert.
            raise ProtocolError(
                f"transaction id {transaction_id.hex()} is in use by another transaction; "
                "nothing was reserved"
            ) from exc
        return Transaction(
            transaction_id,
            customer,
            device_serial,
            amount,
            TransactionState.PREPARED,
            stored_instant(at),
            stored_instant(until),
        )

    def commit(self, transaction_id: bytes, receipt: bytes, now: datetime) -> Transaction:
        check_transaction_id(transaction_id)
        if not isinstance(receipt, bytes) or not 0 < len(receipt) <= _MAX_RECEIPT:
            raise InvalidInput(f"a receipt is 1 to {_MAX_RECEIPT} bytes")
        at = instant(now)
        with self._transaction() as db:
            current = self._locked_transaction(db, transaction_id)
            if current.state is TransactionState.COMMITTED:
                if current.receipt == receipt:
                    return current
                raise ProtocolError(
                    f"transaction {transaction_id.hex()} is committed already with another "
                    "receipt; nothing was changed"
                )
            if current.state is TransactionState.ABORTED:
                raise ProtocolError(
                    f"transaction {transaction_id.hex()} was aborted ({current.reason}); it "
                    "cannot be committed (its funds were released)"
                )
            db.run(
                "UPDATE transactions SET state = 'committed', settled_at = ?, receipt = ? "
                "WHERE transaction_id = ?",
                at,
                receipt,
                transaction_id,
            )
        return _settled(current, TransactionState.COMMITTED, at, receipt=receipt)

    def abort(self, transaction_id: bytes, reason: str, now: datetime) -> Transaction:
        check_transaction_id(transaction_id)
        check_text(reason, "abort reason")
        at = instant(now)
        with self._transaction() as db:
            row = db.one(
                "SELECT customer FROM transactions WHERE transaction_id = ?", transaction_id
            )
            if row is None:
                raise unknown_transaction(transaction_id)
            self._lock_customer(db, str(row[0]))  # the customer first, as prepare does
            current = self._locked_transaction(db, transaction_id)
            if current.state is not TransactionState.PREPARED:
                raise ProtocolError(
                    f"transaction {transaction_id.hex()} is {current.state.value}, only a "
                    "prepared transaction can be aborted; nothing was changed"
                )
            db.run(
                "UPDATE transactions SET state = 'aborted', settled_at = ?, reason = ? "
                "WHERE transaction_id = ?",
                at,
                reason,
                transaction_id,
            )
            db.run(
                "UPDATE customers SET available = available + ? WHERE customer = ?",
                current.amount,
                current.customer,
            )
        return _settled(current, TransactionState.ABORTED, at, reason=reason)

    def transaction(self, transaction_id: bytes) -> Transaction | None:
        check_transaction_id(transaction_id)
        with self._transaction() as db:
            row = db.one(
                f"SELECT {TX_COLUMNS} FROM transactions WHERE transaction_id = ?", transaction_id
            )
        return None if row is None else row_transaction(row)

    def open_transactions(self, device_serial: int) -> list[Transaction]:
        key = serial(device_serial)
        with self._transaction() as db:
            rows = db.all(
                f"SELECT {TX_COLUMNS} FROM transactions WHERE device_serial = ? "
                "AND state = 'prepared' ORDER BY prepared_at, transaction_id",
                key,
            )
        return [row_transaction(r) for r in rows]

    def expired(self, now: datetime) -> list[Transaction]:
        at = instant(now)
        with self._transaction() as db:
            rows = db.all(
                f"SELECT {TX_COLUMNS} FROM transactions WHERE state = 'prepared' "
                "AND expires_at < ? ORDER BY expires_at, transaction_id",
                at,
            )
        return [row_transaction(r) for r in rows]

    def credited(self, device_serial: int) -> int:
        key = serial(device_serial)
        with self._transaction() as db:
            return db.number(
                "SELECT SUM(amount) FROM transactions WHERE device_serial = ? "
                "AND state = 'committed'",
                key,
            )

    def credited_totals(self) -> dict[int, int]:
        with self._transaction() as db:
            rows = db.all(
                "SELECT device_serial, SUM(amount) FROM transactions WHERE state = 'committed' "
                "GROUP BY device_serial ORDER BY device_serial"
            )
        return {from_serial(r[0]): int(r[1]) for r in rows}


def _same_prepare(
    existing: Transaction, customer: str, device_serial: int, amount: int
) -> Transaction:
    """A retried prepare gets the record it made; the same id for another one is refused."""
    if (existing.customer, existing.device_serial, existing.amount) == (
        customer,
        device_serial,
        amount,
    ):
        return existing
    raise ProtocolError(
        f"transaction id {existing.transaction_id.hex()} was prepared already for customer "
        f"{existing.customer!r}, meter {existing.device_serial}, {existing.amount} mills; "
        "a new transaction needs a new id (nothing was reserved)"
    )


def _settled(
    current: Transaction,
    state: TransactionState,
    at: str,
    receipt: bytes | None = None,
    reason: str | None = None,
) -> Transaction:
    return Transaction(
        current.transaction_id,
        current.customer,
        current.device_serial,
        current.amount,
        state,
        current.prepared_at,
        current.expires_at,
        stored_instant(at),
        receipt,
        reason,
    )
