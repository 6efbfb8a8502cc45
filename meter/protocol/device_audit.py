"""The device audit's messages: the meter's signed report and the provider's
acknowledgement (docs/withdrawal.md). The provider's revocation export is in
meter.protocol.revocation_export; the shared canonical JSON in meter.protocol.signed_json.

Both are canonical JSON (sorted keys, no white space, ASCII) with a hex
signature beside the signed members:

- ``DeviceAuditReport`` (``pim-device-audit-v1``): the meter's registers, piece
  count, state, clock and the provider's nonce, signed inside the token by the
  meter's certified signing key. What is signed is ``b"pim-device-audit-v1\\n"``
  followed by the canonical JSON of every member but the signature. A PIM-1
  indicium's signed part begins with the version byte 0x01, so no report can
  pass for an indicium, nor an indicium for a report.
- ``AuditAcknowledgement`` (``pim-audit-ack-v1``): the provider's answer to a
  report it checked, signed by the provider's ECDSA P-256 key (r || s, as for
  credit grants); the meter verifies it against its pinned provider
  certificate before it counts as a successful audit (the inspection
  watchdog's clock restarts) or lets a withdrawal destroy the keys.

Verification raises ProtocolError naming the problem; parsing, InvalidInput.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meter.errors import InvalidInput, ProtocolError
from meter.indicium import VerifyingKey, key_id
from meter.protocol.signed_json import (
    MAX_SERIAL,
    SignedDocument,
    boolean,
    canonical,
    document,
    hex_bytes,
    instant,
    members,
    mills,
    p256_signature,
    prefixed,
    subject_serial,
    text,
    verify_provider,
    whole,
)

__all__ = [
    "ACK_FORMAT",
    "MAX_NONCE",
    "MIN_NONCE",
    "REPORT_FORMAT",
    "AckOutcome",
    "AuditAcknowledgement",
    "DeviceAuditReport",
    "check_nonce",
    "nonce_from_hex",
]

REPORT_FORMAT = "pim-device-audit-v1"
ACK_FORMAT = "pim-audit-ack-v1"
MIN_NONCE, MAX_NONCE = 16, 32


class AckOutcome:
    OK = "ok"  # a routine audit: the watchdog restarts
    WITHDRAWAL = "withdrawal"  # the final audit of a withdrawal: refunded; keys may go


def check_nonce(nonce: object) -> bytes:
    """The provider's nonce as bytes, or InvalidInput saying what a nonce must be."""
    if not isinstance(nonce, bytes) or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        length = len(nonce) if isinstance(nonce, bytes) else type(nonce).__name__
        raise InvalidInput(
            f"an audit nonce is {MIN_NONCE} to {MAX_NONCE} random bytes from the provider "
            f"(got {length}); ask the provider for a fresh one"
        )
    return nonce


def nonce_from_hex(text: str) -> bytes:
    """A nonce sent as hex (the device API, the CLI); InvalidInput if it is not one."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"the audit nonce {text[:70]!r} is not hex") from None
    return check_nonce(raw)


# -- the meter's report ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceAuditReport(SignedDocument):
    UNSIGNED = "the device audit report"

    device_serial: int
    authorization_id: int
    key_id: bytes  # of the meter's signing key: the certificate that verifies this report
    nonce: bytes  # the provider's, 16-32 bytes, fresh per request
    ascending: int
    descending: int
    control_total: int
    piece_count: int
    module_state: str  # Request Status's module state when the report was made
    withdrawing: bool  # a withdrawal has begun: nothing can be issued any more
    meter_time: datetime  # the meter's clock
    self_tests_passed: bool
    psc_version: str
    last_audit_at: datetime | None  # the meter's last successful provider audit, or None
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "device_serial": self.device_serial,
            "authorization_id": self.authorization_id,
            "key_id": self.key_id.hex(),
            "nonce": self.nonce.hex(),
            "registers": {
                "ascending": self.ascending,
                "descending": self.descending,
                "control_total": self.control_total,
            },
            "piece_count": self.piece_count,
            "module_state": self.module_state,
            "withdrawing": self.withdrawing,
            "meter_time": self.meter_time.isoformat(),
            "self_tests_passed": self.self_tests_passed,
            "psc_version": self.psc_version,
            "last_audit_at": None if self.last_audit_at is None else self.last_audit_at.isoformat(),
        }

    def signed_part(self) -> bytes:
        return prefixed(REPORT_FORMAT, self.body())

    def digest(self) -> bytes:
        """SHA-256 of the signed part (never the signature: ECDSA signatures are malleable)."""
        return hashlib.sha256(self.signed_part()).digest()

    def to_bytes(self) -> bytes:
        return canonical(self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | bytes | str, source: str) -> DeviceAuditReport:
        doc = document(data, source, REPORT_FORMAT)
        members(
            doc,
            source,
            {
                "format",
                "device_serial",
                "authorization_id",
                "key_id",
                "nonce",
                "registers",
                "piece_count",
                "module_state",
                "withdrawing",
                "meter_time",
                "self_tests_passed",
                "psc_version",
                "last_audit_at",
                "signature",
            },
        )
        registers = doc["registers"]
        if not isinstance(registers, dict):
            raise InvalidInput(f"{source}: 'registers' must be an object")
        members(registers, f"{source}: registers", {"ascending", "descending", "control_total"})
        ascending = mills(registers["ascending"], source, "registers.ascending")
        descending = mills(registers["descending"], source, "registers.descending")
        control_total = whole(registers["control_total"], source, "registers.control_total", 2**41)
        if ascending + descending != control_total:
            raise InvalidInput(
                f"{source}: registers do not add up (ascending + descending != control_total)"
            )
        last = doc["last_audit_at"]
        return cls(
            device_serial=whole(doc["device_serial"], source, "device_serial", MAX_SERIAL),
            authorization_id=whole(doc["authorization_id"], source, "authorization_id", 2**32 - 1),
            key_id=hex_bytes(doc["key_id"], source, "key_id", 8, 8),
            nonce=hex_bytes(doc["nonce"], source, "nonce", MIN_NONCE, MAX_NONCE),
            ascending=ascending,
            descending=descending,
            control_total=control_total,
            piece_count=whole(doc["piece_count"], source, "piece_count", 2**32 - 1),
            module_state=text(doc["module_state"], source, "module_state"),
            withdrawing=boolean(doc["withdrawing"], source, "withdrawing"),
            meter_time=instant(doc["meter_time"], source, "meter_time"),
            self_tests_passed=boolean(doc["self_tests_passed"], source, "self_tests_passed"),
            psc_version=text(doc["psc_version"], source, "psc_version"),
            last_audit_at=None if last is None else instant(last, source, "last_audit_at"),
            signature=hex_bytes(doc["signature"], source, "signature", 1, 512),
        )

    def verify(self, meter_certificate: x509.Certificate, nonce: bytes | None = None) -> None:
        """ProtocolError unless this meter certificate's key signed this report (and, with
        ``nonce``, for that nonce). The caller vouches that the certificate is genuine."""
        serial = subject_serial(meter_certificate, "meter certificate")
        if serial != self.device_serial:
            raise ProtocolError(
                f"device audit report of device {self.device_serial} checked against the "
                f"certificate of device {serial}"
            )
        public = meter_certificate.public_key()
        if key_id(public) != self.key_id:
            raise ProtocolError(
                f"device audit report names key id {self.key_id.hex()}, not the key of the "
                f"certificate of device {serial}"
            )
        verifying = VerifyingKey(public)
        try:
            if verifying.algorithm is None:
                raise InvalidSignature
            verifying.verify(verifying.algorithm, self.signed_part(), self.signature)
        except InvalidSignature as exc:
            raise ProtocolError(
                f"device audit report of device {self.device_serial}: the signature does not "
                "verify (altered or forged report)"
            ) from exc
        if nonce is not None and not hmac.compare_digest(nonce, self.nonce):
            raise ProtocolError(
                f"device audit report of device {self.device_serial} answers nonce "
                f"{self.nonce.hex()}, not the one asked for (a replayed or stale report)"
            )


# -- the provider's acknowledgement -------------------------------------------------------


@dataclass(frozen=True)
class AuditAcknowledgement(SignedDocument):
    UNSIGNED = "the audit acknowledgement"

    authorization_id: int
    device_serial: int
    report_sha256: bytes  # DeviceAuditReport.digest() of the report it answers
    ascending: int
    descending: int
    piece_count: int
    audited_at: datetime  # the provider's clock
    outcome: str  # AckOutcome
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {
            "format": ACK_FORMAT,
            "authorization_id": self.authorization_id,
            "device_serial": self.device_serial,
            "report_sha256": self.report_sha256.hex(),
            "ascending": self.ascending,
            "descending": self.descending,
            "piece_count": self.piece_count,
            "audited_at": self.audited_at.isoformat(),
            "outcome": self.outcome,
        }

    def signed_part(self) -> bytes:
        return prefixed(ACK_FORMAT, self.body())

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | bytes | str, source: str) -> AuditAcknowledgement:
        doc = document(data, source, ACK_FORMAT)
        members(
            doc,
            source,
            {
                "format",
                "authorization_id",
                "device_serial",
                "report_sha256",
                "ascending",
                "descending",
                "piece_count",
                "audited_at",
                "outcome",
                "signature",
            },
        )
        outcome = doc["outcome"]
        if outcome not in (AckOutcome.OK, AckOutcome.WITHDRAWAL):
            raise InvalidInput(
                f"{source}: 'outcome' must be {AckOutcome.OK!r} or {AckOutcome.WITHDRAWAL!r}"
            )
        return cls(
            authorization_id=whole(doc["authorization_id"], source, "authorization_id", 2**32 - 1),
            device_serial=whole(doc["device_serial"], source, "device_serial", MAX_SERIAL),
            report_sha256=hex_bytes(doc["report_sha256"], source, "report_sha256", 32, 32),
            ascending=mills(doc["ascending"], source, "ascending"),
            descending=mills(doc["descending"], source, "descending"),
            piece_count=whole(doc["piece_count"], source, "piece_count", 2**32 - 1),
            audited_at=instant(doc["audited_at"], source, "audited_at"),
            outcome=outcome,
            signature=p256_signature(doc["signature"], source),
        )

    def verify(self, provider_certificate: x509.Certificate) -> None:
        """ProtocolError unless the provider of this certificate signed it for its own id."""
        verify_provider(
            provider_certificate,
            self.authorization_id,
            self.signed_part(),
            self.signature,
            f"audit acknowledgement for device {self.device_serial}",
        )
