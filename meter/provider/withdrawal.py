"""The provider's side of Withdraw PSD: the final audit, the refund, the revocation.

The steps, each safe to rerun after a crash of either side (docs/withdrawal.md):

1. ``final_audit``: the meter's final signed report (made after it stopped
   issuing, ``withdrawing`` true) is verified like any audit and checked
   against the ledger and the post office's reconciliation (or the operator's
   recorded waiver of it, meter.provider.audits.WITHOUT_POST_OFFICE); it is
   recorded "withdrawal-audited" with the provider's time, which starts the
   refund window. Then the refund (2) and the signed ``withdrawal``
   acknowledgement that lets the meter destroy its keys (3, 4).
2. ``refund``: the final audited descending register goes back to the
   customer's account, exactly once: the ledger records it under the meter's
   refund id WITHDRAWAL_REFUND_ID, unique per meter by a database constraint,
   so a rerun after a crash (before "withdrawal-refunded" was recorded) refunds
   nothing more, whatever other refunds of the customer came in between. A
   refund claimed more than REFUND_WINDOW (180 days, the US rule) after the
   final audit is refused.
5. ``revoke``: once refunded, the meter's certificate is revoked from the final
   report's meter time on (nothing genuine can be dated later: the meter had
   stopped issuing). The provider's revocation list is a file in
   meter.pki.revocation's format; ``export_revocations`` signs it for post
   offices (meter.protocol.device_audit.RevocationExport).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meter.durable import write_atomically
from meter.errors import CertificateError, ConfigurationError, InvalidInput, ProtocolError
from meter.pki.revocation import Revocations
from meter.protocol.device_audit import AckOutcome, AuditAcknowledgement, DeviceAuditReport
from meter.protocol.revocation_export import RevocationExport
from meter.provider.audits import AuditDesk, AuditOutcome, PostOffice, require_post_office

__all__ = [
    "REFUND_WINDOW",
    "WITHDRAWAL_REFUND_ID",
    "RevocationBook",
    "WithdrawalOutcome",
    "Withdrawals",
]

REFUND_WINDOW = timedelta(days=180)
# The refund id of a meter's withdrawal in the ledger: one per meter, as a meter is withdrawn
# once (its keys are gone), so whichever final report a rerun brings, it refunds nothing more.
WITHDRAWAL_REFUND_ID = "withdrawal"


class WithdrawalOutcome:
    AUDITED = AuditOutcome.WITHDRAWAL_AUDITED
    REFUND_PENDING = "withdrawal-refund-pending"
    REFUNDED = "withdrawal-refunded"
    REVOKED = "withdrawal-revoked"


_WITHDRAWAL_OUTCOMES = (
    WithdrawalOutcome.AUDITED,
    WithdrawalOutcome.REFUND_PENDING,
    WithdrawalOutcome.REFUNDED,
    WithdrawalOutcome.REVOKED,
)


class RevocationBook:
    """The provider's revocation list: a JSON file in meter.pki.revocation's format."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> dict[int, datetime]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_bytes())
            Revocations.from_json(json.dumps(data), str(self.path))  # every entry checked
        except (OSError, ValueError, CertificateError) as exc:
            raise ConfigurationError(
                f"the provider's revocation list {self.path} is unreadable: {exc}"
            ) from exc
        revoked: dict[int, datetime] = {}
        for entry in data:
            at = datetime.fromisoformat(entry["revoked_at"])
            serial = entry["device_serial"]
            revoked[serial] = min(at, revoked.get(serial, at))
        return revoked

    def revoke(self, device_serial: int, at: datetime) -> datetime:
        """Add the device (an earlier instant already listed stands); durable on return."""
        revoked = self.entries()
        if device_serial in revoked and revoked[device_serial] <= at:
            return revoked[device_serial]
        revoked[device_serial] = at
        listed = [
            {"device_serial": s, "revoked_at": t.isoformat()} for s, t in sorted(revoked.items())
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.path, json.dumps(listed, indent=1).encode() + b"\n", mode=0o644)
        return at


class Withdrawals:
    """Withdrawals for one provider, over its audit desk (ledger, key) and revocation list."""

    def __init__(self, desk: AuditDesk, revocations: RevocationBook) -> None:
        self.desk = desk
        self.ledger = desk.ledger
        self.revocations = revocations

    def final_audit(
        self,
        report: DeviceAuditReport,
        meter_certificate: x509.Certificate,
        now: datetime,
        post_office: PostOffice,
    ) -> AuditAcknowledgement:
        """Steps 1 and 2: the final audit, the refund; the acknowledgement for step 3."""
        post_office = require_post_office(post_office)  # before the nonce is used up
        if not report.withdrawing:
            raise ProtocolError(
                f"the report of meter {report.device_serial} is not a withdrawal's: the meter "
                "has not stopped issuing (Withdraw PSD with the provider's nonce first)"
            )
        made_after = self.desk.verify_report(report, meter_certificate, now)
        # A withdrawing meter takes no credit: what its signed control total shows it
        # applied is committed, what it never applied is released, now.
        committed = self.desk.commit_applied_at_withdrawal(report, now)
        aborted = self.desk.settle_unapplied(report, made_after)
        last = self._withdrawal_record(report.device_serial)
        if last is None:
            extra: dict[str, object] = {"withdrawal_audited_at": now.isoformat()}
            if committed:
                extra["committed_applied"] = committed
            if aborted:
                extra["aborted_unapplied"] = aborted
            self.desk.check_and_record(report, now, post_office, WithdrawalOutcome.AUDITED, extra)
        else:
            # A rerun: the meter issues nothing once withdrawing, so its figures are the
            # ones audited (and perhaps refunded) already; anything else is tampering.
            audited = last["details"]
            were = (audited["ascending"], audited["descending"], audited["piece_count"])
            if were != (report.ascending, report.descending, report.piece_count):
                raise ProtocolError(
                    f"meter {report.device_serial}'s withdrawal was audited with registers "
                    f"{were[0]}/{were[1]} and {were[2]} pieces; this report says "
                    f"{report.ascending}/{report.descending} and {report.piece_count}"
                )
        self.refund(report.device_serial, now)
        return self.desk.acknowledge(report, now, AckOutcome.WITHDRAWAL)

    def refund(self, device_serial: int, now: datetime) -> int:
        """Step 2: the final audited descending register back to the customer, once."""
        last = self._withdrawal_record(device_serial)
        if last is None:
            raise ProtocolError(
                f"meter {device_serial} has no final withdrawal audit: nothing to refund"
            )
        details: dict[str, Any] = dict(last["details"])
        outcome = last["outcome"]
        if outcome in (WithdrawalOutcome.REFUNDED, WithdrawalOutcome.REVOKED):
            return int(details["refund"])
        audited_at = datetime.fromisoformat(details["withdrawal_audited_at"])
        if now - audited_at > REFUND_WINDOW:
            raise InvalidInput(
                f"the refund for meter {device_serial} is claimed {(now - audited_at).days} days "
                f"after its withdrawal ({audited_at.isoformat()}); refunds are accepted for "
                f"{REFUND_WINDOW.days} days: refused, nothing was refunded"
            )
        customer = self.ledger.customer_of(device_serial)
        if customer is None:
            raise InvalidInput(f"meter {device_serial} has no customer in the ledger")
        amount = int(details["descending"])
        if amount > 0:  # the ledger records no refund of nothing
            # Once: the ledger refunds the meter's WITHDRAWAL_REFUND_ID at most once (a
            # database constraint), so a rerun after a crash anywhere here adds nothing.
            self.ledger.record_refund(
                customer,
                device_serial,
                amount,
                f"withdrawal of meter {device_serial}: final descending register",
                now,
                refund_id=WITHDRAWAL_REFUND_ID,
            )
        details |= {"refund": amount, "refunded_at": now.isoformat()}
        details.pop("customer_refunded_before", None)  # format 1's journal, not needed now
        self.ledger.record_audit(
            device_serial, last["report"], WithdrawalOutcome.REFUNDED, details, now
        )
        return amount

    def acknowledgement(self, device_serial: int, now: datetime) -> AuditAcknowledgement:
        """The withdrawal acknowledgement of the meter's recorded final audit, signed again:
        for a meter that lost the first one (a crash while it destroyed its keys, after
        which it can sign no new report). Only once the refund is recorded."""
        last = self._withdrawal_record(device_serial)
        if last is None or last["outcome"] not in (
            WithdrawalOutcome.REFUNDED,
            WithdrawalOutcome.REVOKED,
        ):
            raise ProtocolError(
                f"meter {device_serial} has no refunded final audit: send its final report "
                "(POST /v1/withdrawals) first"
            )
        report = DeviceAuditReport.from_json(bytes(last["report"]), "the recorded final audit")
        return self.desk.acknowledge(report, now, AckOutcome.WITHDRAWAL)

    def revoke(self, device_serial: int, now: datetime) -> datetime:
        """Step 5: the meter's certificate revoked from its final report's meter time on."""
        last = self._withdrawal_record(device_serial)
        if last is None or last["outcome"] not in (
            WithdrawalOutcome.REFUNDED,
            WithdrawalOutcome.REVOKED,
        ):
            raise ProtocolError(
                f"meter {device_serial} is revoked after its final audit and refund, not before"
            )
        details: dict[str, Any] = dict(last["details"])
        at = self.revocations.revoke(device_serial, datetime.fromisoformat(details["meter_time"]))
        if last["outcome"] != WithdrawalOutcome.REVOKED:
            details["revoked_at"] = at.isoformat()
            self.ledger.record_audit(
                device_serial, last["report"], WithdrawalOutcome.REVOKED, details, now
            )
        return at

    def export_revocations(self, now: datetime) -> RevocationExport:
        export = RevocationExport(
            self.desk.authorization_id, now.replace(microsecond=0), self.revocations.entries()
        )
        return export.signed_by(self.desk.sign)

    def _withdrawal_record(self, device_serial: int) -> dict[str, Any] | None:
        last = self.ledger.last_audit(device_serial)
        if last is None or last["outcome"] not in _WITHDRAWAL_OUTCOMES:
            return None
        return last
