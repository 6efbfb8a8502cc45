"""Ephemeral ECDH P-256 inside the token, for the reload protocol (docs/reload-protocol.md).

Each reload session makes a fresh key pair as *session* objects (``CKA_TOKEN``
false: they never reach the token's files and die with the session at the
latest), derives the shared secret with ``CKM_ECDH1_DERIVE`` (no KDF: the raw
x-coordinate, as SP 800-56A's Z), and destroys the private key at once, so
each ephemeral key is used for exactly one derivation.

The derived secret is a generic secret key made extractable and not sensitive,
and read out: ``cryptography``'s HKDF-SHA-256 (a kept library, not a home-made
KDF) turns it and the handshake transcript into the session keys outside the
token. python-pkcs11 0.10 offers no HKDF mechanism (CKM_HKDF_DERIVE is
PKCS#11 3.0; SoftHSM2 2.6 lacks it), so deriving in the token would mean a
hand-built HMAC chain over token calls. The secret lives in this process's
memory for the session only; the long-term keys never leave the token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkcs11 import KDF, Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters

from meter.errors import ProtocolError, TokenError
from meter.token.session import Token
from meter.token.spki import ec_point

__all__ = ["POINT_LENGTH", "EphemeralKey", "generate_ephemeral", "shared_secret"]

_P256_OID = "1.2.840.10045.3.1.7"
POINT_LENGTH = 65  # uncompressed SEC 1 point: 0x04 || x || y
_SECRET_BITS = 256


@dataclass
class EphemeralKey:
    """One ephemeral P-256 key pair in the token's session; its public point."""

    public_point: bytes
    _private: Any = field(repr=False)
    _public: Any = field(repr=False)
    used: bool = False


def generate_ephemeral(token: Token, purpose: str) -> EphemeralKey:
    """A fresh ECDH P-256 key pair as session objects (``CKM_EC_KEY_PAIR_GEN``)."""
    token.require("ecdh_derive", purpose)
    params = encode_named_curve_parameters(_P256_OID)
    with token._call(f"generate ephemeral ECDH key ({purpose})") as s:
        public, private = s.generate_keypair(
            KeyType.EC,
            None,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            store=False,
            public_template={
                Attribute.TOKEN: False,
                Attribute.EC_PARAMS: params,
                Attribute.DERIVE: True,
                Attribute.VERIFY: False,
            },
            private_template={
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.DERIVE: True,
                Attribute.SIGN: False,
            },
        )
        point = ec_point(bytes(public[Attribute.EC_POINT]))
    if len(point) != POINT_LENGTH or point[0] != 0x04:
        raise TokenError(f"{token.where}: ephemeral public key is not an uncompressed P-256 point")
    return EphemeralKey(point, private, public)


def shared_secret(token: Token, key: EphemeralKey, peer_point: bytes) -> bytes:
    """Z = ECDH(ephemeral private, peer point) with ``CKM_ECDH1_DERIVE``; the key pair is
    destroyed afterwards, whatever happens (one derivation per ephemeral key)."""
    if key.used:
        raise ProtocolError("an ephemeral key derives once only")
    if len(peer_point) != POINT_LENGTH or peer_point[0] != 0x04:
        raise ProtocolError(
            f"the peer's ephemeral key is not an uncompressed P-256 point ({len(peer_point)} bytes)"
        )
    key.used = True
    try:
        with token._call("derive the ECDH shared secret") as _:
            derived = key._private.derive_key(
                KeyType.GENERIC_SECRET,
                _SECRET_BITS,
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, peer_point),
                store=False,
                template={
                    Attribute.TOKEN: False,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
            try:
                secret = bytes(derived[Attribute.VALUE])
            finally:
                derived.destroy()
    except TokenError as exc:
        # An invalid point (not on the curve) is the peer's fault, not the token's.
        raise ProtocolError(f"the peer's ephemeral key was refused by the token: {exc}") from exc
    finally:
        destroy(token, key)
    if len(secret) != _SECRET_BITS // 8:
        raise TokenError(f"{token.where}: ECDH derived {len(secret)} bytes, expected 32")
    return secret


def destroy(token: Token, key: EphemeralKey) -> None:
    """Destroy the ephemeral key pair now (idempotent; a closed session took it already)."""
    key.used = True
    for obj in (key._private, key._public):
        if obj is None:
            continue
        try:
            with token._call("destroy the ephemeral ECDH key"):
                obj.destroy()
        except TokenError:
            pass  # the session it lived in has gone, and the key with it
    key._private = key._public = None
