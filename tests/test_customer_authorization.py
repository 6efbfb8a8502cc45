"""Authorize Customer as a provider-signed record: the format, and the meter that verifies it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.cli.home import Home
from meter.cli.main import cli
from meter.errors import AccessDenied, InvalidInput, MeterError, ProtocolError
from meter.pki.issue import make_provider_certificate, make_root_certificate
from meter.protocol.authorization import CustomerAuthorization
from meter.provider import Provider
from meter.psd.firmware import PSD
from tests.conftest import ROLE_USERS

METER = 983973031309  # the serial the test homes are provisioned with
NOW = datetime.now(UTC).replace(microsecond=0)


def software_signer() -> tuple[ec.EllipticCurvePrivateKey, Callable[[bytes], bytes]]:
    key = ec.generate_private_key(ec.SECP256R1())

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return key, sign


def spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def software_provider() -> tuple[x509.Certificate, Callable[[bytes], bytes]]:
    """A provider (authorization id 4711) of a root of its own, keys in software: pure tests."""
    root_key, root_sign = software_signer()
    root = make_root_certificate(spki(root_key), root_sign, "Test Root", NOW)
    key, sign = software_signer()
    return make_provider_certificate(spki(key), 4711, "Test Provider", root, root_sign, NOW), sign


# -- the record itself (no token) -----------------------------------------------------------


def test_record_round_trips_and_verifies(
    software_provider: tuple[x509.Certificate, Callable[[bytes], bytes]],
) -> None:
    cert, sign = software_provider
    record = CustomerAuthorization.issue(4711, METER, "ACME-1", NOW, sign)
    parsed = CustomerAuthorization.from_json(record.to_text(), "test")
    assert parsed == record
    parsed.verify(cert, METER, "test")
    assert json.loads(record.to_text())["format"] == "pim-customer-authorization-v1"


def test_altered_or_misdirected_records_fail_verification(
    software_provider: tuple[x509.Certificate, Callable[[bytes], bytes]],
) -> None:
    cert, sign = software_provider
    good = CustomerAuthorization.issue(4711, METER, "ACME-1", NOW, sign).to_json()
    altered = {**good, "customer": "ACME-2"}
    with pytest.raises(ProtocolError, match="does not verify"):
        CustomerAuthorization.from_json(altered, "t").verify(cert, METER, "t")
    later = {**good, "issued_at": (NOW + timedelta(seconds=1)).isoformat()}
    with pytest.raises(ProtocolError, match="does not verify"):
        CustomerAuthorization.from_json(later, "t").verify(cert, METER, "t")
    with pytest.raises(ProtocolError, match="this meter is"):
        CustomerAuthorization.from_json(good, "t").verify(cert, METER + 1, "t")
    _, forger = software_signer()
    forged = CustomerAuthorization.issue(4711, METER, "ACME-1", NOW, forger)
    with pytest.raises(ProtocolError, match="does not verify"):
        forged.verify(cert, METER, "t")
    other_id = CustomerAuthorization.issue(4712, METER, "ACME-1", NOW, sign)
    with pytest.raises(ProtocolError, match="this meter's provider is 4711"):
        other_id.verify(cert, METER, "t")


MALFORMED: dict[str, Any] = {
    "not JSON": "{not json",
    "a list": "[]",
    "the old free text": {"customer": "ACME-1"},
    "another format": {"format": "pim-credited-v1"},
    "a member missing": "drop:signature",
    "a member more": "add:extra",
    "serial zero": ("device_serial", 0),
    "serial as text": ("device_serial", str(METER)),
    "serial beyond 8 bytes": ("device_serial", 2**64),
    "a bad customer id": ("customer", "two words"),
    "an empty customer": ("customer", ""),
    "a naive time": ("issued_at", "2026-12-02T09:00:00"),
    "not a time": ("issued_at", "yesterday"),
    "a time in another spelling": ("issued_at", "2026-12-02T09:00:00Z"),
    "a short signature": ("signature", "00" * 63),
    "a signature not hex": ("signature", "zz" * 64),
    "authorization id zero": ("authorization_id", 0),
    "authorization id boolean": ("authorization_id", True),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_records_are_refused_by_member(
    software_provider: tuple[x509.Certificate, Callable[[bytes], bytes]], case: str
) -> None:
    _, sign = software_provider
    good = CustomerAuthorization.issue(4711, METER, "ACME-1", NOW, sign).to_json()
    spec = MALFORMED[case]
    data: Any
    if isinstance(spec, tuple):
        data = {**good, spec[0]: spec[1]}
    elif isinstance(spec, str) and spec.startswith("drop:"):
        data = {k: v for k, v in good.items() if k != spec[5:]}
    elif isinstance(spec, str) and spec.startswith("add:"):
        data = {**good, spec[4:]: 1}
    else:
        data = spec
    with pytest.raises(InvalidInput):
        CustomerAuthorization.from_json(data, "record")


# -- the meter verifies and keeps it ----------------------------------------------------------------


@pytest.fixture
def psd(device_home: Home) -> Iterator[PSD]:
    device = PSD.power_up(device_home.open_device_token(), device_home.device)
    device.logon(*ROLE_USERS["provider"])
    yield device
    device.power_down()


def home_provider_record(home: Home, customer: str, at: datetime, serial: int = METER) -> Any:
    """A record signed by the home's provider token (the one the meter pinned), no ledger."""
    with home.open_token("provider") as token:
        provider = Provider.open(token, home.ledger)
        return CustomerAuthorization.issue(
            provider.authorization_id, serial, customer, at, provider.signer()
        ).to_json()


def kept(psd: PSD) -> tuple[str | None, str | None]:
    state = psd._require_meter().state
    return state.customer, state.customer_authorization


def test_set_up_installed_a_signed_record(psd: PSD, device_home: Home) -> None:
    customer, text = kept(psd)
    assert customer == "DEMO-0001"
    assert text is not None
    record = CustomerAuthorization.from_json(text, "kept")
    with device_home.open_token("provider") as token:
        record.verify(Provider.open(token, device_home.ledger).certificate, METER, "kept")


def test_a_newer_record_replaces_the_customer(psd: PSD, device_home: Home) -> None:
    record = home_provider_record(device_home, "ACME-2", datetime.now(UTC) + timedelta(seconds=2))
    answer = psd.authorize_customer(record)
    assert answer["customer"] == "ACME-2"
    customer, text = kept(psd)
    assert customer == "ACME-2"
    assert text is not None and json.loads(text) == record


def _refusals(home: Home) -> dict[str, tuple[type[MeterError], str, Any]]:
    now = datetime.now(UTC)
    _, forger = software_signer()
    with home.open_token("provider") as token:
        auth_id = Provider.open(token, home.ledger).authorization_id
    good = home_provider_record(home, "ACME-3", now + timedelta(seconds=2))
    return {
        "signed by another key": (
            ProtocolError,
            "does not verify",
            CustomerAuthorization.issue(auth_id, METER, "ACME-3", now, forger).to_json(),
        ),
        "of another provider id": (
            ProtocolError,
            "this meter's provider",
            CustomerAuthorization.issue(auth_id + 1, METER, "ACME-3", now, forger).to_json(),
        ),
        "for another device": (
            ProtocolError,
            "this meter is",
            home_provider_record(home, "ACME-3", now + timedelta(seconds=2), METER + 1),
        ),
        "altered": (ProtocolError, "does not verify", {**good, "customer": "MALLORY"}),
        "older than the installed one": (
            ProtocolError,
            "older than the one installed",
            home_provider_record(home, "ACME-3", now - timedelta(hours=1)),
        ),
        "from the future": (
            ProtocolError,
            "in the future",
            home_provider_record(home, "ACME-3", now + timedelta(hours=3)),
        ),
        "the old free text": (InvalidInput, "format", {"customer": "ACME-3"}),
        "malformed text": (InvalidInput, "not JSON", "{"),
    }


def test_bad_records_change_nothing(psd: PSD, device_home: Home) -> None:
    before = kept(psd)
    for case, (kind, message, record) in _refusals(device_home).items():
        with pytest.raises(kind, match=message):
            psd.authorize_customer(record)
        assert kept(psd) == before, case


def test_only_the_provider_role_may_authorize(device_home: Home) -> None:
    record = home_provider_record(device_home, "ACME-4", datetime.now(UTC) + timedelta(seconds=2))
    device = PSD.power_up(device_home.open_device_token(), device_home.device)
    try:
        device.logon(*ROLE_USERS["customer"])
        before = kept(device)
        with pytest.raises(AccessDenied, match="Authorize Customer"):
            device.authorize_customer(record)
        assert kept(device) == before
    finally:
        device.power_down()


def test_the_cli_installs_a_record_from_the_provider(running: Home, tmp_path: Path) -> None:
    """`meter provider authorize-meter` writes the record; `meter authorize-customer FILE`
    gives it to the running device; a record for another meter is refused."""
    home = running
    env = {"METER_PASSWORD": ROLE_USERS["provider"][1]}

    def run(*args: str, ok: bool = True, user: bool = False) -> dict[str, Any]:
        who = ["--user", "provider"] if user else []
        result = CliRunner().invoke(
            cli, ["--home", str(home.path), "--json", *who, *args], obj={}, env=env
        )
        assert (result.exit_code == 0) is ok, result.output
        return dict(json.loads(result.output.splitlines()[-1]))

    run("provider", "add-customer", "ACME-5", "Acme Five")
    # The set-up authorized this meter to DEMO-0001: the ledger refuses another customer.
    refused = run(
        "provider", "authorize-meter", "ACME-5", str(METER), "--out", str(tmp_path / "x"), ok=False
    )
    assert "another customer" in refused["message"]
    out = tmp_path / "auth.json"
    run("provider", "authorize-meter", "DEMO-0001", str(METER), "--out", str(out))
    assert run("authorize-customer", str(out), user=True)["customer"] == "DEMO-0001"
    other = tmp_path / "other.json"
    run("provider", "authorize-meter", "ACME-5", "4242", "--out", str(other))
    refused = run("authorize-customer", str(other), user=True, ok=False)
    assert "this meter is" in refused["message"]
