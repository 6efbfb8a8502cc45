"""The accounts ledger's base over one SQL database: statements, locks, rows, checks of values.

The rules themselves are in ledger_sql (customers, funds, the two-phase credit)
and ledger_records (audits, refunds, totals and copying); the back ends
(ledger_sqlite, ledger_postgres) give the connection and the transaction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from meter.errors import InvalidInput, ProtocolError
from meter.provider.ledger import Transaction, TransactionState
from meter.provider.ledger_schema import (
    FORMAT,
    MAX_MILLS,
    MIGRATIONS,
    Dialect,
    from_instant,
    from_serial,
)

__all__ = [
    "TX_COLUMNS",
    "LedgerCore",
    "Statements",
    "check_amount",
    "check_text",
    "check_transaction_id",
    "dollars",
    "plain",
    "row_transaction",
    "stored_instant",
    "unknown_customer",
    "unknown_meter",
    "unknown_transaction",
]

TX_COLUMNS = (
    "transaction_id, customer, device_serial, amount, state, prepared_at, expires_at, "
    "settled_at, receipt, reason"
)
_MAX_TEXT = 200  # names, payment references, reasons


class Statements:
    """A cursor inside one transaction, speaking the shared SQL (``?`` placeholders)."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def run(self, sql: str, *params: Any) -> int:
        self._cursor.execute(self._dialect.sql(sql), params)
        return int(self._cursor.rowcount)

    def one(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        self._cursor.execute(self._dialect.sql(sql), params)
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        self._cursor.execute(self._dialect.sql(sql), params)
        return [tuple(row) for row in self._cursor.fetchall()]

    def number(self, sql: str, *params: Any) -> int:
        """One integer (a SUM is NULL over no rows: 0)."""
        row = self.one(sql, *params)
        return 0 if row is None or row[0] is None else int(row[0])

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(self._dialect.sql(sql), rows)


class LedgerCore(ABC):
    """What every ledger rule works with: the transaction, the row locks, the tables."""

    dialect: Dialect
    where: str  # the database, as messages name it (never a password)

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Statements]:
        """One transaction that may write; committed on a normal exit, else rolled back."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def _conflicts(self) -> tuple[type[Exception], ...]:
        """The driver's unique-constraint errors (a race another session won)."""

    # -- setting up ---------------------------------------------------------

    def _create_tables(self, db: Statements) -> None:
        meta, *tables = self.dialect.ddl()  # ledger_meta first: it says which format is there
        db.run(meta)
        found = db.one("SELECT value FROM ledger_meta WHERE key = 'format'")
        if found is not None and found[0] in MIGRATIONS:  # an older format: brought up to date
            for statement in MIGRATIONS[found[0]]:
                db.run(statement)
            db.run("UPDATE ledger_meta SET value = ? WHERE key = 'format'", FORMAT)
            found = (FORMAT,)
        for statement in tables:
            db.run(statement)
        if found is None:
            db.run("INSERT INTO ledger_meta (key, value) VALUES ('format', ?)", FORMAT)
        elif found[0] != FORMAT:
            raise InvalidInput(
                f"{self.where}: accounts ledger format {found[0]!r}, this program reads "
                f"format {FORMAT!r}: use the version of meter that wrote it"
            )

    # -- helpers inside a transaction ---------------------------------------------

    def _lock_customer(self, db: Statements, customer: str) -> int:
        """Lock the customer's row for this transaction; its available funds."""
        return self._customer_row(db, customer, lock=True)

    def _customer_row(self, db: Statements, customer: str, *, lock: bool) -> int:
        if not isinstance(customer, str) or not customer:
            raise unknown_customer(customer)
        suffix = self.dialect.lock_suffix if lock else ""
        row = db.one(f"SELECT available FROM customers WHERE customer = ?{suffix}", customer)
        if row is None:
            raise unknown_customer(customer)
        return int(row[0])

    def _locked_transaction(self, db: Statements, transaction_id: bytes) -> Transaction:
        row = db.one(
            f"SELECT {TX_COLUMNS} FROM transactions WHERE transaction_id = ?"
            f"{self.dialect.lock_suffix}",
            transaction_id,
        )
        if row is None:
            raise unknown_transaction(transaction_id)
        return row_transaction(row)


def row_transaction(row: tuple[Any, ...]) -> Transaction:
    txid, customer, device, amount, state, prepared, expires, settled, receipt, reason = row
    return Transaction(
        transaction_id=bytes(txid),
        customer=str(customer),
        device_serial=from_serial(device),
        amount=int(amount),
        state=TransactionState(state),
        prepared_at=stored_instant(prepared),
        expires_at=stored_instant(expires),
        settled_at=from_instant(settled),
        receipt=None if receipt is None else bytes(receipt),
        reason=reason,
    )


def stored_instant(text: str) -> datetime:
    value = from_instant(text)
    assert value is not None
    return value


def plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def check_transaction_id(transaction_id: object) -> None:
    if not isinstance(transaction_id, bytes) or len(transaction_id) != 16:
        raise InvalidInput("a transaction id is 16 bytes")


def check_amount(amount: object, what: str) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_MILLS:
        raise InvalidInput(
            f"{what} amount {amount!r} mills: give a positive amount, at most {MAX_MILLS} mills; "
            "nothing was changed"
        )


def check_text(value: object, what: str) -> None:
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > _MAX_TEXT
        or not value.isprintable()
    ):
        raise InvalidInput(f"{what} {value!r}: give 1 to {_MAX_TEXT} printable characters")


def dollars(mills: int) -> str:
    return f"${mills // 1000}.{mills % 1000:03d}"


def unknown_customer(customer: object) -> InvalidInput:
    return InvalidInput(
        f"unknown customer {customer!r}: create it first (POST /v1/customers); nothing was changed"
    )


def unknown_meter(device_serial: int) -> InvalidInput:
    return InvalidInput(
        f"unknown meter {device_serial}: no customer has it authorized; nothing was changed"
    )


def unknown_transaction(transaction_id: bytes) -> ProtocolError:
    return ProtocolError(f"unknown transaction {transaction_id.hex()}; nothing was changed")
