"""meter.token.spki against `cryptography`'s own SubjectPublicKeyInfo encodings (pure)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meter.token.spki import ec_point, ed25519_spki, rsa_spki

SPKI = (s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)


def test_rsa_and_ed25519_spki_are_what_cryptography_writes() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pkcs1 = key.public_bytes(s.Encoding.DER, s.PublicFormat.PKCS1)
    assert rsa_spki(pkcs1) == key.public_bytes(*SPKI)
    edwards = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = edwards.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    assert ed25519_spki(raw) == edwards.public_bytes(*SPKI)


def test_an_ec_point_is_taken_out_of_its_octet_string_or_left_raw() -> None:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(s.Encoding.X962, s.PublicFormat.UncompressedPoint)
    )
    assert ec_point(bytes([0x04, len(point)]) + point) == point  # DER, as PKCS#11 says
    # Some tokens give the raw point (04 || x || y): not a DER OCTET STRING (its "length"
    # byte, x's first, does not fit), so it is left as it is.
    raw = b"\x04\x10" + point[2:]
    assert ec_point(raw) == raw
    assert ec_point(b"") == b""
