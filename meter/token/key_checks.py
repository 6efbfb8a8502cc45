"""Key check values (KCVs) and the pairwise test: that the key a ceremony imported is
the key it exported.

Computed inside the token and compared after import: a secret key's KCV is
HMAC-SHA-256 of `KCV_MESSAGE` under that key; a private key's is the SHA-256 of its
public key's SubjectPublicKeyInfo, tied to the private half by a pairwise sign and
verify (`pairwise_check`). meter.token.wrapping puts them in every wrapped key.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meter.errors import TokenError
from meter.token.profile import KeyAlgorithm
from meter.token.session import Token

__all__ = ["KCV_MESSAGE", "kcv_matches", "pairwise_check", "public_kcv", "secret_kcv"]

KCV_MESSAGE = b"meter.ceremony.key-check-value.v1\x00"


def secret_kcv(token: Token, label: str) -> bytes:
    """A secret key's check value: HMAC-SHA-256 of `KCV_MESSAGE`, computed in the token."""
    return token.hmac(label, KCV_MESSAGE)


def pairwise_check(token: Token, label: str, algorithm: KeyAlgorithm, spki: bytes) -> None:
    """Sign a fresh challenge with the private key ``label``; verify it with ``spki``."""
    challenge = b"meter.ceremony.pairwise.v1\x00" + token.random(32)
    signature = token.sign(label, algorithm, challenge)
    public = serialization.load_der_public_key(spki)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey) and len(signature) == 64:
            r, s = int.from_bytes(signature[:32]), int.from_bytes(signature[32:])
            public.verify(encode_dss_signature(r, s), challenge, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public.verify(signature, challenge, pss, hashes.SHA256())
        else:
            raise InvalidSignature
    except InvalidSignature as exc:
        raise TokenError(
            f"{token.where}: key '{label}' fails its pairwise test: its signature does not "
            "verify with the public key recorded at export (the certificate's)"
        ) from exc


def public_kcv(spki: bytes) -> bytes:
    return hashlib.sha256(spki).digest()


def kcv_matches(expected: bytes, found: bytes) -> bool:
    return _hmac.compare_digest(expected, found)
