"""The accounts ledger's tables, written once for both back ends (SQLite and PostgreSQL).

The two dialects differ only in a few type names and in the placeholder of a
parameter; everything else, every statement the ledger runs, is shared.
Conventions that keep them identical:

- amounts are integer mills (``INTEGER`` / ``BIGINT``: 64 bits either way);
- device serials are 20 zero-padded decimal digits (``TEXT``): they are up to
  2**64 - 1, beyond both databases' signed 64-bit integers, and the padding
  keeps their order;
- instants are ISO 8601 UTC text with microseconds (``2026-12-02T05:50:39.000000+00:00``),
  one fixed width, so comparing the text compares the instants;
- ``customers.available`` is the running balance; ``check_totals`` recomputes it
  from the payments, refunds and transactions, and the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from meter.errors import InvalidInput

__all__ = [
    "FORMAT",
    "MAX_MILLS",
    "MIGRATIONS",
    "POSTGRES",
    "SQLITE",
    "TABLES",
    "Dialect",
    "from_instant",
    "from_serial",
    "instant",
    "serial",
]

FORMAT = "2"  # ledger_meta.format: the version of these tables
# What brings an older format up to FORMAT (run before the tables' CREATE ... IF NOT EXISTS).
# Format 2 gave every refund an id unique per meter (refunds_once), so a refund rerun after
# a crash is recognized by the database; format 1's withdrawal refund of a meter (at most
# one: its reason names the withdrawal) takes the withdrawal's id, the others their own.
MIGRATIONS: dict[str, tuple[str, ...]] = {
    "1": (
        "ALTER TABLE refunds ADD COLUMN refund_id TEXT NOT NULL DEFAULT ''",
        "UPDATE refunds SET refund_id = 'format-1-' || CAST(id AS TEXT)",
        "UPDATE refunds SET refund_id = 'withdrawal' WHERE id IN (SELECT MIN(id) FROM refunds "
        "WHERE SUBSTR(reason, 1, 20) = 'withdrawal of meter ' GROUP BY device_serial)",
    ),
}
MAX_MILLS = 2**40 - 1  # one amount: PIM-1 registers are 5 bytes
MAX_SERIAL = 2**64 - 1
# Tables in the order a copy must load them (a row's foreign keys come before it).
TABLES = ("ledger_meta", "customers", "payments", "meters", "transactions", "refunds", "audits")

_DDL = """
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    customer TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    available {INT} NOT NULL CHECK (available >= 0),
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS payments (
    id {ID},
    customer TEXT NOT NULL REFERENCES customers (customer),
    amount {INT} NOT NULL CHECK (amount > 0),
    reference TEXT NOT NULL,
    at TEXT NOT NULL,
    UNIQUE (customer, reference)
);
CREATE TABLE IF NOT EXISTS meters (
    device_serial TEXT PRIMARY KEY,
    customer TEXT NOT NULL REFERENCES customers (customer),
    authorized_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS meters_by_customer ON meters (customer);
CREATE TABLE IF NOT EXISTS transactions (
    transaction_id {BLOB} PRIMARY KEY,
    customer TEXT NOT NULL REFERENCES customers (customer),
    device_serial TEXT NOT NULL REFERENCES meters (device_serial),
    amount {INT} NOT NULL CHECK (amount > 0),
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    prepared_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    settled_at TEXT,
    receipt {BLOB},
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transactions_by_customer ON transactions (customer, prepared_at);
CREATE INDEX IF NOT EXISTS transactions_by_meter ON transactions (device_serial, state);
CREATE INDEX IF NOT EXISTS transactions_by_state ON transactions (state, expires_at);
CREATE TABLE IF NOT EXISTS refunds (
    id {ID},
    customer TEXT NOT NULL REFERENCES customers (customer),
    device_serial TEXT NOT NULL REFERENCES meters (device_serial),
    amount {INT} NOT NULL CHECK (amount > 0),
    reason TEXT NOT NULL,
    at TEXT NOT NULL,
    refund_id TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS refunds_once ON refunds (device_serial, refund_id);
CREATE TABLE IF NOT EXISTS audits (
    id {ID},
    device_serial TEXT NOT NULL REFERENCES meters (device_serial),
    report {BLOB} NOT NULL,
    outcome TEXT NOT NULL,
    details TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_by_meter ON audits (device_serial, id);
"""


@dataclass(frozen=True)
class Dialect:
    """What differs between the back ends: type names, the placeholder, the row lock."""

    name: str
    integer: str
    blob: str
    identity: str  # an auto-numbered primary key column
    placeholder: str
    lock_suffix: str  # appended to the SELECT that locks a customer's row

    def ddl(self) -> list[str]:
        text = _DDL.format(INT=self.integer, BLOB=self.blob, ID=self.identity)
        return [s.strip() for s in text.split(";") if s.strip()]

    def sql(self, statement: str) -> str:
        """A shared statement (written with ``?``) in this dialect's placeholders."""
        return statement.replace("?", self.placeholder)


# SQLite: BEGIN IMMEDIATE takes the database's write lock, which serializes every writer.
SQLITE = Dialect("sqlite", "INTEGER", "BLOB", "INTEGER PRIMARY KEY", "?", "")
# PostgreSQL: READ COMMITTED, and the customer's row locked first by every change to its
# funds, so two prepares against one customer run one after the other.
POSTGRES = Dialect(
    "postgresql",
    "BIGINT",
    "BYTEA",
    "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    "%s",
    " FOR UPDATE",
)


def instant(value: datetime) -> str:
    """The stored text of an instant; a naive datetime is refused (whose clock?)."""
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(f"instant {value!r} has no time zone: give an aware UTC datetime")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def from_instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def serial(device_serial: int) -> str:
    if (
        not isinstance(device_serial, int)
        or isinstance(device_serial, bool)
        or not 0 < device_serial <= MAX_SERIAL
    ):
        raise InvalidInput(f"device serial {device_serial!r} must be 1 to {MAX_SERIAL}")
    return f"{device_serial:020d}"


def from_serial(text: str) -> int:
    return int(text)
