"""The whole meter on both CI tokens: SoftHSM2 and openCryptoki's soft token (slot 3).

Each test runs once per profile of ``METER_PROFILES`` (the fixture parameter
``meter_profile``): the meter token on that profile, the development provider
and postal root on SoftHSM2 in the home's store. openCryptoki's token is
machine-wide: the fixtures remove every meter object from it before and after
each test (tests/conftest.py, ``wipe_meter_objects``), so these tests must not
run in parallel with each other. A test that needs a capability one token lacks
is skipped there, with the reason.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from meter.cli import provision
from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.main import cli
from meter.errors import ConfigurationError
from meter.psd.audit import audit_key_algorithm
from meter.psd.passwords import PasswordPolicy
from meter.psd.users import UserStore
from meter.token import KeyAlgorithm
from meter.token.slot_token import change_pins, find_slot, pin_length_range
from tests.conftest import (
    LAB_METER_PINS,
    ROLE_USERS,
    TEST_PASSWORDS,
    open_meter_token,
)

pytestmark = pytest.mark.softhsm


def run(home: Path, *args: str, ok: bool = True, role: str | None = None) -> dict[str, object]:
    """``meter --json ARGS``; with ``role``, logged on as that role's test user."""
    user: list[str] = []
    env = {}
    if role is not None:
        user_id, password = ROLE_USERS[role]
        user, env = ["--user", user_id], {"METER_PASSWORD": password}
    result = CliRunner().invoke(cli, ["--home", str(home), "--json", *user, *args], obj={}, env=env)
    assert (result.exit_code == 0) is ok, result.output
    return json.loads(result.output.splitlines()[-1]) if result.output else {}


def test_credit_issue_verify_and_audit(device_home_on: Home, tmp_path: Path) -> None:
    home = device_home_on
    profile = home.profile
    with open_meter_token(home) as token:
        # The signing key is the profile's algorithm, and it lives in the profile's token.
        assert token.key_attributes("indicium-signing", "private") == {
            "sensitive": True,
            # Only where the token can wrap it (under a trusted key): the key ceremonies.
            "extractable": "aes_key_wrap_pad" in profile.capabilities,
            "private": True,
            "token": True,
        }
    with running_device(home):
        status = run(home.path, "status", role="customer")
        assert status["module_state"] == "authorized", status
        run(home.path, "credit", "20.00", role="provider")
        issued = run(
            home.path,
            "issue",
            "--postage",
            "0.73",
            "--from-zip",
            "94043",
            "--to-zip",
            "62704",
            "--to",
            "Jane|1 Main St",
            role="customer",
        )
        verdict = run(home.path, "verify", "--image", str(issued["label_png"]))
        assert verdict["verdict"] == "VALID", verdict
        assert run(home.path, "verify", str(issued["indicium_hex"]), ok=False)["verdict"] == (
            "DUPLICATE"
        )
        psd = run(home.path, "psd-status", role="customer")
        assert (psd["piece_count"], psd["ascending"]) == (1, 730)
        export = tmp_path / "audit.json"
        key = tmp_path / "audit-key.pem"
        run(home.path, "audit", "save", str(export), role="auditor")
        run(home.path, "audit", "export-key", "--out", str(key), role="auditor")
    # Offline: the export verifies under the audit key alone, whatever its algorithm.
    report = run(home.path, "audit", "verify", str(export), "--key", str(key))
    assert report["ok"] is True and report["signed_through"] == report["records"], report
    from cryptography.hazmat.primitives import serialization

    expected = KeyAlgorithm.ECDSA_P256 if profile.can("raw_ecdsa") else KeyAlgorithm.RSA_PSS_2048
    assert audit_key_algorithm(serialization.load_pem_public_key(key.read_bytes())) is expected
    # One altered record breaks it.
    document = json.loads(export.read_text())
    document["records"][1]["values"]["tampered"] = True
    export.write_text(json.dumps(document))
    broken = run(home.path, "audit", "verify", str(export), "--key", str(key), ok=False)
    assert broken["ok"] is False and broken["first_bad"] == 2, broken


def test_the_signing_algorithm_is_the_profiles(provisioned_on: Home) -> None:
    home = provisioned_on
    with open_meter_token(home) as token:
        spki = token.public_key_spki("indicium-signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = serialization.load_der_public_key(spki)
    kinds = {
        KeyAlgorithm.ECDSA_P256: ec.EllipticCurvePublicKey,
        KeyAlgorithm.RSA_PSS_2048: rsa.RSAPublicKey,
    }
    assert isinstance(key, kinds[home.profile.signing_algorithm])
    # The home remembers its meter token's profile: later commands need no --profile.
    assert Home.at(home.path).profile.name == home.profile.name


def test_key_exchange(device_home_on: Home, meter_profile: str) -> None:
    home = device_home_on
    if not home.profile.can("ecdh_derive"):
        pytest.skip(f"profile {meter_profile} lacks ecdh_derive (CKM_ECDH1_DERIVE on P-256)")
    with running_device(home):
        first = run(home.path, "key-exchange", role="key-custodian")
        assert "public_key_pem" in first or first, first


def test_key_exchange_is_refused_naming_the_capability_and_profile(
    device_home_on: Home, meter_profile: str
) -> None:
    home = device_home_on
    if home.profile.can("ecdh_derive"):
        pytest.skip(f"profile {meter_profile} has ecdh_derive: nothing to refuse")
    with running_device(home):
        refused = run(home.path, "key-exchange", role="key-custodian", ok=False)
        message = str(refused["message"])
        assert "ecdh_derive" in message and f"HSM profile {meter_profile}" in message, refused
        # Nothing was made, and the refusal is in the audit log.
        rows = run(home.path, "audit", "view", role="auditor")["records"]
    assert any(
        r["service"] == "key-exchange" and r["outcome"] == "failed"
        for r in rows  # type: ignore[attr-defined]
    )
    with open_meter_token(home) as token:
        assert not token.has_key("key-exchange")


def test_a_second_meter_on_the_same_slot_token_is_refused(
    provisioned_on: Home, meter_profile: str, tmp_path: Path
) -> None:
    home = provisioned_on
    if home.meter_in_store:
        pytest.skip(f"profile {meter_profile} makes a token per home: no token to share")
    other = Home.at(tmp_path / "other", home.profile.source)
    other.device.mkdir(parents=True, mode=0o700)
    (other.device / "policy.toml").write_text((home.device / "policy.toml").read_text())
    with pytest.raises(ConfigurationError, match="carries a provisioned meter already"):
        provision.init_home(
            other,
            provision.InitOptions(device_serial=123456789012),
            meter_pins=LAB_METER_PINS[home.path],
        )
    assert not (other.device / "users.json").exists()  # refused before any user was made


def test_init_replaces_an_initialized_tokens_pins_by_random_ones_of_its_length(
    meter_home: Home, meter_profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = meter_home
    if home.meter_in_store:
        pytest.skip(f"profile {meter_profile} makes a new token: there are no PINs to replace")
    lab = LAB_METER_PINS[home.path]
    monkeypatch.setenv("METER_TOKEN_USER_PIN", lab["user_pin"])
    monkeypatch.setenv("METER_TOKEN_SO_PIN", lab["so_pin"])
    result = CliRunner().invoke(
        cli,
        ["--home", str(home.path), "--profile", str(home.profile.source), "--json", "init"],
        obj={},
    )
    module = home.meter_module()
    slot = find_slot(module, slot=home.profile.selection.slot, label=None)
    assert result.exit_code == 0, result.output
    # The new PINs are sealed in the Security Officer's slot (the lab's are gone).
    store = UserStore.open(home.device, PasswordPolicy.load(home.device / "policy.toml"))
    _, sealed = store.authenticate(
        "security", TEST_PASSWORDS["METER_SO_PASSWORD"], datetime.now(UTC)
    )
    try:
        _, high = pin_length_range(module, slot)
        for name in ("user_pin", "so_pin"):
            assert len(sealed[name]) == high == home.profile.selection.pin_max
            assert sealed[name] != lab[name]
        assert sealed["user_pin"] not in result.output and sealed["so_pin"] not in result.output
        with running_device(home):  # the device logs on with what the slots seal
            assert run(home.path, "status", role="administrator")["module_state"] == "authorized"
    finally:
        change_pins(module, slot, sealed, lab)  # the lab's token keeps the lab's PINs
