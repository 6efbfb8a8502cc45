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

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from meter.errors import ConfigurationError, ProtocolError
from meter.pki.trust import TrustStore
from meter.postoffice.ledger import RecordedPiece, RegisterLedger
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

_MAX_LISTED = 20  # sequences listed in one finding; the detail gives the full count


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
