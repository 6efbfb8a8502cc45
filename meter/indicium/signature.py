"""Key ids and PIM-1 signature verification (spec: "Signature")."""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meter.indicium.codec import Algorithm

KEY_ID_LENGTH = 8
PSS_SALT_LENGTH = 32
RSA_BITS = 2048
# Order n of the P-256 group (SEC 2); r and s must lie in [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# r and s as 32-byte big-endian strings: equal-length byte strings compare as the
# numbers they hold, so the range check needs no conversion to int.
_P256_ORDER_BYTES = _P256_ORDER.to_bytes(32)
_ZERO_32 = bytes(32)


def key_id(public_key: PublicKeyTypes) -> bytes:
    """First 8 bytes of SHA-256 over the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:KEY_ID_LENGTH]


def verify_signature(
    algorithm: Algorithm, public_key: PublicKeyTypes, signed_part: bytes, signature: bytes
) -> None:
    """Return if the signature verifies; raise InvalidSignature otherwise.

    A key whose type does not fit the algorithm byte does not verify either:
    the spec makes that FORGED, not an error.
    """
    VerifyingKey(public_key).verify(algorithm, signed_part, signature)


def p256_der(signature: bytes) -> bytes:
    """The DER ECDSA-Sig-Value of a 64-byte r || s; InvalidSignature unless 1 <= r, s <= n-1.

    Built from the bytes (half the time of int.from_bytes and encode_dss_signature,
    which give the same bytes): each INTEGER is its big-endian value without
    leading zero bytes, and one zero byte before it when its top bit is set.
    """
    whole = bytes(signature)  # no copy for bytes; a memoryview does not compare
    r, s = whole[:32], whole[32:]
    if not (_ZERO_32 < r < _P256_ORDER_BYTES and _ZERO_32 < s < _P256_ORDER_BYTES):
        raise InvalidSignature
    r, s = r.lstrip(b"\0"), s.lstrip(b"\0")
    if r[0] > 0x7F:
        r = b"\0" + r
    if s[0] > 0x7F:
        s = b"\0" + s
    # At most 2 * (2 + 33) = 70 bytes: every length fits the one-byte short form.
    return b"\x30" + bytes((len(r) + len(s) + 4, 2, len(r))) + r + bytes((2, len(s))) + s


class VerifyingKey:
    """A public key whose fitting algorithm is worked out once, to verify many indicia."""

    __slots__ = (
        "_ecdsa",
        "_ecdsa_key",
        "_ed25519_key",
        "_pss",
        "_rsa_key",
        "_signature_length",
        "algorithm",
        "public_key",
    )

    def __init__(self, public_key: PublicKeyTypes) -> None:
        self.public_key = public_key
        self.algorithm: Algorithm | None = None  # None: fits no PIM-1 algorithm
        # The key's type is settled here, once, not per indicium: at most one is set.
        self._ecdsa_key: ec.EllipticCurvePublicKey | None = None
        self._ed25519_key: ed25519.Ed25519PublicKey | None = None
        self._rsa_key: rsa.RSAPublicKey | None = None
        self._ecdsa = ec.ECDSA(hashes.SHA256())
        self._pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if isinstance(public_key.curve, ec.SECP256R1):
                self.algorithm, self._ecdsa_key = Algorithm.ECDSA_P256, public_key
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            self.algorithm, self._ed25519_key = Algorithm.ED25519, public_key
        elif isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == RSA_BITS:
            self.algorithm, self._rsa_key = Algorithm.RSA_PSS_2048, public_key
        self._signature_length = -1 if self.algorithm is None else self.algorithm.signature_length

    def verify(self, algorithm: Algorithm, signed_part: bytes, signature: bytes) -> None:
        """Return if the signature verifies; raise InvalidSignature otherwise."""
        # The length of this key's algorithm, read once: the property costs a call.
        if algorithm is not self.algorithm or len(signature) != self._signature_length:
            raise InvalidSignature
        if self._ecdsa_key is not None:
            # r || s as PKCS#11 CKM_ECDSA returns it; cryptography wants DER.
            self._ecdsa_key.verify(p256_der(signature), signed_part, self._ecdsa)
        elif self._ed25519_key is not None:
            self._ed25519_key.verify(signature, signed_part)
        elif self._rsa_key is not None:
            self._rsa_key.verify(signature, signed_part, self._pss, hashes.SHA256())
        else:  # unreachable: algorithm is None for any other key
            raise InvalidSignature
