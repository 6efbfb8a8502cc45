"""The provider's export of credited totals, which a post office reconciles registers against.

A JSON object: ``{"format": "pim-credited-v1", "authorization_id": N,
"generated_at": ISO-8601, "devices": {"<serial>": mills, ...}, "signature":
hex}``. ``devices`` holds, for every meter with a grant in the provider's
ledger, all postage ever granted to it (its control total once every grant
is applied). The signature is the provider's ECDSA P-256 key (the key of its
certificate, which chains to the postal root) over the canonical JSON of the
other four members (sorted keys, no white space, UTF-8), as ``r || s``
(meter.protocol.signed_json, with no format prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from meter.errors import InvalidInput, ProtocolError
from meter.protocol.signed_json import (
    MAX_MILLS,
    MAX_SERIAL,
    SignedDocument,
    canonical,
    document,
    instant,
    members,
    p256_signature,
    provider_id,
    verify_p256,
)

__all__ = ["CREDITED_FORMAT", "CreditedExport"]

CREDITED_FORMAT = "pim-credited-v1"
_MEMBERS = {"format", "authorization_id", "generated_at", "devices", "signature"}


@dataclass(frozen=True)
class CreditedExport(SignedDocument):
    """Credited totals per device, as one provider signed them."""

    UNSIGNED = "credited export"

    authorization_id: int
    generated_at: datetime
    devices: Mapping[int, int]
    signature: bytes = b""

    def body(self) -> dict[str, object]:
        return {
            "format": CREDITED_FORMAT,
            "authorization_id": self.authorization_id,
            "generated_at": self.generated_at.isoformat(),
            "devices": {str(serial): mills for serial, mills in sorted(self.devices.items())},
        }

    def signed_part(self) -> bytes:
        return canonical(self.body())

    @classmethod
    def from_json(cls, data: bytes | str, source: str) -> CreditedExport:
        """Parse and check the shape strictly; InvalidInput names the source and the member."""
        doc = document(data, source, CREDITED_FORMAT)
        members(doc, source, _MEMBERS)
        authorization_id = provider_id(doc["authorization_id"], source)
        generated_at = instant(doc["generated_at"], source, "generated_at")
        if not isinstance(doc["devices"], dict):
            raise InvalidInput(f"{source}: 'devices' must map device serials to mills")
        devices: dict[int, int] = {}
        for key, mills in doc["devices"].items():
            if not (key.isascii() and key.isdigit() and str(int(key)) == key):
                raise InvalidInput(f"{source}: device serial {key!r} is not a decimal integer")
            if int(key) > MAX_SERIAL:
                raise InvalidInput(f"{source}: device serial {key} exceeds 8 bytes")
            if isinstance(mills, bool) or not isinstance(mills, int) or not 0 <= mills <= MAX_MILLS:
                raise InvalidInput(
                    f"{source}: credited total of device {key} must be 0 to {MAX_MILLS} mills"
                )
            devices[int(key)] = mills
        return cls(
            authorization_id, generated_at, devices, p256_signature(doc["signature"], source)
        )

    def verify(self, provider: x509.Certificate, source: str) -> None:
        """ProtocolError unless this provider certificate's key signed it for its own id.

        The caller vouches that the certificate chains to the postal root.
        """
        attrs = provider.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
        if [str(a.value) for a in attrs] != [str(self.authorization_id)]:
            raise ProtocolError(
                f"{source}: the provider certificate is not that of authorization id "
                f"{self.authorization_id}"
            )
        verify_p256(
            provider,
            self.signed_part(),
            self.signature,
            f"{source}: signature of provider {self.authorization_id} does not verify "
            "(altered or forged export)",
        )
