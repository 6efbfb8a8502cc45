"""Signed canonical JSON, the shape of the device audit's messages (meter.protocol.device_audit,
meter.protocol.revocation_export): canonical bytes, strict member checks that name the
source and the member, and the provider-signature check."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meter.errors import InvalidInput, ProtocolError
from meter.indicium import Algorithm, VerifyingKey

__all__ = [
    "MAX_MILLS",
    "MAX_SERIAL",
    "P256_SIGNATURE",
    "boolean",
    "canonical",
    "document",
    "hex_bytes",
    "instant",
    "members",
    "mills",
    "subject_serial",
    "text",
    "verify_provider",
    "whole",
]

MAX_MILLS = 2**40 - 1  # PIM-1 registers are 5 bytes
MAX_SERIAL = 2**64 - 1
P256_SIGNATURE = Algorithm.ECDSA_P256.signature_length


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def verify_provider(
    certificate: x509.Certificate, authorization_id: int, signed: bytes, signature: bytes, what: str
) -> None:
    if subject_serial(certificate, "provider certificate") != authorization_id:
        raise ProtocolError(
            f"{what}: the provider certificate is not that of authorization id {authorization_id}"
        )
    try:
        VerifyingKey(certificate.public_key()).verify(Algorithm.ECDSA_P256, signed, signature)
    except InvalidSignature as exc:
        raise ProtocolError(
            f"{what}: the provider's signature does not verify (altered or forged)"
        ) from exc


def subject_serial(certificate: x509.Certificate, what: str) -> int:
    attrs = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
    values = [str(a.value) for a in attrs]
    if len(values) != 1 or not values[0].isdigit():
        raise ProtocolError(f"{what} has no decimal serialNumber")
    return int(values[0])


def document(data: Mapping[str, Any] | bytes | str, source: str, fmt: str) -> dict[str, Any]:
    if isinstance(data, bytes | str):
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{source}: not JSON ({exc})") from exc
    else:
        doc = dict(data)
    if not isinstance(doc, dict):
        raise InvalidInput(f"{source}: must be a JSON object")
    if doc.get("format") != fmt:
        raise InvalidInput(f"{source}: member 'format' must be {fmt!r}")
    return doc


def members(doc: Mapping[str, Any], source: str, expected: set[str]) -> None:
    unknown, missing = set(doc) - expected, expected - set(doc)
    if unknown or missing:
        raise InvalidInput(
            f"{source}: unknown members {sorted(unknown)}, missing members {sorted(missing)}"
        )


def whole(value: object, source: str, name: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise InvalidInput(f"{source}: '{name}' must be a whole number from 0 to {top}")
    return value


def mills(value: object, source: str, name: str) -> int:
    return whole(value, source, name, MAX_MILLS)


def boolean(value: object, source: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{source}: '{name}' must be true or false")
    return value


def text(value: object, source: str, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise InvalidInput(f"{source}: '{name}' must be 1-64 printable characters")
    return value


def hex_bytes(value: object, source: str, name: str, least: int, most: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or not least <= len(raw) <= most:
        size = f"{least}" if least == most else f"{least} to {most}"
        raise InvalidInput(f"{source}: '{name}' must be {size} bytes as hex")
    return raw


def instant(value: object, source: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise InvalidInput(f"{source}: '{name}' must be an ISO-8601 time with a UTC offset")
    return parsed
