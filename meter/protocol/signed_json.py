"""Signed canonical JSON, the shape of the provider's and the meter's signed documents
(meter.protocol.device_audit, meter.protocol.revocation_export, meter.protocol.credited,
meter.protocol.authorization): canonical bytes, what is signed, the signature beside the
signed members, strict member checks that name the source and the member, and the
signature checks.

Canonical JSON is sorted keys, no white space, ASCII (non-ASCII characters escaped).
A document is sent as its members plus ``signature``, the signature in hex. Some
documents sign ``b"<format>\\n"`` followed by the canonical JSON of every member but
the signature (`prefixed`), others that canonical JSON alone; each module says which."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meter.errors import InvalidInput, ProtocolError
from meter.indicium import Algorithm, VerifyingKey

__all__ = [
    "MAX_MILLS",
    "MAX_SERIAL",
    "P256_SIGNATURE",
    "SignedDocument",
    "boolean",
    "canonical",
    "document",
    "hex_bytes",
    "instant",
    "members",
    "mills",
    "p256_signature",
    "prefixed",
    "provider_id",
    "subject_serial",
    "text",
    "verify_p256",
    "verify_provider",
    "whole",
    "with_signature",
]

MAX_MILLS = 2**40 - 1  # PIM-1 registers are 5 bytes
MAX_SERIAL = 2**64 - 1
P256_SIGNATURE = Algorithm.ECDSA_P256.signature_length


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def prefixed(fmt: str, body: Mapping[str, Any]) -> bytes:
    """What a prefixed document signs: its format, a newline, the canonical JSON of ``body``.

    The prefix keeps one kind of document from passing for another, or for an indicium
    (whose signed part begins with the version byte 0x01).
    """
    return fmt.encode() + b"\n" + canonical(body)


class SignedDocument:
    """What every signed document here does with its signature: sign, and send.

    A subclass is a frozen dataclass with a ``signature: bytes = b""`` field; it says
    which members it has (``body()``), what is signed (``signed_part()``) and what it is
    called in the refusal to send it unsigned (``UNSIGNED``, e.g. "the revocation export").
    """

    UNSIGNED: ClassVar[str]
    signature: bytes
    # What dataclasses.replace asks of its argument: every subclass is a dataclass.
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def signed_part(self) -> bytes:
        raise NotImplementedError

    def signed_by(self, sign: Callable[[bytes], bytes]) -> Self:
        """This document with the signature ``sign`` makes over its signed part."""
        return replace(self, signature=sign(self.signed_part()))

    def to_json(self) -> dict[str, Any]:
        """The document as sent; ProtocolError if it is not signed."""
        return with_signature(self.body(), self.signature, self.UNSIGNED)


def with_signature(body: Mapping[str, Any], signature: bytes, what: str) -> dict[str, Any]:
    """The document as sent: ``body`` and ``signature`` in hex; ProtocolError if unsigned."""
    if not signature:
        raise ProtocolError(f"{what} is not signed")
    return {**body, "signature": signature.hex()}


def verify_p256(
    certificate: x509.Certificate, signed: bytes, signature: bytes, refusal: str
) -> None:
    """ProtocolError(refusal) unless the certificate's P-256 key signed ``signed`` (r || s)."""
    try:
        VerifyingKey(certificate.public_key()).verify(Algorithm.ECDSA_P256, signed, signature)
    except InvalidSignature as exc:
        raise ProtocolError(refusal) from exc


def verify_provider(
    certificate: x509.Certificate, authorization_id: int, signed: bytes, signature: bytes, what: str
) -> None:
    if subject_serial(certificate, "provider certificate") != authorization_id:
        raise ProtocolError(
            f"{what}: the provider certificate is not that of authorization id {authorization_id}"
        )
    verify_p256(
        certificate,
        signed,
        signature,
        f"{what}: the provider's signature does not verify (altered or forged)",
    )


def subject_serial(certificate: x509.Certificate, what: str) -> int:
    attrs = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
    values = [str(a.value) for a in attrs]
    if len(values) != 1 or not values[0].isdigit():
        raise ProtocolError(f"{what} has no decimal serialNumber")
    return int(values[0])


def document(data: object, source: str, fmt: str) -> dict[str, Any]:
    """JSON text, or an already-decoded value, as an object of format ``fmt``; InvalidInput
    otherwise."""
    if isinstance(data, bytes | str):
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInput(f"{source}: not JSON ({exc})") from exc
    elif isinstance(data, Mapping):
        doc = dict(data)
    else:  # an already-decoded value that is not an object: refused below
        doc = data
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


def provider_id(value: object, source: str) -> int:
    """An ``authorization_id`` that names a provider: 1 to 2**32 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise InvalidInput(f"{source}: 'authorization_id' must be a 4-byte positive integer")
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


def p256_signature(value: object, source: str) -> bytes:
    """The ``signature`` member of a document a P-256 key signs: r || s in hex."""
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != P256_SIGNATURE:
        raise InvalidInput(f"{source}: 'signature' must be {P256_SIGNATURE} bytes of hex (r || s)")
    return raw


def instant(value: object, source: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise InvalidInput(f"{source}: '{name}' is not an ISO-8601 time with a UTC offset")
    return parsed
