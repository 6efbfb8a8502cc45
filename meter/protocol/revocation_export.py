"""The provider's signed revocation export (``pim-revocations-v1``): the meters it revoked
and from when, for post offices (docs/withdrawal.md).

Canonical JSON (meter.protocol.signed_json): ``format``, ``authorization_id``,
``generated_at``, ``revocations`` (a list of {"device_serial", "revoked_at"},
meter.pki.revocation's entries) and ``signature``, the provider's ECDSA P-256
key (r || s) over ``b"pim-revocations-v1\\n"`` and the canonical JSON of the
other members. A post office verifies it with that provider's certificate and
merges the entries into its ``revocations.json``
(meter.postoffice.trustdir.load_revocation_export).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from meter.errors import CertificateError, InvalidInput
from meter.pki.revocation import Revocations
from meter.protocol.signed_json import (
    SignedDocument,
    document,
    instant,
    members,
    p256_signature,
    prefixed,
    verify_provider,
    whole,
)

__all__ = ["REVOCATIONS_FORMAT", "RevocationExport"]

REVOCATIONS_FORMAT = "pim-revocations-v1"


@dataclass(frozen=True)
class RevocationExport(SignedDocument):
    UNSIGNED = "the revocation export"

    authorization_id: int
    generated_at: datetime
    revoked: Mapping[int, datetime]  # device serial -> revoked from this instant on
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {
            "format": REVOCATIONS_FORMAT,
            "authorization_id": self.authorization_id,
            "generated_at": self.generated_at.isoformat(),
            "revocations": self.entries(),
        }

    def entries(self) -> list[dict[str, Any]]:
        """The entries in meter.pki.revocation's list format."""
        return [
            {"device_serial": serial, "revoked_at": at.isoformat()}
            for serial, at in sorted(self.revoked.items())
        ]

    def signed_part(self) -> bytes:
        return prefixed(REVOCATIONS_FORMAT, self.body())

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | bytes | str, source: str) -> RevocationExport:
        doc = document(data, source, REVOCATIONS_FORMAT)
        members(
            doc, source, {"format", "authorization_id", "generated_at", "revocations", "signature"}
        )
        try:
            listed = Revocations.from_json(json.dumps(doc["revocations"]), f"{source}: revocations")
        except CertificateError as exc:
            raise InvalidInput(str(exc)) from exc
        if len(listed) != len(doc["revocations"]):
            raise InvalidInput(f"{source}: a device is listed twice in 'revocations'")
        revoked = {}
        for entry in doc["revocations"]:
            at = listed.revoked_at(entry["device_serial"])
            assert at is not None
            revoked[entry["device_serial"]] = at
        return cls(
            authorization_id=whole(doc["authorization_id"], source, "authorization_id", 2**32 - 1),
            generated_at=instant(doc["generated_at"], source, "generated_at"),
            revoked=revoked,
            signature=p256_signature(doc["signature"], source),
        )

    def verify(self, provider_certificate: x509.Certificate) -> None:
        verify_provider(
            provider_certificate,
            self.authorization_id,
            self.signed_part(),
            self.signature,
            f"revocation export of provider {self.authorization_id}",
        )
