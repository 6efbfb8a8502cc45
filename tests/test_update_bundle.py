"""Update bundles and code-signing certificates: pure, with keys held by `cryptography`
(the device path, with the keys in tokens, is tests/test_update_psc.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.errors import CertificateError, InvalidInput, ProtocolError
from meter.pki.codesign import make_code_signing_certificate, verify_code_signing_certificate
from meter.pki.issue import make_provider_certificate, make_root_certificate
from meter.pki.trust import TrustStore
from meter.protocol.update_bundle import (
    BundleContents,
    Installed,
    UpdateBundle,
    parse_version,
    verify_update,
)
from meter.protocol.watchdog import COMMERCIAL, WatchdogThresholds
from meter.rates import default_table

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
AUTH_ID = 60001
INSTALLED = Installed(
    software_id=100, version="1.0.0", vendor_model="PM01", authorization_id=AUTH_ID
)


class Key:
    """An ECDSA P-256 key outside any token, signing as a token does (r || s)."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())

    @property
    def spki(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class Root:
    def __init__(self, name: str = "Postal Root (test)") -> None:
        self.key = Key()
        self.certificate = make_root_certificate(
            self.key.spki, self.key.sign, name, NOW - timedelta(days=1)
        )

    def code_signing(
        self, key: Key, *, at: datetime = NOW - timedelta(hours=1), days: int = 730
    ) -> x509.Certificate:
        return make_code_signing_certificate(
            key.spki, AUTH_ID, "Test Provider", self.certificate, self.key.sign, at, days
        )


@pytest.fixture(scope="module")
def root() -> Root:
    return Root()


@pytest.fixture(scope="module")
def signer() -> Key:
    return Key()


def contents(**changes: object) -> BundleContents:
    base = BundleContents(
        software_id=101,
        vendor_model="PM01",
        version="1.1.0",
        issued_at=NOW,
        rates=default_table(),
        watchdog=COMMERCIAL,
        revocations=((123456789012, "2026-11-30T00:00:00+00:00"),),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def signed(root: Root, signer: Key, **changes: object) -> UpdateBundle:
    return contents(**changes).signed_by(signer.sign, root.code_signing(signer))


def test_a_signed_bundle_round_trips_and_verifies(root: Root, signer: Key) -> None:
    bundle = signed(root, signer)
    again = UpdateBundle.from_bytes(bundle.to_bytes())
    assert again == bundle and again.to_bytes() == bundle.to_bytes()
    assert again.sha256 == bundle.sha256 and len(bundle.sha256) == 64
    verify_update(again, root.certificate, NOW, INSTALLED)
    assert again.contents.rates == default_table()
    assert again.contents.watchdog == WatchdogThresholds(90, 120)
    assert again.contents.revoked_at(123456789012) == datetime(2026, 11, 30, tzinfo=UTC)
    assert again.contents.revoked_at(1) is None
    # The canonical document fits the device's request limit (64 KiB) with room to spare.
    assert len(bundle.to_bytes()) < 20_000


def test_an_unsigned_bundle_is_refused(root: Root, signer: Key) -> None:
    body = json.loads(signed(root, signer).to_bytes())["body"]
    with pytest.raises(ProtocolError, match="not signed"):
        UpdateBundle.from_bytes(json.dumps({"body": body}).encode())
    document = json.loads(signed(root, signer).to_bytes())
    document["signature"] = ""
    with pytest.raises(ProtocolError, match="not signed"):
        UpdateBundle.from_bytes(json.dumps(document).encode())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("body", "version"), "9.9.9"),
        (("body", "software_id"), 999),
        (("body", "watchdog", "stop_days"), 3650),
        (("body", "rates", "categories", "first-class-letter", "prices", 0), 1),
        (("body", "rates", "zones", "origins", "940", 0, 2), 1),
        (("body", "revocations"), []),
    ],
)
def test_an_altered_bundle_fails_its_signature(
    root: Root, signer: Key, path: tuple[object, ...], value: object
) -> None:
    document = json.loads(signed(root, signer).to_bytes())
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    altered = UpdateBundle.from_bytes(json.dumps(document).encode())
    with pytest.raises(ProtocolError, match="signature does not verify"):
        verify_update(altered, root.certificate, NOW, INSTALLED)


def test_a_bundle_signed_by_another_key_than_its_certificate(root: Root, signer: Key) -> None:
    other = Key()
    bundle = contents().signed_by(other.sign, root.code_signing(signer))
    with pytest.raises(ProtocolError, match="signature does not verify"):
        verify_update(bundle, root.certificate, NOW, INSTALLED)


def test_a_bundle_from_another_root_is_refused(root: Root, signer: Key) -> None:
    other = Root("Postal Root (test)")  # the same name proves nothing
    bundle = contents().signed_by(signer.sign, other.code_signing(signer))
    with pytest.raises(CertificateError, match="not issued by this device's postal root"):
        verify_update(bundle, root.certificate, NOW, INSTALLED)


def test_an_expired_or_not_yet_valid_certificate_is_refused(root: Root, signer: Key) -> None:
    old = root.code_signing(signer, at=NOW - timedelta(days=40), days=30)
    with pytest.raises(CertificateError, match="is not valid at"):
        verify_update(contents().signed_by(signer.sign, old), root.certificate, NOW, INSTALLED)
    future = root.code_signing(signer, at=NOW + timedelta(days=1))
    with pytest.raises(CertificateError, match="is not valid at"):
        verify_update(contents().signed_by(signer.sign, future), root.certificate, NOW, INSTALLED)


def test_a_certificate_without_code_signing_usage_is_refused(root: Root, signer: Key) -> None:
    # A provider's certificate, from the same root, carries no codeSigning usage (and ca=True).
    provider = make_provider_certificate(
        signer.spki, AUTH_ID, "Test Provider", root.certificate, root.key.sign, NOW - timedelta(1)
    )
    bundle = contents().signed_by(signer.sign, provider)
    with pytest.raises(CertificateError, match="not a code-signing certificate"):
        verify_update(bundle, root.certificate, NOW, INSTALLED)
    # The right extensions, but the wrong usage: built by hand with serverAuth.
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, "60001")]))
        .issuer_name(root.certificate.subject)
        .public_key(signer.private.public_key())
        .serial_number(7)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=True)
    )
    from meter.pki.issue import _sign_builder

    wrong_eku = _sign_builder(builder, root.key.sign)
    with pytest.raises(CertificateError, match="extended key usage lacks codeSigning"):
        verify_code_signing_certificate(wrong_eku, root.certificate, NOW)


def test_another_providers_code_signing_key_is_refused(root: Root, signer: Key) -> None:
    other = make_code_signing_certificate(
        signer.spki, 60002, "Other Provider", root.certificate, root.key.sign, NOW - timedelta(1)
    )
    bundle = contents().signed_by(signer.sign, other)
    with pytest.raises(CertificateError, match="authorized by provider 60001"):
        verify_update(bundle, root.certificate, NOW, INSTALLED)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"version": "1.0.0"}, "not newer than the installed 1.0.0"),  # the same version
        ({"version": "0.9.9"}, "not newer than the installed 1.0.0"),  # a downgrade
        ({"software_id": 100}, "software id 100 is not above"),
        ({"software_id": 99, "version": "2.0.0"}, "software id 99 is not above"),
        ({"vendor_model": "XX99"}, "software for XX99 meters"),
    ],
)
def test_downgrades_replays_and_other_lineages_are_refused(
    root: Root, signer: Key, changes: dict[str, object], words: str
) -> None:
    with pytest.raises(ProtocolError, match=words):
        verify_update(signed(root, signer, **changes), root.certificate, NOW, INSTALLED)


def test_versions_compare_as_numbers_and_odd_ones_are_refused() -> None:
    assert parse_version("1.10.0") > parse_version("1.9.9")
    for text in ("1.0", "1.0.0.0", "01.0.0", "v1.0.0", "1.0.0 ", "12345.0.0"):
        with pytest.raises(InvalidInput, match=r"MAJOR\.MINOR\.PATCH"):
            parse_version(text)


def test_a_malformed_document_is_refused_by_name(root: Root, signer: Key) -> None:
    good = json.loads(signed(root, signer).to_bytes())
    cases: list[tuple[bytes, str]] = [
        (b"[1]", "is a JSON object"),
        (b"{", "not JSON"),
        (json.dumps({**good, "extra": 1}).encode(), "unknown members ['extra']"),
        (json.dumps({**good, "certificate": "nope"}).encode(), "not a PEM certificate"),
        (json.dumps({**good, "signature": "00" * 10}).encode(), "64 bytes"),
        (b" " * 50_000, "more than"),
    ]
    body = dict(good["body"], software_id=70000)
    cases.append((json.dumps({**good, "body": body}).encode(), "fit in 2 bytes"))
    body = dict(good["body"], watchdog={"warn_days": 200, "stop_days": 100})
    cases.append((json.dumps({**good, "body": body}).encode(), "body.watchdog"))
    body = dict(good["body"], revocations=[{"device_serial": -1, "revoked_at": "x"}])
    cases.append((json.dumps({**good, "body": body}).encode(), "device_serial -1"))
    body = dict(good["body"], rates={"format": "x"})
    cases.append((json.dumps({**good, "body": body}).encode(), "body.rates"))
    text = json.dumps(good).replace('"software_id": 101', '"software_id": 101.5')
    cases.append((text.encode(), "has a fraction"))
    for data, words in cases:
        with pytest.raises((InvalidInput, CertificateError, ProtocolError)) as caught:
            UpdateBundle.from_bytes(data, "b.json")
        assert words in str(caught.value), (words, str(caught.value))


def test_a_code_signing_certificate_never_counts_as_a_meter_credential(
    root: Root, signer: Key
) -> None:
    cert = root.code_signing(signer)
    assert verify_code_signing_certificate(cert, root.certificate, NOW) == AUTH_ID
    store = TrustStore(root.certificate, [cert])
    assert store.credentials == ()
