"""The device's ceremony services attacked: wrong role, no authorization, a bad transport
key, an altered or foreign final-register statement, a token that is not new, and
interruptions at each commit step. Every refusal leaves both tokens as they were.

These drive the firmware in this process (the socket and the cards are in
tests/test_ceremony.py); the source and the target are two homes, one after the other.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, ObjectClass

from meter.cli import provision
from meter.cli.home import Home
from meter.errors import (
    AccessDenied,
    CertificateError,
    ConfigurationError,
    DeviceLocked,
    InvalidInput,
    MeterError,
    ProtocolError,
    TokenError,
)
from meter.psd import device as device_module
from meter.psd import services_custody_import
from meter.psd.firmware import PSD
from meter.token import KeyAlgorithm
from meter.token import wrapping as w
from tests._ceremony import PASSWORDS, target_home
from tests.conftest import TEST_METER_PINS, open_meter_token

TRANSCRIPT = {"ceremony": "m1", "outcome": "completed"}


@contextmanager
def _as(home: Home, user_id: str) -> Iterator[PSD]:
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(user_id, PASSWORDS[user_id])
        yield psd


def _export(home: Home, ceremony: str, purpose: str) -> tuple[dict[str, Any], bytes]:
    key = os.urandom(32)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon("security", PASSWORDS["security"])
        psd.ceremony_authorize(ceremony, purpose)
        psd.logoff()
        psd.logon("custodian", PASSWORDS["custodian"])
        bundle = psd.ceremony_export_keys(ceremony, key)
    return bundle, key


def _move(home: Home, ceremony: str = "m1") -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    key = os.urandom(32)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon("security", PASSWORDS["security"])
        psd.ceremony_authorize(ceremony, "export-move")
        psd.logoff()
        psd.logon("custodian", PASSWORDS["custodian"])
        bundle = psd.ceremony_export_keys(ceremony, key)
        psd.logoff()
        psd.logon("security", PASSWORDS["security"])
        moved = psd.ceremony_finish_move(ceremony, {**TRANSCRIPT, "ceremony": ceremony})
    return bundle, key, moved["final_registers"]


def _root_sha256(bundle: dict[str, Any]) -> str:
    root = x509.load_pem_x509_certificate(bundle["certificates"]["postal_root"].encode())
    return hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()


def _import(
    target: Home,
    bundle: dict[str, Any],
    key: bytes,
    statement: dict[str, Any],
    root: str | None = None,
) -> dict[str, Any]:
    with PSD.power_up(target.open_device_token(), target.device) as psd:
        psd.logon("security", PASSWORDS["security"])
        psd.ceremony_authorize(str(bundle["ceremony"]), "import", root or _root_sha256(bundle))
        psd.logoff()
        psd.logon("custodian", PASSWORDS["custodian"])
        return psd.ceremony_import_keys(bundle, key, statement)


def _target_is_empty(target: Home, *, records: bool = False) -> None:
    with PSD.power_up(target.open_device_token(), target.device) as psd:
        psd.logon("custodian", PASSWORDS["custodian"])
        assert psd.module_state() == "uninitialized" and psd.error is None
        for label in ("indicium-signing", "register-mac", "audit-signing"):
            assert not psd.token.has_key(label), label
        for application in () if records else ("meter.registers", "meter.state", "meter.identity"):
            assert psd.token.data_objects(application) == [], application


@pytest.fixture
def target(device_home: Home, tmp_path: Path) -> Home:
    return target_home(tmp_path / "target")


def test_only_the_security_officer_authorizes_and_only_a_key_custodian_exports(
    device_home: Home,
) -> None:
    with _as(device_home, "custodian") as psd:
        with pytest.raises(AccessDenied, match="Key Administration is not allowed"):
            psd.ceremony_authorize("c1", "export-backup")
        with pytest.raises(DeviceLocked, match="not authorized"):
            psd.ceremony_export_keys("c1", os.urandom(32))
    with _as(device_home, "security") as psd:
        psd.ceremony_authorize("c1", "export-backup")
        with pytest.raises(AccessDenied, match="Key Exchange is not allowed"):
            psd.ceremony_export_keys("c1", os.urandom(32))
        with pytest.raises(InvalidInput, match="ceremony id"):
            psd.ceremony_authorize("no spaces please", "export-backup")
        with pytest.raises(InvalidInput, match="purpose"):
            psd.ceremony_authorize("c2", "export-everything")
    with _as(device_home, "customer") as psd, pytest.raises(AccessDenied):
        psd.ceremony_export_keys("c1", os.urandom(32))


def test_an_authorization_is_for_one_ceremony_and_purpose_and_a_key_is_32_bytes(
    device_home: Home,
) -> None:
    with PSD.power_up(device_home.open_device_token(), device_home.device) as psd:
        psd.logon("security", PASSWORDS["security"])
        psd.ceremony_authorize("c1", "export-backup")
        psd.logoff()
        psd.logon("custodian", PASSWORDS["custodian"])
        with pytest.raises(DeviceLocked, match="'c2' is not authorized"):
            psd.ceremony_export_keys("c2", os.urandom(32))
        with pytest.raises(InvalidInput, match="32 bytes, not 16"):
            psd.ceremony_export_keys("c1", os.urandom(16))
        with pytest.raises(DeviceLocked, match="authorized for export-backup"):
            psd.ceremony_import_keys({"ceremony": "c1"}, os.urandom(32), {})
        # The failed attempts wrapped nothing and left no transport key.
        assert w.sweep_transport_keys(psd.token) == 0
        psd.logoff()
        psd.logon("security", PASSWORDS["security"])
        with pytest.raises(DeviceLocked, match="authorized for export-backup"):
            psd.ceremony_finish_move("c1", {"ceremony": "c1"})


def test_a_backup_export_changes_nothing_on_the_source(device_home: Home) -> None:
    with _as(device_home, "customer") as psd:
        before = psd.retrieve_psd_status()
    bundle, _ = _export(device_home, "b1", "export-backup")
    assert bundle["purpose"] == "export-backup"
    assert sorted(k["label"] for k in bundle["keys"]) == [
        "audit-signing",
        "indicium-signing",
        "register-mac",
    ]
    with _as(device_home, "customer") as psd:
        after = psd.retrieve_psd_status()
        assert after["ascending"] == before["ascending"]
        assert psd.module_state() == "authorized"
    with open_meter_token(device_home) as token:
        assert w.sweep_transport_keys(token) == 0  # the trusted key did not outlive the step


def test_finish_move_withdraws_once_and_a_rerun_returns_the_same_statement(
    device_home: Home,
) -> None:
    with PSD.power_up(device_home.open_device_token(), device_home.device) as psd:
        psd.logon("security", PASSWORDS["security"])
        psd.ceremony_authorize("m1", "export-move")
        with pytest.raises(DeviceLocked, match="has not exported the keys"):
            psd.ceremony_finish_move("m1", TRANSCRIPT)
        assert psd._device_state().withdrawn_at is None
    _bundle, _key, statement = _move(device_home)
    with _as(device_home, "security") as psd:
        again = psd.ceremony_finish_move("m1", TRANSCRIPT)
        assert again["final_registers"] == statement
        assert psd.module_state() == "withdrawn"
        with pytest.raises(DeviceLocked, match="withdrawn"):
            psd.ceremony_authorize("m2", "export-move")
    with _as(device_home, "custodian") as psd, pytest.raises(DeviceLocked, match="withdrawn"):
        psd.ceremony_export_keys("m1", os.urandom(32))


def test_import_refuses_an_altered_or_foreign_statement_and_a_wrong_key(
    device_home: Home, target: Home
) -> None:
    backup, backup_key = _export(device_home, "b1", "export-backup")
    bundle, key, statement = _move(device_home)
    altered = copy.deepcopy(statement)
    altered["statement"]["descending"] += 100_000  # more credit than the source had
    with pytest.raises(ProtocolError, match="does not verify"):
        _import(target, bundle, key, altered)
    # The move's true statement does not go with the backup's bundle (credit moves once).
    with pytest.raises(ProtocolError, match=r"does not match the export bundle.*ceremony"):
        _import(target, backup, backup_key, statement)
    with pytest.raises(TokenError, match="does not unwrap"):
        _import(target, bundle, os.urandom(32), statement)
    tampered = copy.deepcopy(bundle)
    tampered["certificates"]["meter"] = bundle["certificates"]["provider"]
    with pytest.raises(MeterError, match="signing key is not the one"):
        _import(target, tampered, key, statement)
    with pytest.raises(ProtocolError, match="format"):
        _import(target, {**bundle, "format": "meter-key-export/0"}, key, statement)
    # A chain under a root the Security Officer did not name (a self-made root, say).
    with pytest.raises(CertificateError, match=r"postal root .* is not the one"):
        _import(target, bundle, key, statement, root="00" * 32)
    with _as(target, "security") as psd, pytest.raises(InvalidInput, match="names the postal root"):
        psd.ceremony_authorize("m1", "import")
    _target_is_empty(target)
    # And the genuine set imports.
    result = _import(target, bundle, key, statement)
    assert result["module_state"] == "authorized"
    assert result["kcvs_verified"] == {k["label"]: k["kcv"] for k in bundle["keys"]}
    # Once a meter, the target takes no second import.
    with pytest.raises(ConfigurationError, match="holds a meter signing key already"):
        _import(target, bundle, key, statement)


def test_an_import_interrupted_before_its_commit_point_reruns_to_completion(
    device_home: Home, target: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, key, statement = _move(device_home)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise TokenError("power lost")

    monkeypatch.setattr(services_custody_import, "store_identity", crash)
    with pytest.raises(TokenError, match="power lost"):
        _import(target, bundle, key, statement)
    monkeypatch.undo()
    _target_is_empty(target, records=True)  # keys and records are there, under no meter label
    result = _import(target, bundle, key, statement)
    assert result["registers"]["descending"] == 100_000


def test_an_import_interrupted_between_renames_is_rolled_forward_at_the_next_logon(
    device_home: Home, target: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, key, statement = _move(device_home)
    real = w.rename_key

    def crash_at_the_signing_key(token: Any, old: str, new: str, kind: Any) -> None:
        if new == "indicium-signing":
            raise TokenError("power lost")
        real(token, old, new, kind)

    monkeypatch.setattr(w, "rename_key", crash_at_the_signing_key)
    with pytest.raises(TokenError, match="power lost"):
        _import(target, bundle, key, statement)
    monkeypatch.undo()
    with _as(target, "custodian") as psd:
        assert psd.token.has_key("indicium-signing")  # the logon finished the renames
        assert psd.error is None and psd.module_state() == "initialized"
    assert _import(target, bundle, key, statement)["module_state"] == "authorized"


def test_an_import_interrupted_after_its_commit_point_reruns_to_completion(
    device_home: Home, target: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, key, statement = _move(device_home)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise TokenError("power lost")

    monkeypatch.setattr(device_module.Meter, "install_certificates", crash)
    with pytest.raises(TokenError, match="power lost"):
        _import(target, bundle, key, statement)
    monkeypatch.undo()
    assert _import(target, bundle, key, statement)["module_state"] == "authorized"


def test_a_transport_key_left_by_a_crash_is_destroyed_at_the_next_logon(
    device_home: Home,
) -> None:
    with open_meter_token(device_home) as token, token._call("leave a transport key") as s:
        s.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: os.urandom(32),
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.WRAP: True,
                Attribute.LABEL: "ceremony-transport-crashed",
            }
        )
    with _as(device_home, "customer") as psd:
        cleanup = [r for r in psd.audit.records() if r.service == "ceremony-cleanup"]
        assert cleanup and cleanup[-1].values["transport_keys"] == 1
        assert w.sweep_transport_keys(psd.token) == 0


def test_an_ed25519_meter_is_refused_before_anything_changes(home: Home) -> None:
    from tests.conftest import set_up

    provision.init_home(
        home,
        provision.InitOptions(device_serial=983973031311, algorithm=KeyAlgorithm.ED25519),
        meter_pins=TEST_METER_PINS,
    )
    set_up(home, credit_mills=0)
    with _as(home, "security") as psd:
        with pytest.raises(ConfigurationError, match="Ed25519 private key, which this token"):
            psd.ceremony_authorize("e1", "export-backup")
        assert psd._ceremony is None


def test_a_token_without_key_wrap_refuses_the_export_clearly(device_home_on: Home) -> None:
    """On openCryptoki 3.8 (no CKM_AES_KEY_WRAP_PAD) the keys were made non-extractable and
    the export is refused at its first step; on SoftHSM2 the same step is authorized."""
    with _as(device_home_on, "security") as psd:
        if device_home_on.profile.capabilities is not None and (
            "aes_key_wrap_pad" not in device_home_on.profile.capabilities
        ):
            key = w.describe_key(psd.token, "indicium-signing", "private")
            assert not key.extractable
            with pytest.raises(ConfigurationError, match="aes_key_wrap_pad"):
                psd.ceremony_authorize("o1", "export-backup")
            assert psd._ceremony is None
        else:
            assert psd.ceremony_authorize("o1", "export-backup")["purpose"] == "export-backup"


def test_a_backup_transcript_is_signed_once_by_the_audit_key(device_home: Home) -> None:
    from meter.custody.ceremony_transcript import verify_transcript

    with PSD.power_up(device_home.open_device_token(), device_home.device) as psd:
        psd.logon("security", PASSWORDS["security"])
        psd.ceremony_authorize("b2", "export-backup")
        psd.logoff()
        psd.logon("custodian", PASSWORDS["custodian"])
        with pytest.raises(DeviceLocked, match="has moved no key yet"):
            psd.ceremony_sign_transcript("b2", {"ceremony": "b2"})
        bundle = psd.ceremony_export_keys("b2", os.urandom(32))
        with pytest.raises(InvalidInput, match="not the one of ceremony 'b2'"):
            psd.ceremony_sign_transcript("b2", {"ceremony": "other", "outcome": "completed"})
        document = psd.ceremony_sign_transcript("b2", {"ceremony": "b2", "outcome": "completed"})
        with pytest.raises(DeviceLocked, match="not authorized"):  # the ceremony is over
            psd.ceremony_sign_transcript("b2", {"ceremony": "b2", "outcome": "forged"})
        records = [r for r in psd.audit.records() if r.service == "ceremony-transcript"]
        assert records and records[-1].values["transcript"]["ceremony"] == "b2"
    spki = next(k for k in bundle["keys"] if k["label"] == "audit-signing")["public_spki"]
    pem = serialization.load_der_public_key(bytes.fromhex(spki)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = verify_transcript(document, pem)
    assert body["device"]["purpose"] == "export-backup"
    assert body["device"]["kcvs"] == {k["label"]: k["kcv"] for k in bundle["keys"]}


def test_keys_left_by_a_crash_after_the_move_committed_go_at_the_next_logon(
    device_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: Any) -> list[str]:
        raise TokenError("power lost")

    monkeypatch.setattr(services_custody_import.CustodyImportServices, "_retire_moved_keys", crash)
    with pytest.raises(TokenError, match="power lost"):
        _move(device_home, "m3")
    monkeypatch.undo()
    with _as(device_home, "security") as psd:
        assert psd._device_state().withdrawn_for == "m3"
        assert not psd.token.has_key("indicium-signing")
        assert [r for r in psd.audit.records() if r.service == "ceremony-retire-keys"]
        # The rerun of the last step still hands out the same statement.
        assert (
            psd.ceremony_finish_move("m3", {})["final_registers"]["statement"]["ceremony"] == "m3"
        )
