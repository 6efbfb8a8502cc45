"""The accounts ledger in one SQLite file: the provider's embedded default.

WAL with ``synchronous=FULL``: a call that returned survives a power cut.
Every call is ``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken
before anything is read, so two writers (threads or processes) run one after
the other and a prepare never reads funds another is about to spend. A
process killed inside a transaction leaves nothing of it: SQLite rolls the
WAL's uncommitted frames back when the file is next opened.

The file is made readable by its owner only (0600), in a folder of 0700.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meter.errors import ConfigurationError
from meter.provider.ledger_schema import SQLITE
from meter.provider.ledger_sql import SqlLedger, Statements

__all__ = ["SqliteLedger"]

_APPLICATION_ID = 0x50414343  # "PACC": marks the file as a provider accounts ledger
_BUSY_TIMEOUT_S = 30.0


class SqliteLedger(SqlLedger):
    """The ledger in ``path``; one connection, shared by this object's threads in turn."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = f"accounts ledger {self.path}"
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(
                self.path,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,  # transactions are ours: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # guarded by self._lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"{self.where}: cannot open: {exc}") from exc
        try:
            self._set_up()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ConfigurationError(f"{self.where}: not a usable SQLite file ({exc})") from exc
        except BaseException:
            self._db.close()
            raise

    def _set_up(self) -> None:
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        tables = self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if app_id not in (0, _APPLICATION_ID) or (app_id == 0 and tables):
            raise ConfigurationError(
                f"{self.where}: the file is another program's database, not an accounts ledger"
            )
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigurationError(f"{self.where}: cannot switch to WAL (got {mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as db:
            db.run(f"PRAGMA application_id={_APPLICATION_ID}")
            self._create_tables(db)

    @contextmanager
    def _transaction(self) -> Iterator[Statements]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise ConfigurationError(
                    f"{self.where}: cannot begin a transaction ({exc}); another process holds "
                    f"it for more than {_BUSY_TIMEOUT_S:g} s"
                ) from exc
            try:
                yield Statements(self._db.cursor(), self.dialect)
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise  # a constraint: the caller says what it means
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise ConfigurationError(f"{self.where}: the database failed ({exc})") from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise ConfigurationError(f"{self.where}: commit failed ({exc})") from exc

    @property
    def _conflicts(self) -> tuple[type[Exception], ...]:
        return (sqlite3.IntegrityError,)

    def integrity(self) -> str:
        """SQLite's own check of the file: "ok", or what is damaged."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
