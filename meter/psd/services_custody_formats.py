"""The ceremony's documents as the device reads and writes them (docs/custody.md): the export
bundle, the final-register statement, the signed messages' domains, and their checks.

Pure: no token, no firmware; the services in meter.psd.services_custody and
meter.psd.services_custody_import use them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meter.errors import CertificateError, InvalidInput, ProtocolError
from meter.indicium import key_id
from meter.psd.audit import audit_key_algorithm, verify_seal_signature
from meter.psd.device import SIGNING_KEY_LABEL
from meter.psd.firmware_core import AUDIT_KEY_LABEL
from meter.psd.identity import DeviceIdentity
from meter.psd.register_store import MAC_KEY_LABEL
from meter.token import KeyAlgorithm
from meter.token import wrapping as w

__all__ = [
    "BUNDLE_FORMAT",
    "CEREMONY_APPLICATION",
    "CEREMONY_ID",
    "CEREMONY_KEYS",
    "COMMITTING",
    "IMPORTING",
    "IMPORT_UNSIGNED",
    "PURPOSES",
    "STATEMENT_FORMAT",
    "TRANSCRIPT_DOMAIN",
    "TRANSCRIPT_FORMAT",
    "Authorization",
    "Bundle",
    "canonical",
    "check_postal_root",
    "check_transport_key",
    "key_algorithm_of",
    "parse_bundle",
    "statement_message",
    "transcript_message",
    "verified_statement",
]

BUNDLE_FORMAT = "meter-key-export/1"
STATEMENT_FORMAT = "meter-final-registers/1"
TRANSCRIPT_FORMAT = "meter-ceremony-transcript/1"
STATEMENT_DOMAIN = b"meter.ceremony.final-registers.v1\x00"
TRANSCRIPT_DOMAIN = b"meter.ceremony.transcript.v1\x00"
PURPOSES = ("export-backup", "export-move", "import")
# What a ceremony moves, in the order the target writes them (the signing key last:
# its presence is what makes the target a provisioned meter).
CEREMONY_KEYS: tuple[tuple[str, w.KeyClass], ...] = (
    (MAC_KEY_LABEL, "secret"),
    (AUDIT_KEY_LABEL, "private"),
    (SIGNING_KEY_LABEL, "private"),
)
CEREMONY_APPLICATION = "meter.ceremony"
CEREMONY_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
IMPORTING = "ceremony-import-"
COMMITTING = "import-committing-"
# Kept from an import's commit point until its transcript is signed: a rerun of that import
# may then go straight to signing it (docs/custody.md, Interruptions).
IMPORT_UNSIGNED = "import-unsigned-"


@dataclass
class Authorization:
    ceremony: str
    purpose: str
    by: str
    at: str
    exported: dict[str, str] | None = None  # KCVs (hex) once the keys are wrapped
    # An import: the SHA-256 of the postal root the Security Officer trusts (DER). A bundle
    # under another root is refused: anyone can make a self-consistent chain and statement.
    postal_root: bytes | None = None
    # An import authorized again after its commit point: only its transcript remains.
    resumed: bool = False


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def statement_message(statement: dict[str, Any]) -> bytes:
    """What the source's signing key signs: a domain, then the statement's canonical JSON."""
    return STATEMENT_DOMAIN + canonical(statement)


def transcript_message(transcript: dict[str, Any]) -> bytes:
    return TRANSCRIPT_DOMAIN + canonical(transcript)


@dataclass(frozen=True)
class Bundle:
    ceremony: str
    identity: DeviceIdentity
    algorithm: KeyAlgorithm
    certificates: tuple[x509.Certificate, x509.Certificate, x509.Certificate]
    keys: tuple[w.WrappedKey, ...]

    @property
    def kcvs(self) -> dict[str, str]:
        return {e.label: e.kcv.hex() for e in self.keys}

    def entry(self, label: str) -> w.WrappedKey:
        return next(e for e in self.keys if e.label == label)


def parse_bundle(bundle: dict[str, Any]) -> Bundle:
    try:
        if bundle.get("format") != BUNDLE_FORMAT:
            raise ProtocolError(f"the export bundle's format is not {BUNDLE_FORMAT}")
        device = bundle["device"]
        algorithm = KeyAlgorithm(device["algorithm"])
        identity = DeviceIdentity(
            device_serial=int(device["device_serial"]),
            vendor_model=str(device["vendor_model"]),
            authorization_id=int(device["authorization_id"]),
            algorithm=algorithm,
            software_id=int(device["software_id"]),
        )
        pems = bundle["certificates"]
        certs = tuple(
            x509.load_pem_x509_certificate(str(pems[n]).encode())
            for n in ("meter", "provider", "postal_root")
        )
        keys = tuple(w.WrappedKey.from_json(k) for k in bundle["keys"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"the export bundle is malformed ({exc})") from exc
    if sorted(k.label for k in keys) != sorted(label for label, _ in CEREMONY_KEYS):
        raise ProtocolError("the export bundle does not hold exactly the meter's three keys")
    signing = next(k for k in keys if k.label == SIGNING_KEY_LABEL)
    certified = (
        certs[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if signing.public_spki != certified or signing.kcv != w.public_kcv(certified):
        raise CertificateError(
            "the export bundle's signing key is not the one its meter certificate holds"
        )
    for entry in keys:
        if entry.kind == "private" and (
            entry.public_spki is None or entry.kcv != w.public_kcv(entry.public_spki)
        ):
            raise ProtocolError(f"key '{entry.label}': its check value is not its public key's")
    meter_cert, provider, root = certs
    try:
        meter_cert.verify_directly_issued_by(provider)
        provider.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            "the export bundle's certificates are not a chain (meter <- provider <- postal root)"
        ) from exc
    return Bundle(str(bundle["ceremony"]), identity, algorithm, certs, keys)  # type: ignore[arg-type]


def verified_statement(bundle: Bundle, signed: dict[str, Any]) -> dict[str, Any]:
    """The source's final-register statement, verified under the certificate's key and
    matched to this bundle; anything else is refused, so credit is never duplicated."""
    try:
        statement = signed["statement"]
        signature = bytes.fromhex(signed["signature"])
        if not isinstance(statement, dict):
            raise TypeError("statement is not an object")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"the final-register statement is malformed ({exc})") from exc
    public = bundle.certificates[0].public_key()
    try:
        verify_seal_signature(public, signature, statement_message(statement))  # type: ignore[arg-type]
    except (InvalidSignature, InvalidInput) as exc:
        raise ProtocolError(
            "the final-register statement does not verify under the meter certificate's key: "
            "altered, or not signed by the source device"
        ) from exc
    expected = {
        "format": STATEMENT_FORMAT,
        "ceremony": bundle.ceremony,
        "device_serial": bundle.identity.device_serial,
        "key_id": key_id(public).hex(),
        "kcvs": bundle.kcvs,
    }
    wrong = [name for name, value in expected.items() if statement.get(name) != value]
    if wrong:
        raise ProtocolError(
            f"the final-register statement does not match the export bundle ({', '.join(wrong)}): "
            "it belongs to another ceremony or device"
        )
    return statement


def check_transport_key(key: bytearray) -> None:
    if len(key) != 32:
        raise InvalidInput(f"the transport key is 32 bytes, not {len(key)}")


def key_algorithm_of(entry: w.WrappedKey) -> KeyAlgorithm:
    assert entry.public_spki is not None
    return audit_key_algorithm(serialization.load_der_public_key(entry.public_spki))


def check_postal_root(bundle: Bundle, trusted: bytes | None) -> None:
    """Refuse a bundle certified under another postal root than the one authorized."""
    root = bundle.certificates[2].public_bytes(serialization.Encoding.DER)
    if trusted is None or hashlib.sha256(root).digest() != trusted:
        raise CertificateError(
            "the export bundle's postal root (SHA-256 "
            f"{hashlib.sha256(root).hexdigest()[:16]}...) is not the one the Security Officer "
            "authorized for this import"
        )
