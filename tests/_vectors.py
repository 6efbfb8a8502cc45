"""The postal authority's PIM-1 vectors (a verbatim copy, see vectors/README.md) and helpers
that build the trust store, revocations and freshly signed indicia from them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.indicium import Algorithm, Indicium, RateCategory, address_digest, key_id
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore

VECTORS_PATH = Path(__file__).parent / "vectors" / "pim1-vectors-v1.json"
# SHA-256 of /work/shared/spec/vectors-v1.json as the postal authority published it.
VECTORS_SHA256 = "efd2467847a3b7416df2d9905789bbee4fa89d29bdcc66c0ca92b49ce2d57e15"

ECDSA_SERIAL = 983973031309
ED25519_SERIAL = 444377552072
RSA_SERIAL = 510336888528
REVOKED_SERIAL = 443698669015
AUTHORIZATION_ID = 60669
SERIAL_BY_ALGORITHM = {
    Algorithm.ECDSA_P256: ECDSA_SERIAL,
    Algorithm.ED25519: ED25519_SERIAL,
    Algorithm.RSA_PSS_2048: RSA_SERIAL,
}
ADDRESS = ["Jane Q. Public", "1234  Main St.", "", "Springfield, IL 62704"]


def load() -> dict[str, Any]:
    data = VECTORS_PATH.read_bytes()
    loaded: dict[str, Any] = json.loads(data)
    return loaded


def verification_date(vectors: dict[str, Any]) -> date:
    return date.fromisoformat(vectors["verification_date"])


def certificates_pem(vectors: dict[str, Any]) -> tuple[bytes, bytes]:
    """(root PEM, providers and meters PEM)."""
    certs = vectors["certificates"]
    return certs["postal_root"].encode(), "".join(certs["providers"] + certs["meters"]).encode()


def trust_store(vectors: dict[str, Any]) -> TrustStore:
    return TrustStore.from_pem(*certificates_pem(vectors))


def revocations(vectors: dict[str, Any]) -> Revocations:
    return Revocations.from_json(json.dumps(vectors["revoked"]))


def meter_certificate(vectors: dict[str, Any], serial: int) -> x509.Certificate:
    for pem in vectors["certificates"]["meters"]:
        certificate = x509.load_pem_x509_certificate(pem.encode())
        if certificate.subject.rfc4514_string().startswith(f"2.5.4.5={serial},"):
            return certificate
    raise KeyError(serial)


def private_key(vectors: dict[str, Any], serial: int) -> PrivateKeyTypes:
    pem = vectors["meter_private_keys_for_tests_only"][str(serial)].encode()
    return serialization.load_pem_private_key(pem, password=None)


def template(vectors: dict[str, Any], algorithm: Algorithm, sequence: int = 1000) -> Indicium:
    """An unsigned indicium of the test meter for the algorithm, dated the verification day."""
    serial = SERIAL_BY_ALGORITHM[algorithm]
    today = verification_date(vectors)
    key = private_key(vectors, serial)
    return Indicium(
        algorithm=algorithm,
        authorization_id=AUTHORIZATION_ID,
        vendor_model="PM01",
        device_serial=serial,
        key_id=key_id(key.public_key()),
        sequence=sequence,
        ascending=100_000,
        descending=400_000,
        postage=730,
        rate_category=RateCategory.FIRST_CLASS_LETTER,
        date_of_mailing=today,
        time_of_issue=datetime(today.year, today.month, today.day, 8, 0, 0, tzinfo=UTC),
        origin_zip="94043",
        destination="62704123423",
        address_digest=address_digest(ADDRESS),
        software_id=101,
        flags=0,
        reference_sequence=0,
    )


def sign(indicium: Indicium, key: PrivateKeyTypes) -> bytes:
    """The indicium's bytes, signed as a meter would sign them."""
    message = indicium.signed_part()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32) + s.to_bytes(32)
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    elif isinstance(key, rsa.RSAPrivateKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        signature = key.sign(message, pss, hashes.SHA256())
    else:
        raise TypeError(type(key).__name__)
    return indicium.with_signature(signature).to_bytes()


def signed(vectors: dict[str, Any], algorithm: Algorithm, **changes: Any) -> bytes:
    """A fresh indicium of the test meter, with changes, signed by that meter's key."""
    indicium = dataclasses.replace(template(vectors, algorithm), **changes)
    return sign(indicium, private_key(vectors, indicium.device_serial))


def days(n: int) -> timedelta:
    return timedelta(days=n)


def sha256_of_vectors() -> str:
    return hashlib.sha256(VECTORS_PATH.read_bytes()).hexdigest()
