"""The provider's side of Request Device Audit: fresh nonces, the checks of a meter's signed
report against the accounts ledger and the post office's reconciliation, the record in
the ledger, and the signed acknowledgement that restarts the meter's inspection watchdog.

What is refused and what is recorded (docs/withdrawal.md):

- a report that does not parse, is for another provider, answers a nonce this
  desk did not hand out for that device (or handed out and used already: a
  replay), or whose signature does not verify with a meter certificate this
  provider issued: ProtocolError / InvalidInput, and NOTHING is recorded
  (anyone could send such bytes);
- a genuine report whose figures disagree with the ledger (control total not
  what was credited), with the post office (it saw more pieces or a higher
  ascending register than the meter reports, or reconciliation findings for
  the device), or whose self-tests failed: recorded with outcome "failed"
  and the findings, then AuditFailed; no acknowledgement;
- otherwise recorded "ok" (or "withdrawal-audited" for a withdrawal's final
  report) and acknowledged.

Every audit is checked against a post office's reconciliation, or the operator says
explicitly that it is not (WITHOUT_POST_OFFICE): the audit record says which
(``post_office_checked``, ``post_office_waived``). Neither is refused before anything
is consumed or recorded: a provider that silently skipped the post office would miss
the one evidence of a rolled-back or cloned meter that the meter's own report cannot
give.

Nonces live in this desk's memory for NONCE_LIFETIME: a provider restart only
means the meter is asked again with a new nonce.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meter.errors import InvalidInput, ProtocolError
from meter.protocol.device_audit import (
    MIN_NONCE,
    AckOutcome,
    AuditAcknowledgement,
    DeviceAuditReport,
)
from meter.provider.ledger import Ledger, TransactionState

__all__ = [
    "NONCE_LIFETIME",
    "WITHOUT_POST_OFFICE",
    "AuditDesk",
    "AuditFailed",
    "AuditOutcome",
    "NoPostOffice",
    "PostOffice",
    "PostOfficeFigures",
    "require_post_office",
]

NONCE_LIFETIME = timedelta(minutes=30)
_NONCE_BYTES = 32


class AuditFailed(ProtocolError):
    """A genuine report whose figures disagree: recorded as failed, never acknowledged."""


class AuditOutcome:
    OK = "ok"
    FAILED = "failed"
    WITHDRAWAL_AUDITED = "withdrawal-audited"


@dataclass(frozen=True)
class PostOfficeFigures:
    """What one post office's reconciliation (`meter postoffice reconcile --json`) says of
    one device: the last sequence and ascending register it saw, and its findings."""

    device_serial: int
    last_sequence: int | None
    last_ascending: int | None
    findings: tuple[str, ...]

    @classmethod
    def from_reconciliation(
        cls, data: Mapping[str, Any], device_serial: int, source: str
    ) -> PostOfficeFigures:
        devices, findings = data.get("devices"), data.get("findings")
        if not isinstance(devices, list) or not isinstance(findings, list):
            raise InvalidInput(
                f"{source}: a reconciliation export has lists 'devices' and 'findings' "
                "(the output of `meter postoffice reconcile --json`)"
            )
        last_sequence = last_ascending = None
        for entry in devices:
            if not isinstance(entry, dict) or entry.get("device_serial") != device_serial:
                continue
            last_sequence = _optional_int(entry.get("last_sequence"), source, "last_sequence")
            last_ascending = _optional_int(entry.get("last_ascending"), source, "last_ascending")
        found = []
        for entry in findings:
            if not isinstance(entry, dict):
                raise InvalidInput(f"{source}: every finding must be an object")
            if entry.get("device_serial") == device_serial:
                found.append(f"{entry.get('kind')}: {entry.get('detail')}")
        return cls(device_serial, last_sequence, last_ascending, tuple(found))


class NoPostOffice(Enum):
    """The operator's explicit choice to audit without a post office's reconciliation."""

    WAIVED = "waived"


WITHOUT_POST_OFFICE = NoPostOffice.WAIVED
# What an audit is checked against besides the ledger: a post office's figures, or the
# operator's recorded waiver. Never nothing.
PostOffice = PostOfficeFigures | NoPostOffice


def require_post_office(post_office: object) -> PostOffice:
    """``post_office`` if it is figures or the explicit waiver; InvalidInput otherwise
    (None included), before anything is consumed or recorded."""
    if isinstance(post_office, PostOfficeFigures | NoPostOffice):
        return post_office
    raise InvalidInput(
        "a device audit is checked against a post office's reconciliation (`meter postoffice "
        "reconcile --json`), or the operator says explicitly that it is audited without one "
        "(recorded in the audit): neither was given, nothing was checked or recorded"
    )


class AuditDesk:
    """Device audits for one provider: its certificate, its signing key, its ledger."""

    def __init__(
        self,
        ledger: Ledger,
        certificate: x509.Certificate,
        sign: Callable[[bytes], bytes],
        authorization_id: int,
        local_credited: Callable[[int], int] | None = None,
    ) -> None:
        self.ledger = ledger
        self.certificate = certificate
        self.sign = sign
        self.authorization_id = authorization_id
        # Credit granted outside the accounts ledger (a lab's local signed grants,
        # Provider.local_credited): a meter's control total counts it too.
        self._local_credited = local_credited
        self._nonces: dict[tuple[int, bytes], datetime] = {}

    def credited(self, device_serial: int) -> int:
        """All the credit this provider granted the meter: COMMITTED, plus local grants."""
        local = 0 if self._local_credited is None else self._local_credited(device_serial)
        return self.ledger.credited(device_serial) + local

    def new_nonce(self, device_serial: int, now: datetime) -> bytes:
        """A fresh nonce for one audit of ``device_serial``, good for NONCE_LIFETIME."""
        if self.ledger.customer_of(device_serial) is None:
            raise InvalidInput(
                f"meter {device_serial} is not authorized to any customer in the ledger: "
                "nothing to audit"
            )
        self._nonces = {k: t for k, t in self._nonces.items() if now - t <= NONCE_LIFETIME}
        nonce = secrets.token_bytes(_NONCE_BYTES)
        self._nonces[(device_serial, nonce)] = now
        return nonce

    def verify_report(
        self, report: DeviceAuditReport, meter_certificate: x509.Certificate, now: datetime
    ) -> datetime:
        """Everything that makes the report the meter's own answer to our nonce; raises
        before anything is recorded. Consumes the nonce once the signature verifies, and
        returns when it was handed out: the meter made the report after that instant."""
        if report.authorization_id != self.authorization_id:
            raise ProtocolError(
                f"device audit report of device {report.device_serial} names authorization "
                f"id {report.authorization_id}; this provider is {self.authorization_id}"
            )
        try:
            meter_certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ProtocolError(
                f"the certificate given for device {report.device_serial} was not issued by "
                "this provider"
            ) from exc
        issued = self._nonces.get((report.device_serial, report.nonce))
        if issued is None or now - issued > NONCE_LIFETIME or len(report.nonce) < MIN_NONCE:
            raise ProtocolError(
                f"device audit report of device {report.device_serial} answers nonce "
                f"{report.nonce.hex()}, which this provider did not hand out for that device, "
                "used already or let expire (a replayed or stale report): ask for a new audit"
            )
        report.verify(meter_certificate, report.nonce)
        del self._nonces[(report.device_serial, report.nonce)]
        return issued

    def settle_unapplied(self, report: DeviceAuditReport, made_after: datetime) -> list[str]:
        """Abort the meter's PREPARED transactions that its verified report proves it never
        applied and never can: the funds are released (docs/reload-protocol.md, Timeouts).

        Proof that it never applied them: its signed control total is exactly what the
        ledger COMMITTED (an applied one would be in it, and a commit needs the meter's
        receipt). Proof that it never can: the transaction expired before the report was
        made (a grant is applicable only inside its 2-minute session, and PREPARE_TIMEOUT
        is 15 minutes), or the meter is withdrawing (it refuses every credit). Anything
        else stays open for the next reload to settle from the meter's receipt.
        """
        serial = report.device_serial
        prepared = [
            t for t in self.ledger.open_transactions(serial) if t.state is TransactionState.PREPARED
        ]
        if not prepared or report.control_total != self.credited(serial):
            return []
        aborted = []
        for t in prepared:
            if report.withdrawing or t.expires_at <= made_after:
                self.ledger.abort(
                    t.transaction_id,
                    "never applied: the meter's signed device audit shows its control total "
                    "without it, after it could no longer be applied",
                    made_after,
                )
                aborted.append(t.transaction_id.hex())
        return aborted

    def commit_applied_at_withdrawal(self, report: DeviceAuditReport, now: datetime) -> list[str]:
        """Commit the meter's PREPARED transactions that its verified final report proves
        it applied: its signed control total is exactly what the ledger credited plus all
        of them. (Amounts are positive and none applies twice, so only the whole set can
        make up that sum.) Their receipts were lost, and a withdrawing meter has no next
        reload to hand them over: without this, the customer's funds would stay reserved
        for credit that the refund of the descending register pays back. The signed
        report is kept as each one's receipt. Anything else stays open, and is a finding.
        """
        if not report.withdrawing:
            raise ProtocolError("only a withdrawal's final report settles applied credit")
        serial = report.device_serial
        prepared = [
            t for t in self.ledger.open_transactions(serial) if t.state is TransactionState.PREPARED
        ]
        applied = sum(t.amount for t in prepared)
        if not prepared or report.control_total != self.credited(serial) + applied:
            return []
        for t in prepared:
            self.ledger.commit(t.transaction_id, report.to_bytes(), now)
        return [t.transaction_id.hex() for t in prepared]

    def findings(self, report: DeviceAuditReport, post_office: PostOffice) -> list[str]:
        """What disagrees between a verified report and the ledger and the post office."""
        found = []
        serial = report.device_serial
        if not report.self_tests_passed:
            found.append("the meter's self-tests failed")
        credited = self.credited(serial)
        pending = sum(
            t.amount
            for t in self.ledger.open_transactions(serial)
            if t.state is TransactionState.PREPARED
        )
        # A prepared grant the meter applied before the provider committed it may count.
        if not credited <= report.control_total <= credited + pending:
            found.append(
                f"control total {report.control_total} mills, the ledger credited {credited}"
                + (f" (+{pending} prepared)" if pending else "")
            )
        if isinstance(post_office, PostOfficeFigures):
            if post_office.device_serial != serial:
                raise InvalidInput(
                    f"post office figures of device {post_office.device_serial} given for "
                    f"device {serial}"
                )
            found.extend(f"post office reconciliation: {f}" for f in post_office.findings)
            if post_office.last_sequence is not None and (
                post_office.last_sequence > report.piece_count
            ):
                found.append(
                    f"the post office saw piece {post_office.last_sequence}, the meter reports "
                    f"{report.piece_count} pieces (rolled back or cloned)"
                )
            if post_office.last_ascending is not None and (
                post_office.last_ascending > report.ascending
            ):
                found.append(
                    f"the post office saw an ascending register of {post_office.last_ascending}, "
                    f"the meter reports {report.ascending}"
                )
        return found

    def audit(
        self,
        report: DeviceAuditReport,
        meter_certificate: x509.Certificate,
        now: datetime,
        post_office: PostOffice,
    ) -> AuditAcknowledgement:
        """Verify, check, record; the signed acknowledgement of a clean routine audit."""
        post_office = require_post_office(post_office)
        if report.withdrawing:
            raise ProtocolError(
                f"meter {report.device_serial} is being withdrawn: its report is the "
                "withdrawal's final audit (meter.provider.withdrawal), not a routine one"
            )
        made_after = self.verify_report(report, meter_certificate, now)
        aborted = self.settle_unapplied(report, made_after)
        extra = {"aborted_unapplied": aborted} if aborted else None
        self.check_and_record(report, now, post_office, AuditOutcome.OK, extra)
        return self.acknowledge(report, now, AckOutcome.OK)

    def check_and_record(
        self,
        report: DeviceAuditReport,
        now: datetime,
        post_office: PostOffice,
        outcome: str,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """For a verified report: record it as ``outcome`` when its figures agree, as
        "failed" with the findings (then AuditFailed) when they do not. The details."""
        post_office = require_post_office(post_office)
        found = self.findings(report, post_office)
        details: dict[str, Any] = {
            "report_sha256": report.digest().hex(),
            "nonce": report.nonce.hex(),
            "meter_time": report.meter_time.isoformat(),
            "clock_skew_s": int((report.meter_time - now).total_seconds()),
            "ascending": report.ascending,
            "descending": report.descending,
            "piece_count": report.piece_count,
            "withdrawing": report.withdrawing,
            "post_office_checked": isinstance(post_office, PostOfficeFigures),
            "post_office_waived": post_office is WITHOUT_POST_OFFICE,
            **(extra or {}),
        }
        if found:
            self.ledger.record_audit(
                report.device_serial,
                report.to_bytes(),
                AuditOutcome.FAILED,
                {**details, "findings": found},
                now,
            )
            raise AuditFailed(
                f"device audit of meter {report.device_serial} failed: " + "; ".join(found)
            )
        self.ledger.record_audit(report.device_serial, report.to_bytes(), outcome, details, now)
        return details

    def acknowledge(
        self, report: DeviceAuditReport, now: datetime, kind: str
    ) -> AuditAcknowledgement:
        ack = AuditAcknowledgement(
            authorization_id=self.authorization_id,
            device_serial=report.device_serial,
            report_sha256=report.digest(),
            ascending=report.ascending,
            descending=report.descending,
            piece_count=report.piece_count,
            audited_at=now.replace(microsecond=0),
            outcome=kind,
        )
        return ack.signed_by(self.sign)


def _optional_int(value: object, source: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{source}: '{name}' must be a whole number or null")
    return value
