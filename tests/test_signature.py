"""Signature verification for the three algorithms, and key ids."""

from __future__ import annotations

import _vectors
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.indicium import SIGNED_LENGTH, Algorithm, VerifyingKey, decode, key_id, verify_signature

VECTORS = _vectors.load()
BY_NAME = {v["name"]: v for v in VECTORS["vectors"]}
# Order of the P-256 group.
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
MESSAGE = bytes(range(SIGNED_LENGTH))


def keys() -> tuple[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey]:
    ecdsa = _vectors.private_key(VECTORS, _vectors.ECDSA_SERIAL)
    eddsa = _vectors.private_key(VECTORS, _vectors.ED25519_SERIAL)
    rsa_key = _vectors.private_key(VECTORS, _vectors.RSA_SERIAL)
    assert isinstance(ecdsa, ec.EllipticCurvePrivateKey)
    assert isinstance(eddsa, ed25519.Ed25519PrivateKey)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    return ecdsa, eddsa, rsa_key


def raw_ecdsa(key: ec.EllipticCurvePrivateKey, message: bytes) -> tuple[int, int]:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r, s


def rs(r: int, s: int) -> bytes:
    return r.to_bytes(32) + s.to_bytes(32)


def test_key_id_is_the_indicium_key_id_of_each_meter() -> None:
    for name, serial in (
        ("ecdsa-valid", _vectors.ECDSA_SERIAL),
        ("ed25519-valid", _vectors.ED25519_SERIAL),
        ("rsa-pss-valid", _vectors.RSA_SERIAL),
    ):
        certificate = _vectors.meter_certificate(VECTORS, serial)
        indicium = decode(bytes.fromhex(BY_NAME[name]["indicium_hex"]))
        assert key_id(certificate.public_key()) == indicium.key_id
        private = _vectors.private_key(VECTORS, serial)
        assert key_id(private.public_key()) == indicium.key_id


def test_authority_vectors_verify() -> None:
    for name, serial in (
        ("ecdsa-valid", _vectors.ECDSA_SERIAL),
        ("ecdsa-malleated-replay", _vectors.ECDSA_SERIAL),
        ("ed25519-valid", _vectors.ED25519_SERIAL),
        ("rsa-pss-valid", _vectors.RSA_SERIAL),
    ):
        data = bytes.fromhex(BY_NAME[name]["indicium_hex"])
        indicium = decode(data)
        public = _vectors.meter_certificate(VECTORS, serial).public_key()
        verify_signature(indicium.algorithm, public, data[:SIGNED_LENGTH], indicium.signature)
    altered = bytes.fromhex(BY_NAME["signature-altered"]["indicium_hex"])
    public = _vectors.meter_certificate(VECTORS, _vectors.ECDSA_SERIAL).public_key()
    with pytest.raises(InvalidSignature):
        verify_signature(Algorithm.ECDSA_P256, public, altered[:SIGNED_LENGTH], altered[84:])


def test_ecdsa_accepts_high_and_low_s_and_refuses_out_of_range() -> None:
    key = keys()[0]
    public = key.public_key()
    r, s = raw_ecdsa(key, MESSAGE)
    verify_signature(Algorithm.ECDSA_P256, public, MESSAGE, rs(r, s))
    verify_signature(Algorithm.ECDSA_P256, public, MESSAGE, rs(r, N - s))
    for bad_r, bad_s in ((0, s), (r, 0), (r + N, s), (r, s + N), (N, s), (r, N)):
        if bad_r >= 2**256 or bad_s >= 2**256:
            continue
        with pytest.raises(InvalidSignature):
            verify_signature(Algorithm.ECDSA_P256, public, MESSAGE, rs(bad_r, bad_s))
    for length in (63, 65, 70):
        with pytest.raises(InvalidSignature):
            verify_signature(Algorithm.ECDSA_P256, public, MESSAGE, bytes(length))
    with pytest.raises(InvalidSignature):
        verify_signature(Algorithm.ECDSA_P256, public, MESSAGE + b"x", rs(r, s))


def test_ed25519() -> None:
    key = keys()[1]
    signature = key.sign(MESSAGE)
    verify_signature(Algorithm.ED25519, key.public_key(), MESSAGE, signature)
    with pytest.raises(InvalidSignature):
        verify_signature(Algorithm.ED25519, key.public_key(), MESSAGE[:-1], signature)


def test_rsa_pss_salt_length_exactly_32() -> None:
    key = keys()[2]
    public = key.public_key()

    def pss(salt: int) -> padding.PSS:
        return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)

    verify_signature(
        Algorithm.RSA_PSS_2048, public, MESSAGE, key.sign(MESSAGE, pss(32), hashes.SHA256())
    )
    for salt in (0, 20, 31, 33, 222):
        signature = key.sign(MESSAGE, pss(salt), hashes.SHA256())
        with pytest.raises(InvalidSignature):
            verify_signature(Algorithm.RSA_PSS_2048, public, MESSAGE, signature)
    pkcs1 = key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        verify_signature(Algorithm.RSA_PSS_2048, public, MESSAGE, pkcs1)
    mgf_sha1 = padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=32)
    with pytest.raises(InvalidSignature):
        verify_signature(
            Algorithm.RSA_PSS_2048, public, MESSAGE, key.sign(MESSAGE, mgf_sha1, hashes.SHA256())
        )


def test_key_type_that_does_not_fit_the_algorithm_does_not_verify() -> None:
    ecdsa, eddsa, rsa_key = keys()
    good = {
        Algorithm.ECDSA_P256: rs(*raw_ecdsa(ecdsa, MESSAGE)),
        Algorithm.ED25519: eddsa.sign(MESSAGE),
        Algorithm.RSA_PSS_2048: rsa_key.sign(
            MESSAGE,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        ),
    }
    publics = {
        Algorithm.ECDSA_P256: ecdsa.public_key(),
        Algorithm.ED25519: eddsa.public_key(),
        Algorithm.RSA_PSS_2048: rsa_key.public_key(),
    }
    for algorithm, signature in good.items():
        for key_algorithm, public in publics.items():
            if key_algorithm is algorithm:
                verify_signature(algorithm, public, MESSAGE, signature)
            else:
                with pytest.raises(InvalidSignature):
                    verify_signature(algorithm, public, MESSAGE, signature)


def test_other_curves_and_rsa_sizes_fit_no_algorithm() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    r, s = decode_dss_signature(p384.sign(MESSAGE, ec.ECDSA(hashes.SHA256())))
    assert VerifyingKey(p384.public_key()).algorithm is None
    with pytest.raises(InvalidSignature):
        verify_signature(Algorithm.ECDSA_P256, p384.public_key(), MESSAGE, rs(r % N or 1, s % N))
    rsa3072 = rsa.generate_private_key(65537, 3072)
    assert VerifyingKey(rsa3072.public_key()).algorithm is None
    with pytest.raises(InvalidSignature):
        verify_signature(Algorithm.RSA_PSS_2048, rsa3072.public_key(), MESSAGE, bytes(256))


def test_verifying_key_knows_its_algorithm() -> None:
    ecdsa, eddsa, rsa_key = keys()
    assert VerifyingKey(ecdsa.public_key()).algorithm is Algorithm.ECDSA_P256
    assert VerifyingKey(eddsa.public_key()).algorithm is Algorithm.ED25519
    assert VerifyingKey(rsa_key.public_key()).algorithm is Algorithm.RSA_PSS_2048
