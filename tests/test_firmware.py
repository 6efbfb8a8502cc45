"""The device firmware on SoftHSM2: sessions, lockout, clock, corrections, error state, audit."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from meter.cli.home import Home
from meter.cli.main import cli
from meter.errors import (
    AccessDenied,
    AuthenticationFailed,
    DeviceLocked,
    MeterError,
    SessionActive,
)
from meter.indicium import FLAG_CORRECTION
from meter.psd.device import SIGNING_KEY_LABEL
from meter.psd.firmware import PSD, ModuleState
from meter.psd.register_store import MAC_KEY_LABEL
from meter.token import KeyAlgorithm
from tests.conftest import LETTER, ROLE_USERS, TEST_METER_PINS, Clock, open_meter_token

pytestmark = pytest.mark.softhsm


def logon(psd: PSD, role: str) -> None:
    psd.logon(*ROLE_USERS[role])


def test_one_user_at_a_time_and_logoff(psd: PSD) -> None:
    logon(psd, "administrator")
    with pytest.raises(SessionActive, match=r"'admin'.*one user at a time"):
        logon(psd, "auditor")
    assert psd.audit.records()[-1].outcome == "denied"
    psd.logoff()
    logon(psd, "auditor")
    assert psd.caller().user_id == "auditor"


def test_a_second_process_cannot_power_up_the_same_device(psd: PSD, device_home: Home) -> None:
    from meter.errors import TokenUnavailable

    logon(psd, "customer")
    with pytest.raises(TokenUnavailable, match="in use by another process"):
        device_home.open_device_token()


def test_idle_timeout_ends_the_session(psd: PSD, clock: Clock) -> None:
    logon(psd, "customer")
    psd.create_indicium(LETTER)
    clock.now += psd.idle_timeout + timedelta(seconds=1)
    with pytest.raises(AccessDenied, match="No-Role"):
        psd.create_indicium(LETTER)
    services = [(r.service, r.values.get("reason")) for r in psd.audit.records()[-4:]]
    assert ("session-end", "idle-timeout") in services


def test_failed_logons_lock_the_user_out_for_a_growing_delay(psd: PSD, clock: Clock) -> None:
    user, password = ROLE_USERS["customer"]
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            psd.logon(user, "Wrong-password-1")
    with pytest.raises(AuthenticationFailed, match="locked out until"):
        psd.logon(user, password)  # even the right password waits
    failed = [r for r in psd.audit.records() if r.service == "logon" and r.outcome == "failed"]
    assert failed[2].values["locked_until"] is not None
    assert all("Wrong-password" not in json.dumps(dict(r.values)) for r in failed)
    clock.now += timedelta(minutes=2)
    psd.logon(user, password)
    assert psd.caller().user_id == user


def test_set_clock_moves_time_of_issue_and_is_audited(psd: PSD, clock: Clock) -> None:
    logon(psd, "administrator")
    target = clock.now + timedelta(days=2, hours=3)
    result = psd.set_clock(target)
    assert abs(result["step_s"] - int(timedelta(days=2, hours=3).total_seconds())) <= 1
    record = psd.audit.records()[-1]
    assert record.service == "set-clock" and record.values["step_s"] == result["step_s"]
    psd.logoff()
    logon(psd, "customer")
    indicium = psd.create_indicium(LETTER)
    assert abs(indicium.time_of_issue - target.replace(microsecond=0)) <= timedelta(seconds=2)
    assert indicium.date_of_mailing == target.date()


def test_correction_indicium_refers_to_the_original_piece(psd: PSD) -> None:
    logon(psd, "customer")
    original = psd.create_indicium(LETTER)
    correction = psd.create_correction_indicium(LETTER, original.sequence)
    assert correction.flags & FLAG_CORRECTION
    assert correction.reference_sequence == original.sequence
    assert correction.sequence == original.sequence + 1
    record = psd.audit.records()[-1]
    assert record.service == "create-correction-indicium"
    assert record.values["reference_sequence"] == original.sequence


def test_swapped_signing_key_puts_the_device_in_the_error_state(
    device_home: Home, clock: Clock
) -> None:
    with open_meter_token(device_home) as token:
        token.destroy_key(SIGNING_KEY_LABEL)
        token.generate_signing_keypair(SIGNING_KEY_LABEL, KeyAlgorithm.ECDSA_P256)
    with PSD.power_up(device_home.open_device_token(), device_home.device, clock=clock) as psd:
        logon(psd, "customer")
        assert psd.module_state() == ModuleState.ERROR
        with pytest.raises(DeviceLocked, match=r"error state.*pairwise"):
            psd.create_indicium(LETTER)
        status = psd.request_status()
        assert status["module_state"] == "error" and "pairwise" in status["error"]
        kinds = [(r.service, r.outcome) for r in psd.audit.records()]
        assert ("error-state", "entered") in kinds and ("create-indicium", "failed") in kinds


def test_corrupt_register_mac_key_puts_the_device_in_the_error_state(
    device_home: Home, clock: Clock
) -> None:
    with open_meter_token(device_home) as token:
        token.destroy_key(MAC_KEY_LABEL)
        token.generate_hmac_key(MAC_KEY_LABEL)
    with PSD.power_up(device_home.open_device_token(), device_home.device, clock=clock) as psd:
        logon(psd, "customer")
        assert psd.module_state() == ModuleState.ERROR
        with pytest.raises(DeviceLocked, match="error state"):
            psd.create_indicium(LETTER)
        audit = psd.request_device_audit()  # on demand: still failing
        assert audit["self_tests"]["passed"] is False and audit["module_state"] == "error"
        assert "device-records" in psd.request_status()["error"]


def test_withdrawn_device_refuses_to_issue(device_home: Home, clock: Clock, tmp_path: Path) -> None:
    from tests._audit_lab import withdraw_in_process

    with PSD.power_up(device_home.open_device_token(), device_home.device, clock=clock) as psd:
        logon(psd, "provider")
        final = withdraw_in_process(psd, device_home, tmp_path / "provider")
        assert psd.module_state() == ModuleState.WITHDRAWN
        assert final["descending"] == 100_000
    with PSD.power_up(device_home.open_device_token(), device_home.device, clock=clock) as psd:
        logon(psd, "customer")
        with pytest.raises(DeviceLocked, match="withdrawn"):
            psd.create_indicium(LETTER)
        assert psd.retrieve_psd_status()["piece_count"] == 0


def test_key_exchange_key_is_made_once_in_the_token_and_cannot_sign(psd: PSD) -> None:
    logon(psd, "key-custodian")
    first, again = psd.key_exchange(), psd.key_exchange()
    assert first["key_id"] == again["key_id"] and "PUBLIC KEY" in first["public_key_pem"]
    attributes = psd.token.key_attributes("key-exchange", "private")
    assert attributes["sensitive"] and not attributes["extractable"]
    with pytest.raises(MeterError):
        psd.token.sign("key-exchange", KeyAlgorithm.ECDSA_P256, b"not for signing")


def test_status_without_logon_and_after(psd: PSD) -> None:
    status = psd.request_status()
    assert status["role"] == "no-role" and status["registers"] is None
    # Until a logon unlocks the token the private records are out of reach.
    assert status["module_state"] == ModuleState.LOCKED and status["unlocked"] is False
    assert status["self_tests"]["passed"] is True
    logon(psd, "auditor")
    status = psd.request_status()
    assert (status["user_id"], status["role"]) == ("auditor", "auditor")
    assert status["module_state"] == ModuleState.AUTHORIZED
    assert status["registers"]["descending"] == 100_000
    assert status["keys"]["audit-signing"]["present"] is True
    # Extractable only under a trusted key (CKA_WRAP_WITH_TRUSTED): the key ceremonies.
    assert status["keys"]["indicium-signing"]["extractable"] is True
    assert status["session"]["open"] is True
    psd.logoff()
    # The device stays unlocked after the session; No-Role still sees no registers.
    status = psd.request_status()
    assert status["module_state"] == ModuleState.AUTHORIZED and status["registers"] is None
    assert status["unlocked"] is True and psd.token.login_state == "user"


def test_no_secret_reaches_the_users_file_or_the_audit_log(psd: PSD, device_home: Home) -> None:
    logon(psd, "customer")
    psd.create_indicium(LETTER)
    psd.power_down()
    secrets = list(TEST_METER_PINS.values())
    secrets += [password for _, password in ROLE_USERS.values()]
    for path in device_home.device.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret!r} found in {path}"


def test_audit_log_saved_and_verified_offline_with_the_public_key(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    logon(psd, "auditor")
    key = psd.export_audit_key()
    (tmp_path / "audit.pem").write_text(key["public_key_pem"])
    (tmp_path / "audit.json").write_text(psd.save_audit_log()["document"])
    psd.logoff()
    runner = CliRunner()
    args = ["audit", "verify", str(tmp_path / "audit.json"), "--key", str(tmp_path / "audit.pem")]
    ok = runner.invoke(cli, ["--home", str(device_home.path), *args], obj={})
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    saved = json.loads((tmp_path / "audit.json").read_text())
    text = json.dumps(saved)
    assert '"service": "create-user"' in text or '"create-user"' in text
    # Alter one record's values: the verifier names it.
    records = saved["records"]
    victim = next(r for r in records if r.get("service") == "authorize-customer")
    victim["values"]["customer"] = "SOMEONE-ELSE"
    (tmp_path / "audit.json").write_text(json.dumps(saved))
    broken = runner.invoke(cli, ["--home", str(device_home.path), *args], obj={})
    assert broken.exit_code == 2 and f"record {victim['index']}" in broken.output, broken.output
