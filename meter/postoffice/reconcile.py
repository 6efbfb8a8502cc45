"""Register reconciliation (spec: "Registers"): catching a tampered, rolled-back or cloned meter.

SoftHSM2 cannot stop root from copying a meter's token files back, but every
indicium carries the meter's registers and piece sequence, so the pieces a
post office receives betray it. The RegisterLedger keeps, per genuine piece
(VALID or SPECIMEN, and any DUPLICATE whose signed part differs from the copy
recorded first), what reconciliation needs; reconcile() orders each device's
pieces by sequence, wherever and whenever they arrived, and reports:

- ``sequence-conflict``: two different indicia with one piece sequence (a
  rolled-back or cloned meter reissued it). Copies are told apart by the
  SHA-256 of the signed part, never the signature: ECDSA signatures are
  malleable, so one piece can arrive with two signatures.
- ``ascending-not-monotone``: a later sequence with a lower ascending register.
- ``ascending-step``: adjacent sequences whose ascending register does not grow
  by exactly the later piece's postage; across a gap (pieces not received)
  it must grow by at least the later postage.
- ``register-sum``: ascending + descending (the control total) falls between
  two pieces: it may only rise, by credits. With the provider's export, it
  must also never exceed what the provider credited the device.
- ``over-credited``: an ascending register above what the provider credited.

Specimens carry postage 0, take a sequence and leave the ascending register
as it is: they are recorded (their signature was checked) and take part in
the chain with postage 0, but are never counted as paid. A correction is an
ordinary piece: its own sequence, its own postage. The chain for a sequence
uses its first recorded copy; later conflicting copies only raise
``sequence-conflict``. A piece the ledger missed (a crash between the replay
store and the ledger, or a piece canceled at another office) is a gap, which
the rules above allow.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Self

from meter.errors import ConfigurationError, ProtocolError, ReplayStoreError
from meter.indicium import FLAG_SPECIMEN, SIGNED_LENGTH
from meter.pki.trust import TrustStore
from meter.postoffice.verdict import Verdict, VerificationResult
from meter.protocol.credited import CreditedExport

__all__ = [
    "DeviceSummary",
    "Finding",
    "FindingKind",
    "ReconciliationReport",
    "RecordedPiece",
    "RegisterLedger",
    "load_credited",
    "reconcile",
    "reconcile_pieces",
]

_APPLICATION_ID = 0x50494D52  # "PIMR": marks the SQLite file as a register ledger
_FORMAT_VERSION = 1
_RECORDED = (Verdict.VALID, Verdict.SPECIMEN, Verdict.DUPLICATE)
_MAX_LISTED = 20  # sequences listed in one finding; the detail gives the full count
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
    UNIQUE (device_serial, sequence, digest)
);
"""


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

    @property
    def control_total(self) -> int:
        return self.ascending + self.descending

    @property
    def is_specimen(self) -> bool:
        return bool(self.flags & FLAG_SPECIMEN)


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
            if tables == 0 and application_id == 0:
                db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {_FORMAT_VERSION}")
            elif application_id != _APPLICATION_ID or version != _FORMAT_VERSION:
                raise ConfigurationError(
                    f"register ledger {path} is not a version {_FORMAT_VERSION} register ledger "
                    "(another SQLite database?); the file was left as it is"
                )
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a committed batch survives power loss
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
        self, results: Sequence[VerificationResult], raw: Sequence[bytes | None] | None = None
    ) -> None:
        """Keep the genuine pieces among the results, in one transaction.

        VALID and SPECIMEN pieces are kept; a DUPLICATE is kept when its
        signed part differs from every copy of that piece recorded so far
        (a reissued sequence), or when the ledger has no copy yet. Other
        verdicts are ignored. ``raw``, if given, holds the bytes each result
        was judged from (None where not known): it spares encoding the
        signed part again.
        """
        known = raw if raw is not None else [None] * len(results)
        if len(known) != len(results):
            raise ValueError(f"{len(known)} raw indicia for {len(results)} results")
        rows = [
            _row(r, data)
            for r, data in zip(results, known, strict=True)
            if r.indicium is not None and r.verdict in _RECORDED
        ]
        if not rows:
            return
        with self._lock:
            db = self._open_db()
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT OR IGNORE INTO pieces VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows
                )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise ReplayStoreError(
                    f"register ledger {self._path}: cannot record {len(rows)} pieces: {exc}"
                ) from exc

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


def _row(result: VerificationResult, data: bytes | None) -> tuple[object, ...]:
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
    )


def _piece(row: tuple[object, ...]) -> RecordedPiece:
    serial, sequence, digest, auth, asc, desc, postage, flags, ref, issued, mailed, verdict = row
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
    )


class FindingKind(StrEnum):
    SEQUENCE_CONFLICT = "sequence-conflict"
    ASCENDING_NOT_MONOTONE = "ascending-not-monotone"
    ASCENDING_STEP = "ascending-step"
    REGISTER_SUM = "register-sum"
    OVER_CREDITED = "over-credited"


@dataclass(frozen=True, slots=True)
class Finding:
    """One break of the register rules: evidence of tampering, rollback or cloning."""

    device_serial: int
    kind: FindingKind
    sequences: tuple[int, ...]
    detail: str

    def to_json(self) -> dict[str, object]:
        return {
            "device_serial": self.device_serial,
            "kind": self.kind.value,
            "sequences": list(self.sequences),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """What the ledger holds for one device; credited is None when the provider did not say."""

    device_serial: int
    authorization_id: int | None
    pieces: int  # distinct sequences
    copies: int  # recorded indicia, conflicting copies included
    first_sequence: int | None
    last_sequence: int | None
    missing: int  # sequences between first and last never received here
    last_ascending: int | None
    last_descending: int | None
    credited: int | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ReconciliationReport:
    devices: list[DeviceSummary]
    findings: list[Finding]
    credited_checked: bool  # whether a provider's export of credited totals was given

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, object]:
        return {
            "clean": self.clean,
            "credited_checked": self.credited_checked,
            "devices": [d.to_json() for d in self.devices],
            "findings": [f.to_json() for f in self.findings],
        }


def reconcile(
    ledger: RegisterLedger, credited: Mapping[int, int] | None = None
) -> ReconciliationReport:
    """Reconcile every device in the ledger, against the provider's credited totals if given."""
    return reconcile_pieces(ledger.pieces(), credited)


def reconcile_pieces(
    pieces: Iterable[RecordedPiece], credited: Mapping[int, int] | None = None
) -> ReconciliationReport:
    """The report over pieces in any order (pure; reconcile() feeds it from a ledger)."""
    ordered = sorted(pieces, key=lambda p: (p.device_serial, p.sequence))  # stable: keeps copies
    devices: list[DeviceSummary] = []
    findings: list[Finding] = []
    for serial, group in itertools.groupby(ordered, key=lambda p: p.device_serial):
        total = credited.get(serial) if credited is not None else None
        summary, found = _reconcile_device(serial, list(group), total)
        devices.append(summary)
        findings += found
    seen = {d.device_serial for d in devices}
    for serial, total in sorted((credited or {}).items()):
        if serial not in seen:
            devices.append(DeviceSummary(serial, None, 0, 0, None, None, 0, None, None, total))
    return ReconciliationReport(devices, findings, credited is not None)


def _reconcile_device(
    serial: int, copies: list[RecordedPiece], credited: int | None
) -> tuple[DeviceSummary, list[Finding]]:
    findings: list[Finding] = []

    def found(kind: FindingKind, sequences: Sequence[int], detail: str) -> None:
        findings.append(Finding(serial, kind, tuple(sequences[:_MAX_LISTED]), detail))

    chain: list[RecordedPiece] = []  # the first recorded copy of each sequence
    for sequence, group in itertools.groupby(copies, key=lambda p: p.sequence):
        same = list(group)
        chain.append(same[0])
        distinct = list({p.digest: p for p in same}.values())
        if len(distinct) > 1:
            shown = "; ".join(
                f"ascending {p.ascending} descending {p.descending} postage {p.postage} "
                f"issued {p.time_of_issue.isoformat()}"
                for p in distinct
            )
            found(
                FindingKind.SEQUENCE_CONFLICT,
                [sequence],
                f"piece {sequence} was issued {len(distinct)} times with different contents "
                f"({shown}): the meter was rolled back or cloned",
            )
    for before, after in itertools.pairwise(chain):
        _check_pair(before, after, found)
    if credited is not None:
        over = [p.sequence for p in copies if p.ascending > credited]
        if over:
            top = max(p.ascending for p in copies)
            found(
                FindingKind.OVER_CREDITED,
                sorted(set(over)),
                f"{len(set(over))} pieces carry an ascending register above the {credited} mills "
                f"the provider credited (up to {top}): postage never paid for",
            )
        above = [p.sequence for p in copies if p.control_total > credited]
        if above:
            top = max(p.control_total for p in copies)
            found(
                FindingKind.REGISTER_SUM,
                sorted(set(above)),
                f"{len(set(above))} pieces carry ascending + descending above the {credited} mills "
                f"the provider credited (up to {top}): credit the provider never granted",
            )
    last = chain[-1]
    summary = DeviceSummary(
        device_serial=serial,
        authorization_id=last.authorization_id,
        pieces=len(chain),
        copies=len({(p.sequence, p.digest) for p in copies}),
        first_sequence=chain[0].sequence,
        last_sequence=last.sequence,
        missing=last.sequence - chain[0].sequence + 1 - len(chain),
        last_ascending=last.ascending,
        last_descending=last.descending,
        credited=credited,
    )
    return summary, findings


_Report = Callable[[FindingKind, Sequence[int], str], None]


def _check_pair(before: RecordedPiece, after: RecordedPiece, found: _Report) -> None:
    a, b = before.sequence, after.sequence
    pair = [a, b]
    grown = after.ascending - before.ascending
    if grown < 0:
        found(
            FindingKind.ASCENDING_NOT_MONOTONE,
            pair,
            f"ascending register fell from {before.ascending} at piece {a} to "
            f"{after.ascending} at piece {b}",
        )
    elif b == a + 1 and grown != after.postage:
        found(
            FindingKind.ASCENDING_STEP,
            pair,
            f"ascending register grew by {grown} from piece {a} to piece {b}, "
            f"not by piece {b}'s postage {after.postage}",
        )
    elif b > a + 1 and grown < after.postage:
        found(
            FindingKind.ASCENDING_STEP,
            pair,
            f"ascending register grew by {grown} across pieces {a} to {b} (some not received), "
            f"less than piece {b}'s postage {after.postage}",
        )
    if after.control_total < before.control_total:
        found(
            FindingKind.REGISTER_SUM,
            pair,
            f"ascending + descending fell from {before.control_total} at piece {a} to "
            f"{after.control_total} at piece {b}; it only ever rises, by credits",
        )


def load_credited(path: Path, trust: TrustStore | None = None) -> dict[int, int]:
    """A provider's export of credited totals (meter/protocol/credited.py), by device serial.

    With ``trust``, the export's signature must verify under a provider
    certificate of that trust store (so chained to the postal root) whose
    authorization id is the export's; ProtocolError otherwise. Without it
    only the format is checked: for an export the caller fetched from the
    provider over an authenticated channel.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"credited export {path}: cannot read: {exc.strerror}") from exc
    source = f"credited export {path}"
    export = CreditedExport.from_json(data, source)
    if trust is not None:
        providers = {
            c.provider: None
            for c in trust.credentials
            if c.authorization_id == export.authorization_id
        }
        if not providers:
            raise ProtocolError(
                f"{source}: no provider certificate with authorization id "
                f"{export.authorization_id} reaches the postal root; give it with --certs"
            )
        errors = []
        for provider in providers:
            try:
                export.verify(provider, source)
                break
            except ProtocolError as exc:
                errors.append(exc)
        else:
            raise errors[0]
    return dict(export.devices)
