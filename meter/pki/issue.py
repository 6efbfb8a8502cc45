"""Making the chain's certificates when the issuer's private key lives in a token.

``cryptography`` signs certificates only with keys it holds. The issuer here
is always an ECDSA P-256 key inside a token, so the to-be-signed part is
built by ``cryptography`` with a throwaway P-256 key (the signature
algorithm field is the same: ecdsa-with-SHA256), signed by the token, and
the certificate assembled around it.

The builder helpers here (`_builder`, `_issued_by`, `_subject`,
`_SIGNATURE_ONLY`, `_sign_builder`) are also those of the code-signing and
reload certificates (meter/pki/codesign.py, meter/pki/reload_certs.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from meter.errors import CertificateError

__all__ = [
    "RawSigner",
    "make_meter_certificate",
    "make_provider_certificate",
    "make_root_certificate",
]

RawSigner = Callable[[bytes], bytes]
"""Signs a message with ECDSA P-256 over SHA-256, returning r || s (32 + 32 bytes)."""

_CERTIFIABLE = (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)
_ECDSA_SHA256_ALGID = bytes.fromhex("300a06082a8648ce3d040302")


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _sign_builder(builder: x509.CertificateBuilder, sign: RawSigner) -> x509.Certificate:
    placeholder = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    tbs = placeholder.tbs_certificate_bytes
    raw = sign(tbs)
    if len(raw) != 64:
        raise CertificateError(f"issuer signature is {len(raw)} bytes, expected r||s of 64")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    signature = encode_dss_signature(r, s)
    der = _tlv(0x30, tbs + _ECDSA_SHA256_ALGID + _tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(der)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key_spki: bytes,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
) -> x509.CertificateBuilder:
    try:
        public_key = serialization.load_der_public_key(public_key_spki)
    except ValueError as exc:
        raise CertificateError(f"unreadable public key for {subject.rfc4514_string()}") from exc
    if not isinstance(public_key, _CERTIFIABLE):
        raise CertificateError(f"{type(public_key).__name__} cannot be certified for PIM-1")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(secrets.randbits(63) | 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def _issued_by(
    issuer: x509.Certificate,
    subject: x509.Name,
    public_key_spki: bytes,
    not_before: datetime,
    days: int,
    ca: bool,
) -> x509.CertificateBuilder:
    """A builder for a certificate that ``issuer`` signs: valid ``days`` from ``not_before``,
    but never past the issuer's own end."""
    not_after = min(not_before + timedelta(days=days), issuer.not_valid_after_utc)
    return _builder(subject, issuer.subject, public_key_spki, not_before, not_after, ca)


def _subject(common_name: str, serial: int | None = None) -> x509.Name:
    """CN, then serialNumber (an authorization id or a device serial) when there is one."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if serial is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)))
    return x509.Name(attributes)


# Key usage of a leaf key that only signs (code signing, reload authentication).
_SIGNATURE_ONLY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def make_root_certificate(
    public_key_spki: bytes, sign: RawSigner, name: str, not_before: datetime, days: int = 3650
) -> x509.Certificate:
    """The postal root: self-signed, ``ca=True``."""
    subject = _subject(name)
    builder = _builder(
        subject, subject, public_key_spki, not_before, not_before + timedelta(days=days), True
    )
    return _sign_builder(builder, sign)


def make_provider_certificate(
    public_key_spki: bytes,
    authorization_id: int,
    name: str,
    root: x509.Certificate,
    sign_with_root: RawSigner,
    not_before: datetime,
    days: int = 1825,
) -> x509.Certificate:
    """A provider (post office) certified by the root; ``serialNumber`` = authorization id."""
    subject = _subject(name, authorization_id)
    builder = _issued_by(root, subject, public_key_spki, not_before, days, True)
    return _sign_builder(builder, sign_with_root)


def make_meter_certificate(
    public_key_spki: bytes,
    device_serial: int,
    provider: x509.Certificate,
    sign_with_provider: RawSigner,
    not_before: datetime,
    days: int = 1095,
) -> x509.Certificate:
    """A meter certified by its provider; ``serialNumber`` = device serial, ``ca=False``."""
    subject = _subject(f"meter-{device_serial:016x}", device_serial)
    builder = _issued_by(provider, subject, public_key_spki, not_before, days, False)
    return _sign_builder(builder, sign_with_provider)
