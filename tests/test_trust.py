"""Trust store (chains to the postal root) and revocation lists."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import _vectors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meter.errors import CertificateError
from meter.indicium import decode, key_id
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore

VECTORS = _vectors.load()
BY_NAME = {v["name"]: v for v in VECTORS["vectors"]}
START = datetime(2024, 1, 1, tzinfo=UTC)
END = datetime(2036, 1, 1, tzinfo=UTC)


def key_id_of(name: str) -> bytes:
    return decode(bytes.fromhex(BY_NAME[name]["indicium_hex"])).key_id


def name(common: str, serial: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if serial is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attributes)


class Party:
    """A key and its certificate, made here with cryptography's builder."""

    def __init__(
        self,
        subject: x509.Name,
        issuer: Party | None,
        ca: bool | None,
        not_before: datetime = START,
        not_after: datetime = END,
        key: ec.EllipticCurvePrivateKey | None = None,
        issuer_name: x509.Name | None = None,
    ) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name or (issuer.certificate.subject if issuer else subject))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        if ca is not None:
            builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        signer = issuer.key if issuer else self.key
        self.certificate = builder.sign(signer, hashes.SHA256())

    @property
    def key_id(self) -> bytes:
        return key_id(self.key.public_key())

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def pems(*parties: Party) -> bytes:
    return b"".join(p.pem() for p in parties)


@pytest.fixture(scope="module")
def root() -> Party:
    return Party(name("Test Root"), None, ca=True)


@pytest.fixture(scope="module")
def provider(root: Party) -> Party:
    return Party(name("Provider", "77"), root, ca=True)


def test_vector_certificates() -> None:
    store = _vectors.trust_store(VECTORS)
    for vector, serial in (
        ("ecdsa-valid", _vectors.ECDSA_SERIAL),
        ("ed25519-valid", _vectors.ED25519_SERIAL),
        ("rsa-pss-valid", _vectors.RSA_SERIAL),
    ):
        (credential,) = store.candidates(key_id_of(vector))
        assert credential.device_serial == serial
        assert credential.authorization_id == _vectors.AUTHORIZATION_ID
        assert credential.key_id == key_id_of(vector)
        assert credential.root == store.root
        assert (
            credential.verifying_key.algorithm
            == decode(bytes.fromhex(BY_NAME[vector]["indicium_hex"])).algorithm
        )
    assert store.candidates(key_id_of("chain-by-name-only")) == ()
    assert store.candidates(key_id_of("unknown-key")) == ()
    assert len(store.credentials) == 5
    (lapsing,) = store.candidates(key_id_of("certificate-lapsed"))
    assert lapsing.valid_from == START
    assert lapsing.valid_until == datetime(2026, 6, 30, tzinfo=UTC)
    assert lapsing.valid_at(lapsing.valid_until) and lapsing.valid_at(START)
    assert not lapsing.valid_at(datetime(2026, 6, 30, 0, 0, 1, tzinfo=UTC))


def test_order_of_the_bundle_does_not_matter() -> None:
    root_pem, _ = _vectors.certificates_pem(VECTORS)
    certs = VECTORS["certificates"]
    backwards = "".join(reversed(certs["providers"] + certs["meters"])).encode()
    store = TrustStore.from_pem(root_pem, backwards)
    assert len(store.credentials) == 5
    assert store.candidates(key_id_of("chain-by-name-only")) == ()


def test_names_alone_prove_nothing(root: Party, provider: Party) -> None:
    other_root = Party(name("Test Root"), None, ca=True)
    impostor = Party(provider.certificate.subject, other_root, ca=True)
    meter = Party(name("meter", "5"), impostor, ca=False)
    store = TrustStore(
        root.certificate, [provider.certificate, impostor.certificate, meter.certificate]
    )
    assert store.candidates(meter.key_id) == ()
    # Signed by the real provider's key under the real provider's name: it counts,
    # whichever same-named provider comes first in the bundle.
    genuine = Party(name("meter", "6"), provider, ca=False)
    for order in ([impostor, provider, genuine], [genuine, provider, impostor]):
        store = TrustStore(root.certificate, [p.certificate for p in order])
        (credential,) = store.candidates(genuine.key_id)
        assert credential.provider == provider.certificate
        assert credential.device_serial == 6 and credential.authorization_id == 77


def test_issuer_name_must_match_too(root: Party, provider: Party) -> None:
    meter = Party(name("meter", "5"), provider, ca=False, issuer_name=name("Somebody", "77"))
    store = TrustStore(root.certificate, [provider.certificate, meter.certificate])
    assert store.candidates(meter.key_id) == ()


@pytest.mark.parametrize(
    ("provider_ca", "meter_ca"), [(False, False), (None, False), (True, True), (True, None)]
)
def test_basic_constraints(root: Party, provider_ca: bool | None, meter_ca: bool | None) -> None:
    provider = Party(name("Provider", "77"), root, ca=provider_ca)
    meter = Party(name("meter", "5"), provider, ca=meter_ca)
    store = TrustStore(root.certificate, [provider.certificate, meter.certificate])
    assert store.candidates(meter.key_id) == ()


def test_the_root_is_not_a_provider(root: Party) -> None:
    meter = Party(name("meter", "5"), root, ca=False)
    store = TrustStore(root.certificate, [root.certificate, meter.certificate])
    assert store.candidates(meter.key_id) == ()


def test_several_certificates_for_one_key_keep_their_order(root: Party, provider: Party) -> None:
    first = Party(name("meter", "5"), provider, ca=False)
    second = Party(name("meter", "6"), provider, ca=False, key=first.key)
    stranger = Party(
        name("meter", "7"), Party(name("Provider", "77"), None, ca=True), ca=False, key=first.key
    )
    bundle = [stranger, second, provider, first, second]
    store = TrustStore(root.certificate, [p.certificate for p in bundle])
    assert [c.device_serial for c in store.candidates(first.key_id)] == [6, 5]


def test_validity_is_the_intersection_of_the_chain(root: Party) -> None:
    provider = Party(
        name("Provider", "77"), root, ca=True, not_after=datetime(2030, 1, 1, tzinfo=UTC)
    )
    meter = Party(
        name("meter", "5"), provider, ca=False, not_before=datetime(2025, 1, 1, tzinfo=UTC)
    )
    (credential,) = TrustStore(
        root.certificate, [provider.certificate, meter.certificate]
    ).candidates(meter.key_id)
    assert credential.valid_from == datetime(2025, 1, 1, tzinfo=UTC)
    assert credential.valid_until == datetime(2030, 1, 1, tzinfo=UTC)


def test_root_must_be_a_self_signed_ca(root: Party) -> None:
    with pytest.raises(CertificateError, match="lacks basic constraints ca=True"):
        TrustStore(Party(name("Root"), None, ca=False).certificate, [])
    with pytest.raises(CertificateError, match="lacks basic constraints"):
        TrustStore(Party(name("Root"), None, ca=None).certificate, [])
    with pytest.raises(CertificateError, match="not self-signed"):
        TrustStore(Party(name("Sub"), root, ca=True).certificate, [])
    with pytest.raises(CertificateError, match="holds 2 certificates"):
        TrustStore.from_pem(pems(root, root), b"")
    with pytest.raises(CertificateError, match="holds 0 certificates"):
        TrustStore.from_pem(b"", b"")


def test_unreadable_pem_is_named(root: Party, provider: Party) -> None:
    good = provider.pem()
    broken = good.replace(good.splitlines()[3], b"A" * 64)
    with pytest.raises(CertificateError, match="certificates PEM: certificate 2 is unreadable"):
        TrustStore.from_pem(root.pem(), good + broken)
    key_pem = provider.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(CertificateError, match="PEM block 2 is a PRIVATE KEY") as caught:
        TrustStore.from_pem(root.pem(), good + key_pem)
    assert key_pem.splitlines()[1].decode() not in str(caught.value)  # no key material
    with pytest.raises(CertificateError, match="no PEM certificate"):
        TrustStore.from_pem(root.pem(), b"hello")
    assert TrustStore.from_pem(root.pem(), b"").credentials == ()


def test_serial_number_must_be_decimal_when_the_chain_reaches_the_root(
    root: Party, provider: Party
) -> None:
    for bad in ("abc", "12a", "+5", " 5", ""):
        meter = Party(name("meter", bad), provider, ca=False)
        with pytest.raises(CertificateError, match="serialNumber"):
            TrustStore(root.certificate, [provider.certificate, meter.certificate])
    no_serial = Party(name("meter"), provider, ca=False)
    with pytest.raises(CertificateError, match="serialNumber"):
        TrustStore(root.certificate, [provider.certificate, no_serial.certificate])
    # A certificate that does not reach the root is not judged at all.
    orphan = Party(name("meter", "abc"), Party(name("Other"), None, ca=True), ca=False)
    assert TrustStore(root.certificate, [orphan.certificate]).credentials == ()


def test_from_files(tmp_path: Path, root: Party, provider: Party) -> None:
    meter = Party(name("meter", "5"), provider, ca=False)
    (tmp_path / "root.pem").write_bytes(root.pem())
    (tmp_path / "provider.pem").write_bytes(provider.pem())
    (tmp_path / "meter.pem").write_bytes(meter.pem())
    (tmp_path / "all.pem").write_bytes(pems(meter, provider))
    split = TrustStore.from_files(
        tmp_path / "root.pem", [tmp_path / "meter.pem", tmp_path / "provider.pem"]
    )
    joined = TrustStore.from_files(tmp_path / "root.pem", tmp_path / "all.pem")
    assert split.candidates(meter.key_id) == joined.candidates(meter.key_id) != ()
    with pytest.raises(CertificateError, match=r"missing\.pem"):
        TrustStore.from_files(tmp_path / "missing.pem", tmp_path / "all.pem")
    (tmp_path / "bad.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertificateError, match=r"bad\.pem: certificate 1 is unreadable"):
        TrustStore.from_files(tmp_path / "root.pem", tmp_path / "bad.pem")


def test_revocations_from_vectors() -> None:
    revocations = _vectors.revocations(VECTORS)
    assert revocations.revoked_at(_vectors.REVOKED_SERIAL) == datetime(2026, 11, 1, tzinfo=UTC)
    assert revocations.revoked_at(_vectors.ECDSA_SERIAL) is None
    assert len(revocations) == 1
    assert Revocations.empty().revoked_at(_vectors.REVOKED_SERIAL) is None


def test_revocations_keep_the_earliest_instant(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    path.write_text(
        json.dumps(
            [
                {"device_serial": 7, "revoked_at": "2026-11-02T00:00:00Z"},
                {"device_serial": 7, "revoked_at": "2026-11-01T12:00:00-05:00"},
                {"device_serial": 8, "revoked_at": "2026-11-03T00:00:00+00:00"},
            ]
        )
    )
    revocations = Revocations.from_file(path)
    assert revocations.revoked_at(7) == datetime(2026, 11, 1, 17, tzinfo=UTC)
    assert revocations.revoked_at(8) == datetime(2026, 11, 3, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ('{"device_serial": 1}', "must be a JSON list"),
        ("[1]", "entry 1: must be an object"),
        ('[{"device_serial": 1}]', "entry 1: must be an object with exactly"),
        ('[{"device_serial": 1, "revoked_at": "2026-11-01T00:00:00Z", "why": "x"}]', "exactly"),
        ('[{"device_serial": "1", "revoked_at": "2026-11-01T00:00:00Z"}]', "device_serial '1'"),
        ('[{"device_serial": true, "revoked_at": "2026-11-01T00:00:00Z"}]', "device_serial True"),
        ('[{"device_serial": -1, "revoked_at": "2026-11-01T00:00:00Z"}]', "device_serial -1"),
        ('[{"device_serial": 1, "revoked_at": "2026-11-01T00:00:00"}]', "no UTC offset"),
        ('[{"device_serial": 1, "revoked_at": "yesterday"}]', "not ISO-8601"),
        ('[{"device_serial": 1, "revoked_at": 1700000000}]', "not an ISO-8601 string"),
    ],
)
def test_revocations_refuse_anything_else(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        Revocations.from_json(text)
    path = tmp_path / "revoked.json"
    path.write_text(text)
    with pytest.raises(CertificateError, match=re.escape(str(path))):
        Revocations.from_file(path)


def test_revocations_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"nothing\.json"):
        Revocations.from_file(tmp_path / "nothing.json")
