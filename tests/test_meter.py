"""The meter end to end on SoftHSM2: provisioning, credit, issuing, and checks on bad input."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from meter.cli import provision
from meter.cli.home import Home
from meter.errors import (
    AuthenticationFailed,
    ConfigurationError,
    InsufficientFunds,
    InvalidInput,
    ProtocolError,
    RegisterCorrupt,
    TokenError,
    TokenUnavailable,
)
from meter.indicium import RateCategory, address_digest, decode, key_id, verify_signature
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import MemoryReplayStore, Verdict, Verifier
from meter.provider import Provider
from meter.psd import IssueRequest, Meter
from meter.psd.register_store import MAC_KEY_LABEL
from meter.token import KeyAlgorithm
from tests import _direct as direct
from tests.conftest import TEST_METER_PINS, open_meter_token

ADDRESS = ["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"]


def request(**changes: object) -> IssueRequest:
    base = IssueRequest(
        postage=730,
        rate_category=RateCategory.FIRST_CLASS_LETTER,
        origin_zip="94043",
        destination_zip="62704",
        destination_plus4="1234",
        delivery_point="23",
        address=ADDRESS,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def verifier_for(home: Home, today: date | None = None) -> Verifier:
    trust = TrustStore.from_files(
        home.certs / "postal-root.pem", [home.certs / "provider.pem", home.certs / "meter.pem"]
    )
    return Verifier(
        trust, Revocations.empty(), MemoryReplayStore(), today or datetime.now(UTC).date()
    )


def test_private_and_secret_keys_are_sensitive_and_leave_only_under_a_trusted_key(
    provisioned: Home,
) -> None:
    from meter.token import wrapping

    with open_meter_token(provisioned) as token:
        for label, kind in (("indicium-signing", "private"), (MAC_KEY_LABEL, "secret")):
            attrs = token.key_attributes(label, kind)  # type: ignore[arg-type]
            # Extractable for the custodians' ceremonies, but CKA_WRAP_WITH_TRUSTED: the
            # token wraps them only under a key its SO marked trusted (tests/test_token_wrapping.py
            # shows the refusal under an untrusted one).
            assert attrs == {
                "sensitive": True,
                "extractable": True,
                "private": True,
                "token": True,
            }
            assert wrapping.describe_key(token, label, kind).wrap_with_trusted is True  # type: ignore[arg-type]
    for party, label in (("provider", "provider-signing"), ("postal-root", "postal-root-signing")):
        with provisioned.open_token(party) as token:
            assert token.key_attributes(label, "private")["extractable"] is False


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_issued_indicium_is_signed_in_the_token_and_verifies(
    home: Home, algorithm: KeyAlgorithm
) -> None:
    provision.init_home(
        home,
        provision.InitOptions(device_serial=555000111222, algorithm=algorithm),
        meter_pins=TEST_METER_PINS,
    )
    direct.credit(home, 50_000)
    issued = direct.issue(home, request())
    data = issued.to_bytes()
    assert len(data) == (340 if algorithm is KeyAlgorithm.RSA_PSS_2048 else 148)
    ind = decode(data)
    assert ind == issued
    assert (ind.sequence, ind.ascending, ind.descending, ind.postage) == (1, 730, 49_270, 730)
    assert ind.address_digest == address_digest(ADDRESS)
    assert ind.destination == "62704123423"
    with provisioned_meter(home) as meter:
        public = load_der_public_key(meter.public_key_spki)
        assert ind.key_id == key_id(public)  # type: ignore[arg-type]
        verify_signature(ind.algorithm, public, data[:84], ind.signature)  # type: ignore[arg-type]
    result = verifier_for(home).verify(data)
    assert result.verdict is Verdict.VALID, result.reason
    assert verifier_for(home).verify(data[:-1]).verdict is Verdict.MALFORMED


class provisioned_meter:
    def __init__(self, home: Home) -> None:
        self.token = open_meter_token(home)

    def __enter__(self) -> Meter:
        return Meter.open(self.token)

    def __exit__(self, *exc: object) -> None:
        self.token.close()


def registers_of(home: Home) -> tuple[int, int, int, int]:
    with provisioned_meter(home) as meter:
        r = meter.registers
        return (r.ascending, r.descending, r.control_total, r.sequence)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"postage": 0}, InvalidInput, "postage 0 mills"),
        ({"postage": 2_000_000}, InsufficientFunds, "exceeds the descending register"),
        ({"origin_zip": "9404"}, InvalidInput, "origin ZIP"),
        ({"origin_zip": "9404a"}, InvalidInput, "origin ZIP"),
        ({"destination_zip": "ABCDE"}, InvalidInput, "destination ZIP"),
        ({"destination_plus4": "12"}, InvalidInput, "ZIP\\+4"),
        (
            {"date_of_mailing": datetime.now(UTC).date() + timedelta(days=11)},
            InvalidInput,
            "advance-dating",
        ),
        (
            {"date_of_mailing": datetime.now(UTC).date() - timedelta(days=2)},
            InvalidInput,
            "before the meter's date",
        ),
        ({"specimen": True}, InvalidInput, "specimen"),
        ({"correction_of": 7}, InvalidInput, "correction refers to piece 7"),
    ],
)
def test_bad_requests_get_a_clear_error_and_change_nothing(
    provisioned: Home, changes: dict[str, object], error: type[Exception], message: str
) -> None:
    direct.credit(provisioned, 100_000)
    before = registers_of(provisioned)
    with pytest.raises(error, match=message):
        direct.issue(provisioned, request(**changes))
    assert registers_of(provisioned) == before
    assert not list(provisioned.labels.glob("*")) if provisioned.labels.exists() else True


def test_unknown_rate_category_is_refused() -> None:
    with pytest.raises(InvalidInput, match="first-class-letter"):
        RateCategory.parse("carrier-pigeon")


def test_advance_dating_up_to_the_limit_specimen_and_correction(provisioned: Home) -> None:
    direct.credit(provisioned, 10_000)
    v = verifier_for(provisioned)
    ahead = direct.issue(
        provisioned, request(date_of_mailing=datetime.now(UTC).date() + timedelta(days=10))
    )
    assert ahead.date_of_mailing - ahead.time_of_issue.date() == timedelta(days=10)
    assert v.verify(ahead.to_bytes()).verdict is Verdict.NOT_YET_VALID  # too early to mail
    specimen = direct.issue(provisioned, request(postage=0, specimen=True))
    assert specimen.is_specimen and specimen.postage == 0 and specimen.sequence == 2
    assert v.verify(specimen.to_bytes()).verdict is Verdict.SPECIMEN
    first = direct.issue(provisioned, request())
    fix = direct.issue(provisioned, request(postage=100, correction_of=first.sequence))
    assert fix.is_correction and fix.reference_sequence == first.sequence == fix.sequence - 1
    assert v.verify(fix.to_bytes()).verdict is Verdict.VALID
    assert registers_of(provisioned) == (730 + 730 + 100, 10_000 - 1_560, 10_000, 4)


def test_postage_cannot_exceed_the_descending_register(provisioned: Home) -> None:
    direct.credit(provisioned, 1_000)
    direct.issue(provisioned, request(postage=730))
    with pytest.raises(InsufficientFunds):
        direct.issue(provisioned, request(postage=271))
    direct.issue(provisioned, request(postage=270))
    assert registers_of(provisioned) == (1_000, 0, 1_000, 2)


def test_credit_grant_is_bound_to_nonce_device_and_provider_signature(provisioned: Home) -> None:
    now = datetime.now(UTC)
    with provisioned_meter(provisioned) as meter, provisioned.open_token("provider") as ptoken:
        provider = Provider.open(ptoken, provisioned.ledger)
        req = meter.request_credit()
        grant = provider.grant_credit(req, 5_000, now)
        altered = dataclasses.replace(grant, amount=500_000)
        with pytest.raises(ProtocolError, match="does not verify"):
            meter.apply_credit(altered)
        other = dataclasses.replace(grant, device_serial=1234)
        with pytest.raises(ProtocolError):
            meter.apply_credit(other)
        assert meter.registers.control_total == 0
        meter.apply_credit(grant)
        assert meter.registers.descending == 5_000
        with pytest.raises(ProtocolError, match="replayed"):
            meter.apply_credit(grant)
        with pytest.raises(ProtocolError, match="granted already"):
            provider.grant_credit(req, 5_000, now)
        # A grant for a newer request cannot be swapped for the old one.
        req2 = meter.request_credit()
        grant2 = provider.grant_credit(req2, 1_000, now)
        with pytest.raises(ProtocolError):
            meter.apply_credit(grant)
        meter.apply_credit(grant2)
        assert meter.registers.control_total == 6_000
        assert provider.credited(meter.identity.device_serial) == 6_000


def test_wrong_pin_missing_home_and_token_in_use(provisioned: Home, tmp_path: Path) -> None:
    with pytest.raises(AuthenticationFailed, match="wrong PIN"):
        provisioned.open_token("meter", pin="not-the-pin")
    with pytest.raises(ConfigurationError, match="not a meter home"):
        Home.at(tmp_path / "nowhere").open_token("meter", pin="x")
    with open_meter_token(provisioned), pytest.raises(TokenUnavailable, match="in use"):
        open_meter_token(provisioned)


def test_registers_survive_reopen_and_stale_records_are_cleaned(provisioned: Home) -> None:
    direct.credit(provisioned, 3_000)
    direct.issue(provisioned, request())
    with open_meter_token(provisioned) as token:
        from meter.psd.register_store import APPLICATION

        # The generation before the current one stays until the next commit ...
        records = token.data_objects(APPLICATION)
        assert len(records) == 2
        # ... and goes when the records are opened: only the newest valid one is kept.
        meter = Meter.open(token)
        assert meter.registers.sequence == 1
        assert len(token.data_objects(APPLICATION)) == 1
        meter.issue(request())
        meter.issue(request())
        assert len(token.data_objects(APPLICATION)) == 2
        # A crash between "create new" and "destroy old" leaves a damaged or older
        # record; on open the newest valid generation wins and the rest are removed.
        token.create_data(APPLICATION, "stale", records[0].value[:-1] + b"\x00")
        meter = Meter.open(token)
        assert meter.registers.sequence == 3
        assert len(token.data_objects(APPLICATION)) == 1


def test_the_meter_token_opens_only_with_a_pin_given_by_the_caller(provisioned: Home) -> None:
    # No environment variable holds the meter's PIN: outside provisioning only the
    # device (which unseals it from a user's slot) can open the token logged in.
    with pytest.raises(ConfigurationError, match="sealed in its users' slots"):
        provisioned.open_token("meter")


@pytest.mark.parametrize("what", ["objects", "everything"])
def test_a_corrupt_token_gives_a_clear_error(provisioned: Home, what: str) -> None:
    direct.credit(provisioned, 1_000)
    for path in (provisioned.path / "tokens").glob("*/*.object"):
        if what == "objects" and path.name == "token.object":
            continue
        path.write_bytes(bytes(reversed(path.read_bytes())))
    with (
        pytest.raises((TokenError, ConfigurationError, RegisterCorrupt), match="token 'meter'"),
        open_meter_token(provisioned) as token,
    ):
        Meter.open(token)


def test_a_moved_home_still_finds_its_own_tokens(provisioned: Home, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    provisioned.path.rename(moved)
    with open_meter_token(Home.at(moved)) as token:
        assert Meter.open(token).identity.device_serial == 983973031309
