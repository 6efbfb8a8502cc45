"""The provider's export of credited totals, which a post office reconciles registers against.

A JSON object: ``{"format": "pim-credited-v1", "authorization_id": N,
"generated_at": ISO-8601, "devices": {"<serial>": mills, ...}, "signature":
hex}``. ``devices`` holds, for every meter with a grant in the provider's
ledger, all postage ever granted to it (its control total once every grant
is applied). The signature is the provider's ECDSA P-256 key (the key of its
certificate, which chains to the postal root) over the canonical JSON of the
other four members (sorted keys, no white space, UTF-8), as ``r || s``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meter.errors import InvalidInput, ProtocolError
from meter.indicium import Algorithm, VerifyingKey

__all__ = ["CREDITED_FORMAT", "CreditedExport"]

CREDITED_FORMAT = "pim-credited-v1"
_MAX_MILLS = 2**40 - 1  # registers are 5 bytes in PIM-1
_MAX_SERIAL = 2**64 - 1
_MEMBERS = {"format", "authorization_id", "generated_at", "devices", "signature"}


@dataclass(frozen=True)
class CreditedExport:
    """Credited totals per device, as one provider signed them."""

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
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def signed_by(self, sign: Callable[[bytes], bytes]) -> CreditedExport:
        return CreditedExport(
            self.authorization_id, self.generated_at, self.devices, sign(self.signed_part())
        )

    def to_json(self) -> dict[str, object]:
        if not self.signature:
            raise ProtocolError("credited export is not signed")
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, data: bytes | str, source: str) -> CreditedExport:
        """Parse and check the shape strictly; InvalidInput names the source and the member."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{source}: not JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise InvalidInput(f"{source}: a credited export is a JSON object")
        if doc.get("format") != CREDITED_FORMAT:
            raise InvalidInput(f"{source}: member 'format' must be {CREDITED_FORMAT!r}")
        unknown = set(doc) - _MEMBERS
        missing = _MEMBERS - set(doc)
        if unknown or missing:
            raise InvalidInput(
                f"{source}: unknown members {sorted(unknown)}, missing members {sorted(missing)}"
            )
        authorization_id = doc["authorization_id"]
        if not _is_int(authorization_id) or not 0 < authorization_id < 2**32:
            raise InvalidInput(f"{source}: 'authorization_id' must be a 4-byte positive integer")
        try:
            generated_at = datetime.fromisoformat(doc["generated_at"])
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{source}: 'generated_at' is not an ISO-8601 time") from exc
        if generated_at.tzinfo is None:
            raise InvalidInput(f"{source}: 'generated_at' has no time zone")
        if not isinstance(doc["devices"], dict):
            raise InvalidInput(f"{source}: 'devices' must map device serials to mills")
        devices: dict[int, int] = {}
        for key, mills in doc["devices"].items():
            if not (key.isascii() and key.isdigit() and str(int(key)) == key):
                raise InvalidInput(f"{source}: device serial {key!r} is not a decimal integer")
            if int(key) > _MAX_SERIAL:
                raise InvalidInput(f"{source}: device serial {key} exceeds 8 bytes")
            if not _is_int(mills) or not 0 <= mills <= _MAX_MILLS:
                raise InvalidInput(
                    f"{source}: credited total of device {key} must be 0 to {_MAX_MILLS} mills"
                )
            devices[int(key)] = mills
        signature = doc["signature"]
        try:
            raw = bytes.fromhex(signature) if isinstance(signature, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != Algorithm.ECDSA_P256.signature_length:
            raise InvalidInput(f"{source}: 'signature' must be 64 bytes of hex (r || s)")
        return cls(authorization_id, generated_at, devices, raw)

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
        try:
            VerifyingKey(provider.public_key()).verify(
                Algorithm.ECDSA_P256, self.signed_part(), self.signature
            )
        except InvalidSignature as exc:
            raise ProtocolError(
                f"{source}: signature of provider {self.authorization_id} does not verify "
                "(altered or forged export)"
            ) from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
