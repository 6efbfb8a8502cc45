"""The provider's accounts ledger: the interface both back ends implement.

Customers pay funds in (``fund``); meters are authorized to a customer; credit
moves from a customer's funds to a meter only through a two-phase transaction
keyed by a 16-byte transaction id (the reload protocol, docs/reload-protocol.md):

- ``prepare`` reserves the amount against the customer's available funds and
  durably records the transaction PREPARED, with the instant after which it may
  be aborted if the meter never applied it;
- ``commit`` records it COMMITTED with the meter's signed receipt (idempotent
  for the same receipt);
- ``abort`` records it ABORTED and releases the reservation (only from PREPARED).

Available funds = funds paid in + refunds - committed credit - prepared
(reserved) credit. Every call is one database transaction, durable on return
(SQLite: WAL with synchronous=FULL; PostgreSQL: a committed transaction).
Implementations: ``meter.provider.ledger_sqlite`` and ``meter.provider.ledger_postgres``
(their shared rules in ``meter.provider.ledger_sql``, whose ``open_ledger`` picks one
by its location: a file path or a postgresql:// URL).

Refusals change nothing: ``InvalidInput`` (a bad value; an unknown customer or
meter; a meter authorized to another customer), ``InsufficientFunds`` (above
the available funds), ``ProtocolError`` (a transaction id reused with other
parameters, unknown, committed after an abort or with another receipt,
aborted when not PREPARED).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

__all__ = ["Account", "Ledger", "Transaction", "TransactionState"]


class TransactionState(StrEnum):
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Transaction:
    transaction_id: bytes  # 16 bytes
    customer: str
    device_serial: int
    amount: int  # mills, > 0
    state: TransactionState
    prepared_at: datetime
    expires_at: datetime  # a PREPARED transaction may be aborted after this instant
    settled_at: datetime | None = None
    receipt: bytes | None = None  # the meter's signed receipt, once COMMITTED
    reason: str | None = None  # why it was aborted


@dataclass(frozen=True)
class Account:
    """One customer as the ledger holds it; amounts in mills."""

    customer: str
    name: str
    available: int  # funded + refunded - credited - reserved
    funded: int  # payments in
    refunded: int  # withdrawn meters' descending registers, credited back
    reserved: int  # PREPARED transactions
    credited: int  # COMMITTED transactions
    created_at: datetime
    meters: tuple[int, ...]  # device serials authorized to this customer


class Ledger(Protocol):
    # -- customers, funds, meters ------------------------------------------
    def create_customer(self, customer: str, name: str, now: datetime) -> None: ...
    def fund(self, customer: str, amount: int, reference: str, now: datetime) -> int:
        """Record a payment in; returns the customer's available funds afterwards."""
        ...

    def available(self, customer: str) -> int: ...
    def authorize_meter(self, customer: str, device_serial: int, now: datetime) -> None: ...
    def customer_of(self, device_serial: int) -> str | None: ...
    def account(self, customer: str) -> Account: ...
    def customers(self) -> list[str]: ...
    def transactions_of(self, customer: str, limit: int = 100) -> list[Transaction]:
        """The customer's latest transactions, newest first."""
        ...

    # -- two-phase credit ---------------------------------------------------
    def prepare(
        self,
        transaction_id: bytes,
        customer: str,
        device_serial: int,
        amount: int,
        now: datetime,
        expires_at: datetime,
    ) -> Transaction:
        """Reserve; raises InsufficientFunds / InvalidInput and records nothing on refusal."""
        ...

    def commit(self, transaction_id: bytes, receipt: bytes, now: datetime) -> Transaction: ...
    def abort(self, transaction_id: bytes, reason: str, now: datetime) -> Transaction: ...
    def transaction(self, transaction_id: bytes) -> Transaction | None: ...
    def open_transactions(self, device_serial: int) -> list[Transaction]: ...
    def expired(self, now: datetime) -> list[Transaction]:
        """PREPARED transactions whose expires_at has passed."""
        ...

    def credited(self, device_serial: int) -> int:
        """All COMMITTED credit of one meter, in mills (its control total once applied)."""
        ...

    def credited_totals(self) -> dict[int, int]: ...

    # -- audits, withdrawals, refunds -----------------------------------------
    def record_audit(
        self,
        device_serial: int,
        report: bytes,
        outcome: str,
        details: dict[str, Any],
        now: datetime,
    ) -> None: ...
    def last_audit(self, device_serial: int) -> dict[str, Any] | None: ...
    def record_refund(
        self,
        customer: str,
        device_serial: int,
        amount: int,
        reason: str,
        now: datetime,
        refund_id: str | None = None,
    ) -> int:
        """Credit ``amount`` back to the customer (a withdrawn meter's descending register);
        the available funds after. ``refund_id`` is unique per meter (a database
        constraint): the same id again refunds nothing more, with other figures it is a
        ProtocolError. Without one, a new id is made (every call refunds)."""
        ...

    def refunded(self, device_serial: int) -> int:
        """All refunds of one meter, in mills."""
        ...

    def refund_made(self, device_serial: int, refund_id: str) -> int | None:
        """The amount of the meter's refund ``refund_id``, or None if none was recorded."""
        ...

    # -- checking -------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        """Whole-ledger counts and sums (what a copy to another back end must match)."""
        ...

    def check_totals(self) -> list[str]:
        """Customers whose running balance disagrees with their records; empty when none."""
        ...

    def close(self) -> None: ...
