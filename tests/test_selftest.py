"""Power-up and on-demand self-tests on SoftHSM2: KATs, PIM-1 vectors, pairwise, register MAC;
public sessions and login/logout of the token."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meter.cli.home import Home
from meter.errors import AccessDenied, AuthenticationFailed, RegisterCorrupt, TokenError
from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.identity import IDENTITY_APPLICATION
from meter.psd.register_store import MAC_KEY_LABEL, RegisterStore
from meter.psd.selftest import (
    Pim1Vector,
    SelfTestReport,
    check_pim1_vectors,
    load_pim1_vectors,
    pairwise_consistency,
    run_self_tests,
)
from meter.token import KeyAlgorithm, Token, run_token_kats, token_dir
from tests.conftest import TEST_METER_PINS, open_meter_token

AT = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
TOKEN_KATS = ["sha-256", "hmac-sha-256", "aes-gcm", "aes-key-wrap", "aes-key-wrap-pad"]
USER_PIN = TEST_METER_PINS["user_pin"]  # the lab PIN conftest provisions with


def open_public(home: Home) -> Token:
    return Token.open(home.module(), home.token_label("meter"), None, lock_dir=home.path / "locks")


def full_self_tests(token: Token, meter: Meter, certified_spki: bytes) -> SelfTestReport:
    serial = meter.identity.device_serial
    return run_self_tests(
        token,
        signing_label=SIGNING_KEY_LABEL,
        algorithm=meter.identity.algorithm,
        public_key_spki=certified_spki,
        register_check=lambda: RegisterStore.open(token, serial),
        at=AT,
    )


@pytest.fixture
def user_token(provisioned: Home) -> Iterator[Token]:
    with open_meter_token(provisioned) as token:
        yield token


def token_files(home: Home) -> list[Path]:
    return sorted(p for p in token_dir(home.path).rglob("*") if p.is_file())


# -- healthy meter ---------------------------------------------------------


def test_public_session_runs_token_and_pim1_kats_and_leaves_nothing(provisioned: Home) -> None:
    before = token_files(provisioned)
    with open_public(provisioned) as token:
        assert token.login_state is None
        report = run_self_tests(
            token,
            signing_label=None,
            algorithm=None,
            public_key_spki=None,
            register_check=None,
            at=AT,
        )
    assert report.passed, report.failures()
    assert [r.name for r in report.results] == [*TOKEN_KATS, "pim1-kat"]
    assert report.failures() == []
    assert token_files(provisioned) == before  # every KAT key was a session object


def test_user_session_runs_every_test(user_token: Token) -> None:
    meter = Meter.open(user_token)
    report = full_self_tests(user_token, meter, meter.public_key_spki)
    assert report.passed, report.failures()
    assert [r.name for r in report.results] == [
        *TOKEN_KATS,
        "pim1-kat",
        "pairwise-ecdsa-p256",
        "register-mac",
    ]
    as_json = report.to_json()
    assert as_json["passed"] is True
    assert as_json["at"] == AT.isoformat()
    results = as_json["results"]
    assert isinstance(results, list)
    assert {"name": "aes-gcm", "passed": True, "detail": report.results[2].detail} in results


def test_token_kats_name_their_published_vectors(user_token: Token) -> None:
    details = {r.name: r.detail for r in run_token_kats(user_token)}
    assert "FIPS 180-4" in details["sha-256"]
    assert "RFC 4231" in details["hmac-sha-256"]
    assert "altered tag refused" in details["aes-gcm"]
    assert "RFC 3394" in details["aes-key-wrap"]
    assert "RFC 5649" in details["aes-key-wrap-pad"]


# -- failures: the error state's triggers ------------------------------------


def test_swapped_signing_key_fails_pairwise(user_token: Token) -> None:
    meter = Meter.open(user_token)
    certified = meter.public_key_spki
    user_token.destroy_key(SIGNING_KEY_LABEL)
    new_spki = user_token.generate_signing_keypair(SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256)
    assert new_spki != certified
    report = full_self_tests(user_token, meter, certified)
    assert not report.passed
    [failure] = report.failures()
    assert failure.name == "pairwise-ecdsa-p256"
    assert "not the certified one" in failure.detail
    # The token's own (new) key is consistent: only the certified key catches the swap.
    assert pairwise_consistency(
        user_token, SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, new_spki
    ).passed


def test_pairwise_with_a_key_of_the_wrong_algorithm_fails(user_token: Token) -> None:
    spki = Meter.open(user_token).public_key_spki
    result = pairwise_consistency(user_token, SIGNING_KEY_LABEL, KeyAlgorithm.ED25519, spki)
    assert (result.name, result.passed) == ("pairwise-ed25519", False)
    assert "not a ed25519 key" in result.detail
    missing = pairwise_consistency(user_token, SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, None)
    assert not missing.passed


def test_corrupted_register_mac_key_fails_register_check(user_token: Token) -> None:
    meter = Meter.open(user_token)
    user_token.destroy_key(MAC_KEY_LABEL)
    user_token.generate_hmac_key(MAC_KEY_LABEL)
    report = full_self_tests(user_token, meter, meter.public_key_spki)
    assert not report.passed
    [failure] = report.failures()
    assert failure.name == "register-mac"
    assert "valid MAC" in failure.detail
    with pytest.raises(RegisterCorrupt):
        RegisterStore.open(user_token, meter.identity.device_serial)


def test_a_failing_register_check_is_reported_not_raised(user_token: Token) -> None:
    def broken() -> None:
        raise RegisterCorrupt("register record generation 7 does not verify")

    report = run_self_tests(
        user_token,
        signing_label=None,
        algorithm=None,
        public_key_spki=None,
        register_check=broken,
        at=AT,
    )
    assert [r.name for r in report.failures()] == ["register-mac"]
    assert report.failures()[0].detail == "register record generation 7 does not verify"


def test_token_kats_on_a_closed_token_fail_without_raising(provisioned: Home) -> None:
    token = open_public(provisioned)
    token.close()
    results = run_token_kats(token)
    assert [r.name for r in results] == TOKEN_KATS
    assert all(not r.passed and "session is closed" in r.detail for r in results)


# -- PIM-1 vectors (pure) ----------------------------------------------------


def test_packaged_pim1_vectors_pass_and_cover_every_algorithm() -> None:
    vectors = load_pim1_vectors()
    valid = {v.indicium[1] for v in vectors if v.verdict == "VALID"}
    assert valid == {1, 2, 3}  # ECDSA P-256, Ed25519, RSA-PSS
    assert any(v.verdict == "FORGED" for v in vectors)
    result = check_pim1_vectors(vectors)
    assert result.passed, result.detail
    assert result.name == "pim1-kat"


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize("which", ["ecdsa-valid", "ed25519-valid", "rsa-pss-valid"])
def test_a_tampered_valid_vector_fails(which: str) -> None:
    vectors = load_pim1_vectors()
    tampered = [
        dataclasses.replace(v, indicium=_flip(v.indicium, len(v.indicium) - 1))
        if v.name == which
        else v
        for v in vectors
    ]
    result = check_pim1_vectors(tampered)
    assert not result.passed
    assert result.detail == f"vector '{which}': expected VALID got FORGED"


def test_a_forged_vector_that_verifies_fails() -> None:
    vectors = load_pim1_vectors()
    valid = next(v for v in vectors if v.name == "ecdsa-valid")
    result = check_pim1_vectors([*vectors, dataclasses.replace(valid, verdict="FORGED")])
    assert not result.passed
    assert "expected FORGED got VALID" in result.detail


def test_wrong_expected_fields_or_malformed_bytes_fail() -> None:
    vectors = load_pim1_vectors()
    first = vectors[0]
    assert first.fields is not None
    other_fields = Pim1Vector(
        first.name,
        first.verdict,
        first.indicium,
        first.public_key_spki,
        {**first.fields, "postage": first.fields["postage"] + 1},
    )
    result = check_pim1_vectors([other_fields])
    assert not result.passed and "postage" in result.detail
    truncated = dataclasses.replace(first, indicium=first.indicium[:-1])
    result = check_pim1_vectors([truncated])
    assert not result.passed and "does not decode" in result.detail
    assert not check_pim1_vectors([]).passed


# -- public sessions, login and logout -----------------------------------------


def test_public_session_opens_without_pin_and_cannot_sign(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        spki = token.public_key_spki(SIGNING_KEY_LABEL)
    with open_public(provisioned) as token:
        # Without the PIN nothing of the device shows, not even a public key's half.
        assert not token.has_key(SIGNING_KEY_LABEL)
        assert token.data_objects(IDENTITY_APPLICATION) == []
        with pytest.raises(AccessDenied, match="no user is logged in; sign with key"):
            token.sign(SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, b"message")
        with pytest.raises(AccessDenied, match="HMAC with key"):
            token.hmac(MAC_KEY_LABEL, b"body")
        result = pairwise_consistency(token, SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, spki)
        assert not result.passed and "no user is logged in" in result.detail


def test_login_logout_round_trip(provisioned: Home) -> None:
    pin = USER_PIN
    with open_public(provisioned) as token:
        token.login(pin)
        spki = token.public_key_spki(SIGNING_KEY_LABEL)
        assert token.login_state == "user"
        assert len(token.data_objects(IDENTITY_APPLICATION)) == 1
        assert pairwise_consistency(token, SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, spki).passed
        with pytest.raises(TokenError, match="already logged in as user"):
            token.login(pin)
        token.logout()
        assert token.login_state is None
        assert token.data_objects(IDENTITY_APPLICATION) == []
        with pytest.raises(AccessDenied):
            token.sign(SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, b"message")
        assert all(r.passed for r in run_token_kats(token))  # still usable in public
        token.logout()  # idempotent
        token.login(pin)
        assert Meter.open(token).public_key_spki == spki
    # The process lock went with close: the token opens again.
    with open_public(provisioned) as again:
        assert again.login_state is None


def test_wrong_pin_is_refused_without_the_pin_in_the_message(provisioned: Home) -> None:
    wrong = "not-the-pin-" + USER_PIN
    with open_public(provisioned) as token:
        with pytest.raises(AuthenticationFailed, match="wrong PIN") as caught:
            token.login(wrong)
        assert wrong not in str(caught.value)
        assert USER_PIN not in str(caught.value)
        assert token.login_state is None  # still a usable public session
        assert all(r.passed for r in run_token_kats(token))
        token.login(USER_PIN)
        assert token.login_state == "user" and token.has_key(SIGNING_KEY_LABEL)


def test_an_so_session_needs_a_pin(provisioned: Home) -> None:
    with pytest.raises(TokenError, match="an SO session needs a PIN"):
        Token.open(
            provisioned.module(),
            provisioned.token_label("meter"),
            None,
            lock_dir=provisioned.path / "locks",
            so=True,
        )


def test_a_user_session_logs_out_and_in_again_and_as_so(user_token: Token) -> None:
    user_token.logout()
    assert user_token.login_state is None
    assert user_token.data_objects(IDENTITY_APPLICATION) == []
    user_token.login(TEST_METER_PINS["so_pin"], so=True)
    assert user_token.login_state == "so"
    with pytest.raises(AccessDenied, match="the SO is logged in; sign with key"):
        user_token.sign(SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256, b"message")
    user_token.logout()
    user_token.login(USER_PIN)
    meter = Meter.open(user_token)
    assert full_self_tests(user_token, meter, meter.public_key_spki).passed
