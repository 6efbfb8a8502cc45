"""Authorize Customer: the provider's signed record binding a customer account to one meter.

A JSON object: ``{"format": "pim-customer-authorization-v1", "authorization_id":
N, "device_serial": N, "customer": "ID", "issued_at": ISO-8601 UTC,
"signature": hex}``. The signature is the provider's ECDSA P-256 key (in its
token; its certificate chains to the postal root) over the canonical JSON of
the other five members (sorted keys, no white space, UTF-8), as ``r || s``,
like the credited export (meter/protocol/credited.py; both through
meter/protocol/signed_json.py, with no format prefix).

The meter verifies it against the provider certificate it pinned at
Authorize PSD and keeps it in its private state: the device serial must be
its own, the authorization id that of the pinned provider, the record no
older than the one installed before (a replayed older record cannot undo a
later one).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from meter.errors import InvalidInput, ProtocolError
from meter.protocol.signed_json import (
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

__all__ = ["AUTHORIZATION_FORMAT", "CUSTOMER_ID", "CustomerAuthorization", "check_customer_id"]

AUTHORIZATION_FORMAT = "pim-customer-authorization-v1"
# A customer account: what the meter shows and the ledger keys on.
CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MEMBERS = {"format", "authorization_id", "device_serial", "customer", "issued_at", "signature"}
_MAX_RECORD = 4096  # bytes of the JSON text; a record is ~300


def check_customer_id(customer: object) -> str:
    if not isinstance(customer, str) or not CUSTOMER_ID.fullmatch(customer):
        raise InvalidInput(
            f"customer account {customer!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return customer


@dataclass(frozen=True)
class CustomerAuthorization(SignedDocument):
    """One provider's signed binding of ``customer`` to meter ``device_serial``."""

    UNSIGNED = "customer authorization"

    authorization_id: int
    device_serial: int
    customer: str
    issued_at: datetime
    signature: bytes = b""

    def body(self) -> dict[str, object]:
        return {
            "format": AUTHORIZATION_FORMAT,
            "authorization_id": self.authorization_id,
            "device_serial": self.device_serial,
            "customer": self.customer,
            "issued_at": self.issued_at.isoformat(),
        }

    def signed_part(self) -> bytes:
        return canonical(self.body())

    @classmethod
    def issue(
        cls,
        authorization_id: int,
        device_serial: int,
        customer: str,
        now: datetime,
        sign: Callable[[bytes], bytes],
    ) -> CustomerAuthorization:
        """A new record, signed by ``sign`` (the provider's token key)."""
        check_customer_id(customer)
        _check_serial(device_serial, "device_serial")
        if now.tzinfo is None:
            raise InvalidInput("issued_at has no time zone: give an aware UTC datetime")
        record = cls(
            authorization_id, device_serial, customer, now.astimezone(UTC).replace(microsecond=0)
        )
        return record.signed_by(sign)

    def to_text(self) -> str:
        """The canonical text the meter keeps (sorted keys, no white space)."""
        return canonical(self.to_json()).decode()

    @classmethod
    def from_json(cls, data: Any, source: str) -> CustomerAuthorization:
        """Parse JSON text or an already-decoded object; InvalidInput names the member."""
        if isinstance(data, bytes | str) and len(data) > _MAX_RECORD:
            raise InvalidInput(f"{source}: longer than {_MAX_RECORD} bytes")
        doc = document(data, source, AUTHORIZATION_FORMAT)
        members(doc, source, _MEMBERS)
        authorization_id = provider_id(doc["authorization_id"], source)
        device_serial = _check_serial(doc["device_serial"], f"{source}: 'device_serial'")
        try:
            customer = check_customer_id(doc["customer"])
        except InvalidInput as exc:
            raise InvalidInput(f"{source}: {exc}") from None
        issued_at = instant(doc["issued_at"], source, "issued_at")
        signature = p256_signature(doc["signature"], source)
        record = cls(authorization_id, device_serial, customer, issued_at, signature)
        if record.body()["issued_at"] != doc["issued_at"]:
            # Two spellings of one instant would sign different bytes than they parse to.
            raise InvalidInput(f"{source}: 'issued_at' is not in its canonical form")
        return record

    def verify(self, provider: x509.Certificate, device_serial: int, source: str) -> None:
        """ProtocolError unless this provider's key signed it, for its own id, for this meter.

        The caller vouches that ``provider`` chains to the postal root (the
        meter pinned it at Authorize PSD).
        """
        attrs = provider.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
        if [str(a.value) for a in attrs] != [str(self.authorization_id)]:
            pinned = ", ".join(str(a.value) for a in attrs) or "none"
            raise ProtocolError(
                f"{source}: signed for provider authorization id {self.authorization_id}, "
                f"but this meter's provider is {pinned}"
            )
        if self.device_serial != device_serial:
            raise ProtocolError(
                f"{source}: for device {self.device_serial}, this meter is {device_serial}"
            )
        verify_p256(
            provider,
            self.signed_part(),
            self.signature,
            f"{source}: signature of provider {self.authorization_id} does not verify "
            "(altered, or signed by another provider's key)",
        )


def _check_serial(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SERIAL:
        raise InvalidInput(f"{what} must be a device serial, 1 to {MAX_SERIAL}")
    return value
