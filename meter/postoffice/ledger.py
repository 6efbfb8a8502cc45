"""The register ledger: what a post office keeps of every genuine piece it accepted.

One SQLite file (WAL, ``synchronous=FULL``: a committed batch survives power
loss), one row per copy of a piece: what reconciliation needs (registers,
sequence, digest of the signed part, dates) and who recorded it and when
(the station and the time), so that a DUPLICATE can say where the piece was
first accepted. Reconciliation itself is in ``reconcile.py``.

Format 2 added ``station`` and ``recorded_at``; a format 1 ledger is
upgraded in place when opened (its rows get station "unknown" and no time).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from meter.errors import ConfigurationError, ReplayStoreError
from meter.indicium import FLAG_SPECIMEN, SIGNED_LENGTH
from meter.postoffice.verdict import Verdict, VerificationResult

__all__ = ["LOCAL_STATION", "FirstAccepted", "RecordedPiece", "RegisterLedger"]

LOCAL_STATION = "local"  # pieces recorded by `meter verify` / `verify-batch` on this site
_APPLICATION_ID = 0x50494D52  # "PIMR": marks the SQLite file as a register ledger
_FORMAT_VERSION = 2
_RECORDED = (Verdict.VALID, Verdict.SPECIMEN, Verdict.DUPLICATE)
_COLUMNS = 14
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pieces (
    device_serial TEXT NOT NULL,      -- 20 decimal digits: SQLite integers stop at 2**63
    sequence INTEGER NOT NULL,
    digest BLOB NOT NULL,             -- SHA-256 of the signed part (84 bytes)
    authorization_id INTEGER NOT NULL,
    ascending INTEGER NOT NULL,
    descending INTEGER NOT NULL,
    postage INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    reference_sequence INTEGER NOT NULL,
    time_of_issue TEXT NOT NULL,
    date_of_mailing TEXT NOT NULL,
    verdict TEXT NOT NULL,            -- the verdict of the first copy seen
    station TEXT NOT NULL,            -- the station that recorded this copy
    recorded_at TEXT,                 -- when (ISO 8601, UTC); NULL for rows from format 1
    UNIQUE (device_serial, sequence, digest)
);
"""
_UPGRADE_1_TO_2 = (
    "ALTER TABLE pieces ADD COLUMN station TEXT NOT NULL DEFAULT 'unknown'",
    "ALTER TABLE pieces ADD COLUMN recorded_at TEXT",
)


@dataclass(frozen=True, slots=True)
class RecordedPiece:
    """What the ledger keeps of one genuine indicium."""

    device_serial: int
    sequence: int
    digest: bytes
    authorization_id: int
    ascending: int
    descending: int
    postage: int
    flags: int
    reference_sequence: int
    time_of_issue: datetime
    date_of_mailing: date
    verdict: str
    station: str = LOCAL_STATION
    recorded_at: datetime | None = None

    @property
    def control_total(self) -> int:
        return self.ascending + self.descending

    @property
    def is_specimen(self) -> bool:
        return bool(self.flags & FLAG_SPECIMEN)


@dataclass(frozen=True, slots=True)
class FirstAccepted:
    """Where and when this office first accepted a piece."""

    station: str
    at: datetime | None

    def to_json(self) -> dict[str, str | None]:
        return {"station": self.station, "at": self.at.isoformat() if self.at else None}


class RegisterLedger:
    """The pieces a post office has accepted, in one SQLite file (WAL, fsync on commit)."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        """Use open()."""
        self._path = path
        self._db: sqlite3.Connection | None = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> RegisterLedger:
        """Open or create the ledger; ConfigurationError naming the file if it is not one."""
        path = Path(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"register ledger {path}: cannot open: {exc}") from exc
        try:
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a committed batch survives power loss
            if tables == 0 and application_id == 0:
                db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {_FORMAT_VERSION}")
            elif application_id == _APPLICATION_ID and version == 1:
                # One transaction: an upgrade cut short leaves a format 1 ledger.
                db.execute("BEGIN IMMEDIATE")
                for statement in _UPGRADE_1_TO_2:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {_FORMAT_VERSION}")
                db.execute("COMMIT")
            elif application_id != _APPLICATION_ID or version != _FORMAT_VERSION:
                raise ConfigurationError(
                    f"register ledger {path} is not a version {_FORMAT_VERSION} register ledger "
                    "(another SQLite database?); the file was left as it is"
                )
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConfigurationError(
                f"register ledger {path} is corrupt or not a register ledger ({exc}); "
                "the file was left as it is"
            ) from exc
        except BaseException:
            db.close()
            raise
        return cls(path, db)

    @property
    def path(self) -> Path:
        return self._path

    def record(
        self,
        results: Sequence[VerificationResult],
        raw: Sequence[bytes | None] | None = None,
        *,
        station: str = LOCAL_STATION,
        at: datetime | None = None,
    ) -> None:
        """Keep the genuine pieces among the results, in one transaction.

        VALID and SPECIMEN pieces are kept; a DUPLICATE is kept when its
        signed part differs from every copy of that piece recorded so far
        (a reissued sequence), or when the ledger has no copy yet. Other
        verdicts are ignored. ``raw``, if given, holds the bytes each result
        was judged from (None where not known): it spares encoding the
        signed part again. ``station`` and ``at`` (default: now) say who
        recorded them and when.
        """
        known = raw if raw is not None else [None] * len(results)
        if len(known) != len(results):
            raise ValueError(f"{len(known)} raw indicia for {len(results)} results")
        when = (at or datetime.now(UTC)).isoformat()
        rows = [
            _row(r, data, station, when)
            for r, data in zip(results, known, strict=True)
            if r.indicium is not None and r.verdict in _RECORDED
        ]
        if not rows:
            return
        placeholders = ",".join("?" * _COLUMNS)
        with self._lock:
            db = self._open_db()
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(f"INSERT OR IGNORE INTO pieces VALUES ({placeholders})", rows)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise ReplayStoreError(
                    f"register ledger {self._path}: cannot record {len(rows)} pieces: {exc}"
                ) from exc

    def first_accepted(self, pieces: Sequence[tuple[int, int]]) -> list[FirstAccepted | None]:
        """For each (device serial, sequence): the first VALID copy's station and time, if any.

        None where this ledger never accepted the piece: it was accepted at
        another office sharing the replay store, or before the ledger existed.
        """
        if not pieces:
            return []
        query = (
            "SELECT station, recorded_at FROM pieces WHERE device_serial = ? AND sequence = ? "
            "AND verdict = 'VALID' ORDER BY rowid LIMIT 1"
        )
        found: list[FirstAccepted | None] = []
        with self._lock:
            db = self._open_db()
            try:
                for serial, sequence in pieces:
                    row = db.execute(query, (f"{serial:020d}", sequence)).fetchone()
                    found.append(
                        None
                        if row is None
                        else FirstAccepted(
                            str(row[0]), datetime.fromisoformat(row[1]) if row[1] else None
                        )
                    )
            except sqlite3.Error as exc:
                raise ReplayStoreError(f"register ledger {self._path}: cannot read: {exc}") from exc
        return found

    def pieces(self) -> Iterator[RecordedPiece]:
        """Every recorded copy, by device serial, then sequence, then the order recorded."""
        with self._lock:
            db = self._open_db()
            try:
                rows = db.execute(
                    "SELECT * FROM pieces ORDER BY device_serial, sequence, rowid"
                ).fetchall()
            except sqlite3.Error as exc:
                raise ReplayStoreError(f"register ledger {self._path}: cannot read: {exc}") from exc
        for row in rows:
            yield _piece(row)

    def __len__(self) -> int:
        with self._lock:
            return int(self._open_db().execute("SELECT count(*) FROM pieces").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise ReplayStoreError(f"register ledger {self._path} is closed")
        return self._db


def _row(
    result: VerificationResult, data: bytes | None, station: str, when: str
) -> tuple[object, ...]:
    i = result.indicium
    assert i is not None
    signed_part = data[:SIGNED_LENGTH] if data is not None else i.signed_part()
    return (
        f"{i.device_serial:020d}",
        i.sequence,
        hashlib.sha256(signed_part).digest(),
        i.authorization_id,
        i.ascending,
        i.descending,
        i.postage,
        i.flags,
        i.reference_sequence,
        i.time_of_issue.isoformat(),
        i.date_of_mailing.isoformat(),
        result.verdict.value,
        station,
        when,
    )


def _piece(row: tuple[object, ...]) -> RecordedPiece:
    serial, sequence, digest, auth, asc, desc, postage, flags, ref, issued, mailed, verdict = row[
        :12
    ]
    station, recorded_at = row[12], row[13]
    return RecordedPiece(
        device_serial=int(str(serial)),
        sequence=int(str(sequence)),
        digest=bytes(digest),  # type: ignore[call-overload]
        authorization_id=int(str(auth)),
        ascending=int(str(asc)),
        descending=int(str(desc)),
        postage=int(str(postage)),
        flags=int(str(flags)),
        reference_sequence=int(str(ref)),
        time_of_issue=datetime.fromisoformat(str(issued)),
        date_of_mailing=date.fromisoformat(str(mailed)),
        verdict=str(verdict),
        station=str(station),
        recorded_at=datetime.fromisoformat(str(recorded_at)) if recorded_at else None,
    )
