"""Public keys read from a token, as DER SubjectPublicKeyInfo, through asn1crypto.

python-pkcs11 builds the SPKI of an EC key itself (`encode_ec_public_key`); for RSA it gives
the PKCS#1 RSAPublicKey, and for Ed25519 only CKA_EC_POINT, so those two are wrapped here.
"""

from __future__ import annotations

from asn1crypto import core, keys

__all__ = ["ec_point", "ed25519_spki", "rsa_spki"]


def ec_point(value: bytes) -> bytes:
    """The point in a CKA_EC_POINT: a DER OCTET STRING by PKCS#11, but some tokens give the
    raw point, which is returned as it is."""
    try:
        point = core.OctetString.load(value, strict=True).native
    except ValueError:
        return value
    return bytes(point) if isinstance(point, bytes) else value


def ed25519_spki(point: bytes) -> bytes:
    return bytes(
        keys.PublicKeyInfo({"algorithm": {"algorithm": "ed25519"}, "public_key": point}).dump()
    )


def rsa_spki(rsa_public_key_der: bytes) -> bytes:
    """The SPKI (rsaEncryption, NULL parameters) around a PKCS#1 RSAPublicKey."""
    public_key = keys.RSAPublicKey.load(rsa_public_key_der)
    info = keys.PublicKeyInfo({"algorithm": {"algorithm": "rsa"}, "public_key": public_key})
    return bytes(info.dump())
