"""The accounts ledger in PostgreSQL (psycopg 3): for a provider that outgrows one machine.

The same tables and statements as SQLite (meter/provider/ledger_schema.py).
Every call is one transaction at READ COMMITTED in which each change to a
customer's funds first takes ``SELECT ... FOR UPDATE`` on the customer's row:
two prepares against one customer, from any number of service processes,
run one after the other, and the second sees what the first committed. A
connection killed inside a transaction leaves nothing of it (the server
aborts it). Durable on return: the server's ``synchronous_commit`` must stay
``on`` (it is checked when the ledger opens).

``meter.provider.ledger_sql.copy_ledger`` moves a SQLite ledger here
(``meter provider migrate``), in one transaction that commits only once every
total agrees.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from meter.errors import ConfigurationError
from meter.provider.ledger_schema import POSTGRES
from meter.provider.ledger_sql import SqlLedger, Statements

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresLedger", "redacted"]

_CONNECT_TIMEOUT_S = 10


def redacted(url: str) -> str:
    """The URL as messages may show it: user, host, port and database, never a password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:  # psycopg.ProgrammingError; the text may hold a password: say nothing of it
        return "postgresql://(unparsable URL)"
    host = parts.get("host", "") or "(local socket)"
    port = f":{parts['port']}" if parts.get("port") else ""
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


class PostgresLedger(SqlLedger):
    """The ledger in the database at ``url`` (``postgresql://...``); one connection, in turn."""

    dialect = POSTGRES

    def __init__(self, url: str) -> None:

        self.where = f"accounts ledger {redacted(url)}"
        self._url = url
        self._lock = threading.Lock()
        self._db = self._connect()
        try:
            durable = self._db.execute("SHOW synchronous_commit").fetchone()
            if durable is None or durable[0] not in ("on", "remote_write", "remote_apply"):
                raise ConfigurationError(
                    f"{self.where}: synchronous_commit is {durable and durable[0]!r}: a credit "
                    "could be lost after it was answered; set it to 'on'"
                )
            with self._transaction() as db:
                # One creator at a time: two services starting on a new database at once.
                db.run("SELECT pg_advisory_xact_lock(?)", 0x50414343)
                self._create_tables(db)
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        try:
            return psycopg.connect(self._url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"{self.where}: cannot connect ({_first_line(exc)}); check that the server runs "
                "and the URL, user and password are right"
            ) from exc

    @contextmanager
    def _transaction(self) -> Iterator[Statements]:
        import psycopg

        with self._lock:
            if self._db.broken:  # the server restarted or the network dropped: a new session
                self._db.close()
                self._db = self._connect()
            try:
                with self._db.transaction(), self._db.cursor() as cursor:
                    yield Statements(cursor, self.dialect)
            except psycopg.errors.IntegrityError:
                raise  # a race another session won: the caller says what it means
            except psycopg.OperationalError as exc:
                raise ConfigurationError(
                    f"{self.where}: the database failed ({_first_line(exc)}); nothing of this "
                    "call was recorded unless it is there when read again"
                ) from exc

    @property
    def _conflicts(self) -> tuple[type[Exception], ...]:
        import psycopg

        return (psycopg.errors.UniqueViolation,)

    def _after_load(self, db: Statements) -> None:
        # Copied rows came with their ids: the identity sequences start after them.
        for table in ("payments", "refunds", "audits"):
            db.run(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _first_line(exc: Any) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
