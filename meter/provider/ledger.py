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
Implementations: ``meter.provider.ledger_sqlite`` and ``meter.provider.ledger_postgres``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

__all__ = ["Ledger", "Transaction", "TransactionState"]


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


class Ledger(Protocol):
    # -- customers, funds, meters ------------------------------------------
    def create_customer(self, customer: str, name: str, now: datetime) -> None: ...
    def fund(self, customer: str, amount: int, reference: str, now: datetime) -> int:
        """Record a payment in; returns the customer's available funds afterwards."""
        ...

    def available(self, customer: str) -> int: ...
    def authorize_meter(self, customer: str, device_serial: int, now: datetime) -> None: ...
    def customer_of(self, device_serial: int) -> str | None: ...

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
        self, customer: str, device_serial: int, amount: int, reason: str, now: datetime
    ) -> int:
        """Credit ``amount`` back to the customer (a withdrawn meter's descending register)."""
        ...

    def close(self) -> None: ...
