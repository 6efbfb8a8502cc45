"""Crediting a meter: the request a meter makes and the grant a provider signs.

The grant is bound to the device serial, the fresh nonce of the meter's
outstanding request and a transaction id, and signed by the provider's key
(ECDSA P-256, signed inside the provider's token). This is the local
signed-grant credit (a lab's development provider). The networked reload
protocol does not use these messages: it has its own grant and signed
statements (meter/protocol/reload_messages.py), carried in an authenticated,
encrypted channel with a two-phase commit (docs/reload-protocol.md).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meter.errors import ProtocolError

__all__ = ["CreditGrant", "CreditRequest", "verify_provider_certificate"]

_REQUEST = ">4sBIQ16sQQQI"  # magic, version, auth id, serial, nonce, asc, desc, total, sequence
_GRANT = ">4sBIQ16s16sQQ"  # magic, version, auth id, serial, nonce, txid, amount, issued_at
_GRANT_SIGNED = struct.calcsize(_GRANT)
_SIGNATURE = 64


@dataclass(frozen=True)
class CreditRequest:
    """What a meter sends to ask for credit: its identity, a fresh nonce and its registers."""

    authorization_id: int
    device_serial: int
    nonce: bytes
    ascending: int
    descending: int
    control_total: int
    sequence: int

    def to_bytes(self) -> bytes:
        return struct.pack(
            _REQUEST,
            b"PCRQ",
            1,
            self.authorization_id,
            self.device_serial,
            self.nonce,
            self.ascending,
            self.descending,
            self.control_total,
            self.sequence,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CreditRequest:
        if len(data) != struct.calcsize(_REQUEST):
            raise ProtocolError(
                f"credit request has {len(data)} bytes, expected {struct.calcsize(_REQUEST)}"
            )
        magic, version, *fields = struct.unpack(_REQUEST, data)
        if magic != b"PCRQ" or version != 1:
            raise ProtocolError("not a version-1 credit request")
        return cls(*fields)


@dataclass(frozen=True)
class CreditGrant:
    """A provider's signed grant of ``amount`` mills to one outstanding meter request."""

    authorization_id: int
    device_serial: int
    nonce: bytes
    transaction_id: bytes
    amount: int
    issued_at: datetime
    signature: bytes = b""

    def signed_part(self) -> bytes:
        return struct.pack(
            _GRANT,
            b"PCGR",
            1,
            self.authorization_id,
            self.device_serial,
            self.nonce,
            self.transaction_id,
            self.amount,
            int(self.issued_at.timestamp()),
        )

    def to_bytes(self) -> bytes:
        if len(self.signature) != _SIGNATURE:
            raise ProtocolError("credit grant is not signed")
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> CreditGrant:
        if len(data) != _GRANT_SIGNED + _SIGNATURE:
            raise ProtocolError(
                f"credit grant has {len(data)} bytes, expected {_GRANT_SIGNED + _SIGNATURE}"
            )
        magic, version, auth, serial, nonce, txid, amount, issued = struct.unpack(
            _GRANT, data[:_GRANT_SIGNED]
        )
        if magic != b"PCGR" or version != 1:
            raise ProtocolError("not a version-1 credit grant")
        return cls(
            auth,
            serial,
            nonce,
            txid,
            amount,
            datetime.fromtimestamp(issued, UTC),
            data[_GRANT_SIGNED:],
        )

    def verify(self, provider: x509.Certificate) -> None:
        """Raise ProtocolError unless the provider certificate's key signed this grant."""
        key = provider.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ProtocolError("provider certificate does not hold an ECDSA key")
        r = int.from_bytes(self.signature[:32], "big")
        s = int.from_bytes(self.signature[32:], "big")
        try:
            key.verify(encode_dss_signature(r, s), self.signed_part(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise ProtocolError(
                f"credit grant {self.transaction_id.hex()} for device {self.device_serial}: "
                "provider signature does not verify (altered or forged)"
            ) from exc

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()


def verify_provider_certificate(
    provider: x509.Certificate, root: x509.Certificate, at: datetime
) -> int:
    """Check that the root certified the provider (signature, not just name); return its auth id."""
    try:
        provider.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProtocolError("provider certificate is not issued by the postal root") from exc
    try:
        ca = provider.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise ProtocolError("provider certificate lacks basic constraints ca=True")
    if not provider.not_valid_before_utc <= at <= provider.not_valid_after_utc:
        raise ProtocolError(f"provider certificate is not valid at {at.isoformat()}")
    serials = provider.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
    if len(serials) != 1 or not str(serials[0].value).isdigit():
        raise ProtocolError("provider certificate has no decimal serialNumber (authorization id)")
    return int(str(serials[0].value))
