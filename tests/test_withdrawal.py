"""Withdraw PSD end to end: the final signed audit, the refund in the provider's ledger
(SQLite), the keys destroyed, the device withdrawn, its certificate revoked and the post
office's verdict REVOKED; and SIGKILL of the device between and inside the steps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.workflows import DEMO_CUSTOMER
from meter.errors import DeviceLocked, InvalidInput, MeterError, ProtocolError
from meter.host import DeviceClient
from meter.indicium import Indicium
from meter.pki.revocation import Revocations
from meter.postoffice.replay import MemoryReplayStore
from meter.postoffice.trustdir import REVOCATIONS_FILE, CertificateDirectory, load_revocation_export
from meter.postoffice.verdict import Verdict
from meter.postoffice.verifier import Verifier
from meter.protocol.device_audit import AuditAcknowledgement, DeviceAuditReport
from meter.protocol.revocation_export import RevocationExport
from meter.provider.audits import WITHOUT_POST_OFFICE
from meter.provider.withdrawal import (
    REFUND_WINDOW,
    WITHDRAWAL_REFUND_ID,
    WithdrawalOutcome,
)
from meter.psd.firmware import PSD
from meter.psd.register_store import MAC_KEY_LABEL
from meter.psd.services_reload import RELOAD_CERT_APPLICATION, RELOAD_KEY_LABEL
from meter.psd.services_withdrawal import DESTROYED_AT_WITHDRAWAL
from tests._audit_lab import ProviderLab, provider_lab
from tests._reload_harness import prepare_lab
from tests.conftest import LETTER as REQUEST  # tests/test_withdrawal_cli.py imports it too
from tests.conftest import ROLE_USERS, open_meter_token

pytestmark = pytest.mark.softhsm

CHILD = Path(__file__).with_name("_crash_withdrawal.py")


@contextmanager
def logged_on(home: Home, role: str) -> Iterator[DeviceClient]:
    with DeviceClient(home.socket) as client:
        client.logon(*ROLE_USERS[role])
        yield client  # the session ends with the connection


def now() -> datetime:
    return datetime.now(UTC)


def begin(home: Home, lab: ProviderLab) -> AuditAcknowledgement:
    """Steps 1 and 2: the meter's final report, the provider's audit and refund."""
    with logged_on(home, "provider") as client:
        report = client.withdraw_begin(lab.desk.new_nonce(lab.serial, now()))
    assert report.withdrawing
    return lab.withdrawals.final_audit(report, lab.meter_certificate, now(), WITHOUT_POST_OFFICE)


@contextmanager
def in_process(home: Home, folder: Path) -> Iterator[tuple[ProviderLab, PSD]]:
    """A provider lab for ``home``'s meter, and the meter's firmware powered up in this
    process with the Provider logged on."""
    with (
        provider_lab(home, folder) as lab,
        PSD.power_up(home.open_device_token(), home.device) as psd,
    ):
        psd.logon(*ROLE_USERS["provider"])
        yield lab, psd


def final_report(lab: ProviderLab, psd: PSD, source: str) -> DeviceAuditReport:
    """Withdraw PSD's first step, for a fresh nonce of the lab's provider."""
    step = psd.withdraw_psd(nonce=lab.desk.new_nonce(lab.serial, now()))
    return DeviceAuditReport.from_json(step["signed_report"], source)


def complete(home: Home, ack: AuditAcknowledgement) -> dict[str, Any]:
    with logged_on(home, "provider") as client:
        return client.withdraw_complete(ack)


def device_status(home: Home) -> dict[str, Any]:
    with logged_on(home, "auditor") as client:
        answer: dict[str, Any] = client.get("/v1/status")
    return answer


def refunded(lab: ProviderLab) -> int:
    return lab.ledger.account(DEMO_CUSTOMER).refunded


def certify_reload(home: Home) -> None:
    """Authorize PSD for the reload key (made in the token, certified by the provider), as
    every meter that reloads has it: the withdrawal must destroy that key too."""
    prepare_lab(home)
    with open_meter_token(home) as token:
        assert token.has_key(RELOAD_KEY_LABEL)
        assert len(token.data_objects(RELOAD_CERT_APPLICATION)) == 1


def check_withdrawn(home: Home, lab: ProviderLab, descending: int, pieces: int) -> None:
    """Nothing issued after step 1, the refund made once, the keys gone, the state withdrawn."""
    with running_device(home):
        answer = device_status(home)
        with logged_on(home, "customer") as client, pytest.raises(DeviceLocked, match="withdrawn"):
            client.issue(REQUEST)
    assert answer["module_state"] == "withdrawn" and answer["withdrawn_at"]
    assert answer["registers"]["descending"] == descending
    assert answer["registers"]["piece_count"] == pieces
    assert refunded(lab) == descending
    last = lab.ledger.last_audit(lab.serial)
    assert last is not None and last["details"]["refund"] == descending
    with open_meter_token(home) as token:
        assert not any(token.has_key(label) for label in DESTROYED_AT_WITHDRAWAL)
        assert not token.has_key(RELOAD_KEY_LABEL)  # it would still prove the meter
        assert token.data_objects(RELOAD_CERT_APPLICATION) == []  # for a key that is gone
        assert token.has_key(MAC_KEY_LABEL)  # the records stay readable


def test_withdrawal_refund_revocation_and_the_post_office_verdict(
    device_home: Home, tmp_path: Path
) -> None:
    home = device_home
    certify_reload(home)
    with provider_lab(home, tmp_path / "provider") as lab:
        with running_device(home):
            with logged_on(home, "customer") as client:
                before = client.issue(REQUEST)
            # A piece dated two days ahead (the clock set forward, then back): the kind of
            # piece a customer could hold back to mail after the withdrawal.
            with logged_on(home, "administrator") as client:
                client.post("/v1/clock", {"time": (now() + timedelta(days=2)).isoformat()})
            with logged_on(home, "customer") as client:
                ahead = client.issue(REQUEST)
            with logged_on(home, "administrator") as client:
                client.post("/v1/clock", {"time": now().isoformat()})

            ack = begin(home, lab)
            # Step 1 stopped issuing before the report left the device.
            with logged_on(home, "customer") as client, pytest.raises(DeviceLocked, match="began"):
                client.issue(REQUEST)
            assert device_status(home)["withdrawing_since"] is not None
            descending = ack.descending
            assert descending == 100_000 - before.postage - ahead.postage
            assert refunded(lab) == descending

            final = complete(home, ack)
            assert final["step"] == "withdrawn" and final["descending"] == descending
            keys = device_status(home)["keys"]
            assert keys["indicium-signing"]["present"] is False
            with (
                logged_on(home, "provider") as client,
                pytest.raises(DeviceLocked, match="withdrawn"),
            ):
                client.withdraw_complete(ack)
            with (
                logged_on(home, "auditor") as client,
                pytest.raises(DeviceLocked, match="destroyed"),
            ):
                client.device_audit(lab.desk.new_nonce(lab.serial, now()))

            revoked_at = lab.withdrawals.revoke(lab.serial, now())
            export = lab.withdrawals.export_revocations(now())
        check_withdrawn(home, lab, descending, 2)

    exported = tmp_path / "revocations-export.json"
    exported.write_text(json.dumps(export.to_json()))
    assert load_revocation_export(home.certs, exported.read_bytes(), str(exported)) == 1
    trust, revocations = CertificateDirectory(home.certs).current()
    assert revocations.revoked_at(lab.serial) == revoked_at

    def verdict(piece: Indicium) -> Verdict:
        verifier = Verifier(trust, revocations, MemoryReplayStore(), piece.date_of_mailing)
        return verifier.verify(piece.to_bytes()).verdict

    assert verdict(before) is Verdict.VALID
    assert verdict(ahead) is Verdict.REVOKED


def test_the_post_office_refuses_an_altered_or_foreign_revocation_export(
    device_home: Home, tmp_path: Path
) -> None:
    home = device_home
    with provider_lab(home, tmp_path / "provider") as lab:
        export = RevocationExport(lab.provider.authorization_id, now(), {lab.serial: now()})
        signed = export.signed_by(lab.desk.sign).to_json()
    altered = dict(signed)
    altered["revocations"] = [{"device_serial": 1, "revoked_at": now().isoformat()}]
    path = home.certs / REVOCATIONS_FILE
    for bad, problem in (
        (json.dumps(altered).encode(), "does not verify"),
        (json.dumps({**signed, "authorization_id": 77}).encode(), "provider 77"),
        (b"{not json", "not JSON"),
    ):
        with pytest.raises(MeterError, match=problem):
            load_revocation_export(home.certs, bad, "export")
        assert not path.exists()  # nothing merged
    load_revocation_export(home.certs, json.dumps(signed).encode(), "export")
    assert Revocations.from_file(path).revoked_at(lab.serial) is not None


def test_refunds_are_made_once_and_refused_after_180_days(
    device_home: Home, tmp_path: Path
) -> None:
    with in_process(device_home, tmp_path / "provider") as (lab, psd):
        with pytest.raises(InvalidInput, match="either the provider's audit nonce"):
            psd.withdraw_psd()
        report = final_report(lab, psd, "final")
        # Not a routine audit: the routine desk refuses a withdrawing meter's report.
        with pytest.raises(ProtocolError, match="being withdrawn"):
            lab.desk.audit(report, lab.meter_certificate, now(), WITHOUT_POST_OFFICE)
        ack = lab.withdrawals.final_audit(report, lab.meter_certificate, now(), WITHOUT_POST_OFFICE)
        assert refunded(lab) == report.descending
        last = lab.ledger.last_audit(lab.serial)
        assert last is not None and last["outcome"] == WithdrawalOutcome.REFUNDED
        assert lab.withdrawals.refund(lab.serial, now() + timedelta(days=1)) == report.descending
        assert refunded(lab) == report.descending
        # A rerun of the final audit with a new report of the same registers refunds nothing.
        second = final_report(lab, psd, "again")
        lab.withdrawals.final_audit(second, lab.meter_certificate, now(), WITHOUT_POST_OFFICE)
        assert refunded(lab) == report.descending
        # A withdrawal acknowledgement for other registers does not destroy anything.
        wrong = replace(ack, descending=ack.descending - 1, signature=b"").signed_by(lab.desk.sign)
        with pytest.raises(ProtocolError, match="registers"):
            psd.withdraw_psd(acknowledgement=wrong)
        assert psd.token.has_key("indicium-signing")
        psd.withdraw_psd(acknowledgement=ack)
        assert psd.module_state() == "withdrawn"


def test_a_refund_pending_after_a_provider_crash_is_completed_once(
    device_home: Home, tmp_path: Path
) -> None:
    with in_process(device_home, tmp_path / "provider") as (lab, psd):
        report = final_report(lab, psd, "final")
        lab.desk.verify_report(report, lab.meter_certificate, now())
        details = lab.desk.check_and_record(
            report,
            now(),
            WITHOUT_POST_OFFICE,
            WithdrawalOutcome.AUDITED,
            {"withdrawal_audited_at": now().isoformat()},
        )
        # The refund was made, then the provider died before journalling it; meanwhile
        # another refund of the same customer came in (the old inference would be fooled).
        lab.ledger.record_refund(
            DEMO_CUSTOMER,
            lab.serial,
            report.descending,
            "withdrawal",
            now(),
            refund_id=WITHDRAWAL_REFUND_ID,
        )
        assert lab.withdrawals.refund(lab.serial, now()) == report.descending
        assert lab.ledger.refunded(lab.serial) == report.descending  # once
        last = lab.ledger.last_audit(lab.serial)
        assert last is not None and last["outcome"] == WithdrawalOutcome.REFUNDED

    late = tmp_path / "late"
    with provider_lab(device_home, late) as lab2:
        lab2.ledger.record_audit(
            lab2.serial,
            report.to_bytes(),
            WithdrawalOutcome.AUDITED,
            {**details, "withdrawal_audited_at": (now() - REFUND_WINDOW).isoformat()},
            now(),
        )
        with pytest.raises(InvalidInput, match="180 days"):
            lab2.withdrawals.refund(lab2.serial, now() + timedelta(days=1))
        assert refunded(lab2) == 0


# -- SIGKILL of the device during the withdrawal -------------------------------------------------


@contextmanager
def dying_device(home: Home, point: str, nth: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(home.path), point, str(nth)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "socket" in json.loads(proc.stdout.readline())
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


STEP_1_POINTS = [("after-create", 1), ("after-create", 2), ("before-sign", 1), ("before-audit", 1)]
STEP_3_POINTS = [
    ("after-destroy-key", 1),
    ("after-destroy-key", 3),
    ("after-destroy-key", 4),  # the reload key gone, its certificate not yet
    ("after-destroy", 1),  # a data object destroyed: the seal's, or the reload certificate
    ("after-create", 1),
    ("after-create", 2),
    ("before-audit", 1),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "nth"), STEP_1_POINTS)
def test_sigkill_during_the_final_audit(
    device_home: Home, tmp_path: Path, point: str, nth: int
) -> None:
    home = device_home
    with provider_lab(home, tmp_path / "provider") as lab:
        with dying_device(home, point, nth) as proc:
            with pytest.raises(MeterError), logged_on(home, "provider") as client:
                client.withdraw_begin(lab.desk.new_nonce(lab.serial, now()))
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
        assert refunded(lab) == 0  # no report left the device: nothing refunded
        with running_device(home):
            ack = begin(home, lab)  # rerun step 1
            complete(home, ack)
        check_withdrawn(home, lab, 100_000, 0)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "nth"), STEP_3_POINTS)
def test_sigkill_while_destroying_the_keys(
    device_home: Home, tmp_path: Path, point: str, nth: int
) -> None:
    home = device_home
    certify_reload(home)
    with provider_lab(home, tmp_path / "provider") as lab:
        with running_device(home):
            ack = begin(home, lab)
        with dying_device(home, point, nth) as proc:
            with pytest.raises(MeterError):
                complete(home, ack)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
        with running_device(home):
            state = device_status(home)
            if state["module_state"] != "withdrawn":  # the crash came before the commit
                assert state["withdrawing_since"] is not None
                with (
                    logged_on(home, "customer") as client,
                    pytest.raises(DeviceLocked, match="withdraw"),
                ):
                    client.issue(REQUEST)
                complete(home, ack)  # rerun steps 3-4 with the same acknowledgement
            else:
                with pytest.raises(DeviceLocked, match="withdrawn"):
                    complete(home, ack)
        check_withdrawn(home, lab, 100_000, 0)


def test_the_load_revocations_command(device_home: Home, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meter.cli.main import cli

    home = device_home
    with provider_lab(home, tmp_path / "provider") as lab:
        export = RevocationExport(lab.provider.authorization_id, now(), {lab.serial: now()})
        signed = export.signed_by(lab.desk.sign).to_json()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(signed))
    bad.write_text(json.dumps({**signed, "signature": "00" * 64}))
    runner = CliRunner()
    refused = runner.invoke(
        cli, ["--home", str(home.path), "postoffice", "load-revocations", str(bad)]
    )
    assert refused.exit_code == 1 and "does not verify" in refused.output
    assert not (home.certs / REVOCATIONS_FILE).exists()
    loaded = runner.invoke(
        cli, ["--home", str(home.path), "--json", "postoffice", "load-revocations", str(good)]
    )
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.output)["devices"] == 1


def test_only_the_provider_may_begin_a_withdrawal(device_home: Home, tmp_path: Path) -> None:
    from meter.errors import AccessDenied

    home = device_home
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(*ROLE_USERS["customer"])
        with pytest.raises(AccessDenied, match="Withdraw PSD is not allowed to the Customer"):
            psd.withdraw_psd(nonce=bytes(16))
        assert psd.request_status()["withdrawing_since"] is None
        assert psd.create_indicium(REQUEST).sequence == 1  # nothing changed
