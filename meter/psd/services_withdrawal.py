"""Request Device Audit (No-Role) and Withdraw PSD (Provider): the signed audit report, the
provider's acknowledgement that restarts the inspection watchdog, and the withdrawal's
device steps, each durable and safe to rerun after a crash (docs/withdrawal.md).

Withdrawal, device side:

1. ``withdraw_psd(nonce=...)``: the state records ``withdrawing_since`` (durable,
   the commit point) BEFORE the final report is signed, so from then on nothing
   can be issued or credited and the descending register the provider refunds
   can never be spent. The final signed audit report comes back. Rerun: the
   state stays, a new report (same registers) comes back.
2. (the provider checks the report, refunds the descending register in its
   ledger and signs a ``withdrawal`` acknowledgement.)
3. ``withdraw_psd(acknowledgement=...)``: verified against the pinned provider
   certificate and the registers, the audit log is sealed a last time, then
   every private key of the meter (signing, key-exchange, audit and reload
   authentication) is destroyed in the token, with the reload key's certificate.
4. The state records ``withdrawn_at`` (durable). Rerun after a crash between 3
   and 4: the keys are gone already, the state is written.
5. (the provider revokes the meter's certificate in its revocation export.)

The register MAC key stays: it only authenticates the records, so a withdrawn
device still shows its final registers and its state, and it can create
neither postage nor a signature.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from meter.errors import DeviceLocked, InvalidInput, ProtocolError
from meter.protocol.credit import verify_provider_certificate
from meter.protocol.device_audit import (
    AckOutcome,
    AuditAcknowledgement,
    DeviceAuditReport,
    check_nonce,
)
from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.firmware_core import AUDIT_KEY_LABEL, KEY_EXCHANGE_LABEL
from meter.psd.roles import Service
from meter.psd.services_reload import RELOAD_CERT_APPLICATION, RELOAD_KEY_LABEL
from meter.psd.services_status import StatusServices
from meter.psd.watchdog import WatchdogStatus, watchdog_of

__all__ = ["DESTROYED_AT_WITHDRAWAL", "MAX_ACK_DELAY", "AuditServices"]

# Every private key of the meter, which a withdrawal destroys; the register MAC key stays
# (see above). The reload key goes too: a withdrawn device must hold no key that could still
# authenticate it to its provider. Stored reload receipts stay: they are statements signed
# already, not keys, and no reload can fetch one once the withdrawal began (step 1): the
# provider's final audit (step 2, before any key goes) is where open transactions are
# settled (docs/withdrawal.md, step 3).
DESTROYED_AT_WITHDRAWAL = (SIGNING_KEY_LABEL, KEY_EXCHANGE_LABEL, AUDIT_KEY_LABEL, RELOAD_KEY_LABEL)
# How long after its report an acknowledgement still counts, on the meter's clock.
MAX_ACK_DELAY = timedelta(hours=24)
_KEPT_REPORTS = 8  # reports awaiting an acknowledgement, newest kept


class AuditServices(StatusServices):
    _audit_reports: dict[bytes, DeviceAuditReport]

    # -- the watchdog ----------------------------------------------------------

    def watchdog(self) -> WatchdogStatus | None:
        return watchdog_of(self._meter, self.meter_now())

    def _watchdog_allows(self, service: Service) -> None:
        status = self.watchdog()
        if status is not None:
            status.refuse(service.display)

    # -- Request Device Audit ----------------------------------------------------

    def request_device_audit(self, nonce: bytes | None = None) -> dict[str, Any]:
        """Request Device Audit (No-Role): rerun the self-tests and report the figures.

        With the provider's ``nonce`` the report is signed inside the token by the
        meter's certified key (it needs the token unlocked: a logon since power-up);
        without one it is the unsigned health check, which needs no logon.
        """
        with self._service(Service.REQUEST_DEVICE_AUDIT) as out:
            if nonce is not None:
                check_nonce(nonce)
                self._require_meter()  # "not unlocked since it started" before a logon
            if self.unlocked:
                self._open_device()  # reread the records, then the full self-tests
                report = self.self_tests
                assert report is not None
            else:
                report = self._run_self_tests("on-demand")
            status = self._status()
            out["self_tests_passed"] = report.passed
            if status["registers"] is not None:
                out["registers"] = status["registers"]
            signed = None
            if nonce is not None:
                signed = self._signed_report(nonce)
                out.update(nonce=nonce.hex(), report_sha256=signed.digest().hex())
        result: dict[str, Any] = {
            "self_tests": report.to_json(),
            "module_state": status["module_state"],
            "registers": status["registers"],
            "device_serial": status["device_serial"],
            "time": status["time"],
            "signed_report": None if signed is None else signed.to_json(),
        }
        return result

    def acknowledge_device_audit(self, acknowledgement: AuditAcknowledgement) -> dict[str, Any]:
        """The provider's signed answer to a report this device made since power-up: the
        audit counts as successful and the inspection watchdog starts again from now."""
        with self._service(
            Service.REQUEST_DEVICE_AUDIT,
            step="acknowledge",
            report_sha256=acknowledgement.report_sha256.hex(),
        ) as out:
            meter = self._require_meter()
            self._verify_acknowledgement(meter, acknowledgement)
            if acknowledgement.outcome != AckOutcome.OK:
                raise ProtocolError(
                    f"an acknowledgement with outcome {acknowledgement.outcome!r} completes a "
                    "withdrawal (Withdraw PSD), not a routine audit"
                )
            report = self._reports().get(acknowledgement.report_sha256)
            if report is None:
                raise ProtocolError(
                    f"acknowledgement of report {acknowledgement.report_sha256.hex()}: this "
                    "device made no such report since it started, or it was acknowledged "
                    "already; request a new device audit"
                )
            now = self.meter_now()
            if now - report.meter_time > MAX_ACK_DELAY:
                raise ProtocolError(
                    f"acknowledgement of a report made at {report.meter_time.isoformat()}: "
                    f"older than {MAX_ACK_DELAY}; request a new device audit"
                )
            del self._reports()[acknowledgement.report_sha256]  # one acknowledgement per report
            meter.commit_state(meter.state.next(last_audit_at=now.isoformat()))
            out.update(
                last_audit_at=now.isoformat(), audited_at=acknowledgement.audited_at.isoformat()
            )
        return {"last_audit_at": now.isoformat(), "watchdog": self._watchdog_json()}

    # -- Withdraw PSD --------------------------------------------------------------

    def withdraw_psd(
        self,
        nonce: bytes | None = None,
        acknowledgement: AuditAcknowledgement | None = None,
    ) -> dict[str, Any]:
        """Withdraw PSD (Provider): with the provider's ``nonce``, stop issuing and return
        the final signed audit; with the provider's withdrawal ``acknowledgement`` of it,
        destroy the private keys and record the device withdrawn. Either step may be rerun."""
        step = "final-audit" if acknowledgement is None else "destroy-keys"
        with self._service(Service.WITHDRAW_PSD, step=step) as out:
            if (nonce is None) == (acknowledgement is None):
                raise InvalidInput(
                    "Withdraw PSD takes either the provider's audit nonce (step 1: stop "
                    "issuing, final signed audit) or the provider's withdrawal acknowledgement "
                    "of that audit (step 3: destroy the keys, record the device withdrawn)"
                )
            if nonce is not None:
                return self._withdraw_begin(nonce, out)
            assert acknowledgement is not None
            return self._withdraw_complete(acknowledgement, out)

    def _withdraw_begin(self, nonce: bytes, out: dict[str, Any]) -> dict[str, Any]:
        check_nonce(nonce)
        meter = self._require_meter()
        if meter.certificates is None:
            raise DeviceLocked(
                "the device has no certificate yet: there is nothing to withdraw "
                "(Authorize PSD first)"
            )
        if meter.state.withdrawing_since is None:
            # The commit point: nothing is issued or credited from here on.
            at = self.meter_now().isoformat()
            meter.commit_state(meter.state.next(withdrawing_since=at))
        report = self._signed_report(nonce)
        r = meter.registers
        out.update(
            withdrawing_since=meter.state.withdrawing_since,
            report_sha256=report.digest().hex(),
            ascending=r.ascending,
            descending=r.descending,
            piece_count=r.sequence,
        )
        return {
            "step": "final-audit",
            "withdrawing_since": meter.state.withdrawing_since,
            "signed_report": report.to_json(),
        }

    def _withdraw_complete(self, ack: AuditAcknowledgement, out: dict[str, Any]) -> dict[str, Any]:
        out["report_sha256"] = ack.report_sha256.hex()
        meter = self._require_meter()
        if meter.state.withdrawing_since is None:
            raise DeviceLocked(
                "no withdrawal has begun: run Withdraw PSD with the provider's nonce first "
                "(it stops issuing and makes the final signed audit)"
            )
        self._verify_acknowledgement(meter, ack)
        if ack.outcome != AckOutcome.WITHDRAWAL:
            raise ProtocolError(
                f"acknowledgement outcome {ack.outcome!r}: only the provider's "
                f"{AckOutcome.WITHDRAWAL!r} acknowledgement (refund recorded) completes a "
                "withdrawal"
            )
        r = meter.registers
        if (ack.ascending, ack.descending, ack.piece_count) != (
            r.ascending,
            r.descending,
            r.sequence,
        ):
            raise ProtocolError(
                f"the withdrawal acknowledgement is for registers {ack.ascending}/"
                f"{ack.descending} and {ack.piece_count} pieces, the device holds "
                f"{r.ascending}/{r.descending} and {r.sequence}"
            )
        self._seal()  # the last seal the audit key makes
        # Each destruction is idempotent (a missing key or object is no error), so a rerun
        # after a crash anywhere in here finishes the job.
        for label in DESTROYED_AT_WITHDRAWAL:
            self.token.destroy_key(label)
        for certificate in self.token.data_objects(RELOAD_CERT_APPLICATION):
            self.token.destroy(certificate)  # it certifies a key that no longer exists
        self.token.make_durable()
        at = self.meter_now().isoformat()
        meter.commit_state(meter.state.next(withdrawn_at=at, signing_key_active=False))
        out.update(
            withdrawn_at=at,
            destroyed=list(DESTROYED_AT_WITHDRAWAL),
            ascending=r.ascending,
            descending=r.descending,
            piece_count=r.sequence,
        )
        return {
            "step": "withdrawn",
            "withdrawn_at": at,
            "withdrawing_since": meter.state.withdrawing_since,
            "destroyed_keys": list(DESTROYED_AT_WITHDRAWAL),
            "ascending": r.ascending,
            "descending": r.descending,
            "piece_count": r.sequence,
            "device_serial": meter.identity.device_serial,
        }

    # -- helpers -------------------------------------------------------------------

    def _reports(self) -> dict[bytes, DeviceAuditReport]:
        if not hasattr(self, "_audit_reports"):
            self._audit_reports = {}
        return self._audit_reports

    def _signed_report(self, nonce: bytes) -> DeviceAuditReport:
        meter = self._require_meter()
        if meter.certificates is None:
            raise DeviceLocked(
                "the device has no certificate yet: a signed audit report needs the meter "
                "certificate that verifies it (Authorize PSD)"
            )
        if not self.token.has_key(SIGNING_KEY_LABEL):
            raise DeviceLocked(
                "the device's signing key was destroyed by its withdrawal: it signs no more "
                "audit reports (the provider keeps the final one)"
            )
        state, r = meter.state, meter.registers
        report = DeviceAuditReport(
            device_serial=meter.identity.device_serial,
            authorization_id=meter.identity.authorization_id,
            key_id=meter.key_id,
            nonce=nonce,
            ascending=r.ascending,
            descending=r.descending,
            control_total=r.control_total,
            piece_count=r.sequence,
            module_state=self.module_state(),
            withdrawing=state.withdrawing_since is not None,
            meter_time=self.meter_now(),
            self_tests_passed=self.self_tests is not None and self.self_tests.passed,
            psc_version=state.psc_version,
            last_audit_at=(
                None if state.last_audit_at is None else datetime.fromisoformat(state.last_audit_at)
            ),
        )
        algorithm = meter.identity.algorithm
        signed = report.signed_by(lambda part: self.token.sign(SIGNING_KEY_LABEL, algorithm, part))
        reports = self._reports()
        reports[signed.digest()] = signed
        while len(reports) > _KEPT_REPORTS:
            del reports[next(iter(reports))]
        return signed

    def _verify_acknowledgement(self, meter: Meter, ack: AuditAcknowledgement) -> None:
        certificates = meter.certificates
        if certificates is None:
            raise DeviceLocked("the device has no certificate yet (Authorize PSD)")
        try:
            verify_provider_certificate(certificates.provider, certificates.root, self.meter_now())
        except ProtocolError as exc:
            raise ProtocolError(f"the pinned provider certificate: {exc}") from exc
        if ack.device_serial != meter.identity.device_serial:
            raise ProtocolError(
                f"the acknowledgement is for device {ack.device_serial}, this is device "
                f"{meter.identity.device_serial}"
            )
        if ack.authorization_id != meter.identity.authorization_id:
            raise ProtocolError(
                f"the acknowledgement comes from authorization id {ack.authorization_id}, this "
                f"device's provider is {meter.identity.authorization_id}"
            )
        ack.verify(certificates.provider)

    def _watchdog_json(self) -> dict[str, Any] | None:
        status = self.watchdog()
        return None if status is None else status.to_json()
