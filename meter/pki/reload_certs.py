"""The reload protocol's credentials: the meter's reload certificate and the provider's status.

The technical note (5.5) keeps the meter's key-exchange key apart from its
stamp-signing key. Here the meter authenticates the reload handshake with its
own P-256 *reload key* (generated in its token, never used for indicia), which
its provider certifies: a leaf certificate (``ca=False``), subject serialNumber =
device serial, key usage digitalSignature only, and an extended key usage of its
own (`RELOAD_EKU`) that no stamp certificate carries, so neither kind can stand
in for the other.

The provider's status is the postal root's dated statement that a provider
certificate is good (or revoked), as OCSP stapling does: the provider presents a
fresh one in every handshake, and the meter refuses a provider whose status is
missing, stale (past ``next_update``), for another certificate, or revoked. A
revoked provider cannot get a fresh "good" from the root, so the meter stops
trusting it within `STATUS_VALIDITY` of the revocation at the latest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from meter.errors import CertificateError
from meter.pki.issue import _SIGNATURE_ONLY, RawSigner, _issued_by, _sign_builder, _subject

__all__ = [
    "RELOAD_EKU",
    "STATUS_VALIDITY",
    "ProviderStatus",
    "ProviderStatusKind",
    "check_reload_certificate",
    "make_reload_certificate",
    "verify_ecdsa",
]

# A 2.25 (UUID) arc: "meter reload authentication", the reload key's only use.
RELOAD_EKU = x509.ObjectIdentifier("2.25.8050736901821869687031553360055104593")
STATUS_VALIDITY = timedelta(days=7)
_STATUS = struct.Struct(">4sBI20sBQQ")  # magic, version, auth id, cert serial, kind, produced, next
_SIGNATURE = 64


def make_reload_certificate(
    public_key_spki: bytes,
    device_serial: int,
    provider: x509.Certificate,
    sign_with_provider: RawSigner,
    not_before: datetime,
    days: int = 1095,
) -> x509.Certificate:
    """The provider certifies a meter's reload key (an ECDSA P-256 key in the meter's token)."""
    key = serialization.load_der_public_key(public_key_spki)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CertificateError("a meter's reload key must be an ECDSA P-256 key")
    subject = _subject(f"meter-reload-{device_serial:016x}", device_serial)
    builder = (
        _issued_by(provider, subject, public_key_spki, not_before, days, False)
        .add_extension(_SIGNATURE_ONLY, critical=True)
        .add_extension(x509.ExtendedKeyUsage([RELOAD_EKU]), critical=True)
    )
    return _sign_builder(builder, sign_with_provider)


def check_reload_certificate(
    cert: x509.Certificate, provider: x509.Certificate, at: datetime
) -> tuple[int, ec.EllipticCurvePublicKey]:
    """A meter's reload certificate, issued by ``provider`` and valid at ``at``: its device
    serial and key. CertificateError names what is wrong."""
    try:
        cert.verify_directly_issued_by(provider)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            "the meter's reload certificate is not issued by this provider"
        ) from exc
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or RELOAD_EKU not in usage:
        raise CertificateError(
            "the meter's certificate is not a reload certificate (a stamp certificate, or "
            "another kind, cannot authenticate a reload)"
        )
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise CertificateError(f"the meter's reload certificate is not valid at {at.isoformat()}")
    serials = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    if len(serials) != 1 or not isinstance(serials[0], str) or not serials[0].isdigit():
        raise CertificateError("the meter's reload certificate names no device serial")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError("the meter's reload certificate does not hold an ECDSA key")
    return int(serials[0]), key


def verify_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    """Does r || s (64 bytes) verify over ``message`` (ECDSA P-256, SHA-256)?"""
    if len(signature) != _SIGNATURE:
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class ProviderStatusKind(IntEnum):
    GOOD = 1
    REVOKED = 2


@dataclass(frozen=True)
class ProviderStatus:
    """The postal root's signed statement about one provider certificate, for a time."""

    authorization_id: int
    certificate_serial: int
    kind: ProviderStatusKind
    produced_at: datetime
    next_update: datetime
    signature: bytes = b""

    def signed_part(self) -> bytes:
        return _STATUS.pack(
            b"MPST",
            1,
            self.authorization_id,
            self.certificate_serial.to_bytes(20, "big"),
            self.kind,
            int(self.produced_at.timestamp()),
            int(self.next_update.timestamp()),
        )

    def to_bytes(self) -> bytes:
        if len(self.signature) != _SIGNATURE:
            raise CertificateError("provider status is not signed")
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> ProviderStatus:
        if len(data) != _STATUS.size + _SIGNATURE:
            raise CertificateError(
                f"provider status has {len(data)} bytes, expected {_STATUS.size + _SIGNATURE}"
            )
        magic, version, auth, serial, kind, produced, next_update = _STATUS.unpack(
            data[: _STATUS.size]
        )
        if magic != b"MPST" or version != 1 or kind not in (1, 2):
            raise CertificateError("not a version-1 provider status")
        return cls(
            auth,
            int.from_bytes(serial, "big"),
            ProviderStatusKind(kind),
            datetime.fromtimestamp(produced, UTC),
            datetime.fromtimestamp(next_update, UTC),
            data[_STATUS.size :],
        )

    @classmethod
    def issue(
        cls,
        provider: x509.Certificate,
        kind: ProviderStatusKind,
        sign_with_root: RawSigner,
        now: datetime,
        validity: timedelta = STATUS_VALIDITY,
    ) -> ProviderStatus:
        """The root's statement about ``provider`` from ``now`` for ``validity``."""
        auth = _authorization_id(provider)
        now = now.astimezone(UTC).replace(microsecond=0)
        status = cls(auth, provider.serial_number, kind, now, now + validity)
        return cls(*_fields(status), signature=sign_with_root(status.signed_part()))

    def check(self, provider: x509.Certificate, root: x509.Certificate, at: datetime) -> None:
        """Refuse unless the root signed "good" for exactly this certificate, fresh at ``at``."""
        key = root.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not verify_ecdsa(
            key, self.signature, self.signed_part()
        ):
            raise CertificateError(
                "the provider's status is not signed by the postal root the meter trusts"
            )
        if (
            self.certificate_serial != provider.serial_number
            or self.authorization_id != _authorization_id(provider)
        ):
            raise CertificateError("the provider's status is about another provider certificate")
        if self.kind is ProviderStatusKind.REVOKED:
            raise CertificateError(
                f"the provider certificate (authorization id {self.authorization_id}) is "
                f"revoked by the postal root (as of {self.produced_at.isoformat()})"
            )
        if not self.produced_at - timedelta(minutes=5) <= at <= self.next_update:
            raise CertificateError(
                f"the provider's status is stale or not yet valid at {at.isoformat()} "
                f"(produced {self.produced_at.isoformat()}, next update "
                f"{self.next_update.isoformat()}); the provider must fetch a fresh one"
            )


def _fields(status: ProviderStatus) -> tuple[int, int, ProviderStatusKind, datetime, datetime]:
    return (
        status.authorization_id,
        status.certificate_serial,
        status.kind,
        status.produced_at,
        status.next_update,
    )


def _authorization_id(provider: x509.Certificate) -> int:
    serials = [a.value for a in provider.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    if len(serials) != 1 or not isinstance(serials[0], str) or not serials[0].isdigit():
        raise CertificateError(
            "provider certificate has no decimal serialNumber (authorization id)"
        )
    return int(serials[0])
