"""`meter withdraw --provider URL` and `meter device-audit --provider URL` through the real
device process and a real provider service process on SQLite: the whole withdrawal, one
interrupted and resumed by rerunning the command, a wrong or missing operator key, an
unreachable provider, and the inspection watchdog cleared by a provider audit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.errors import DeviceLocked
from meter.host import DeviceClient
from meter.postoffice.trustdir import load_revocation_export
from meter.provider.api_keys import ApiKeys, KeyRole
from meter.provider.withdrawal import WithdrawalOutcome
from tests._audit_lab import books, local_grant_id, meter_certificate
from tests.conftest import ROLE_USERS, open_meter_token
from tests.test_withdrawal import REQUEST, dying_device

pytestmark = pytest.mark.softhsm

ROOT = Path(__file__).parent.parent
CREDITED = 100_000  # what conftest.set_up credited the meter, and the provider's ledger says
# The commands with the operator's explicit waiver of the post office's reconciliation
# (these tests have no post office); the URL follows.
WITHDRAW = ("withdraw", "--without-post-office", "--provider")
AUDIT = ("device-audit", "--without-post-office", "--provider")


@dataclass
class Service:
    url: str
    ledger: Path
    operator: str
    auditor: str
    serial: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def provider_service(home: Home, folder: Path) -> Iterator[Service]:
    """The provider's HTTP service with the audit routes, as its own process, on SQLite."""
    serial = _subject_serial(home)
    folder.mkdir(parents=True, exist_ok=True)
    ledger_path = folder / "accounts.sqlite"
    books(ledger_path, serial, CREDITED, local_grant_id(home)).close()
    keys = ApiKeys(folder / "keys.json")
    operator, auditor = keys.add("field-tech", KeyRole.OPERATOR), keys.add("books", KeyRole.AUDITOR)
    port = free_port()
    command = [sys.executable, "-m", "tests._audit_lab", "serve", str(home.path)]
    command += [str(ledger_path), str(keys.path), str(folder / "revocations.json"), str(port)]
    with tempfile.TemporaryFile("w+") as stderr:
        server = subprocess.Popen(command, stderr=stderr, cwd=ROOT, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
                        assert json.loads(answer.read()) == {"status": "ok"}
                        break
                except OSError:
                    if server.poll() is not None:
                        stderr.seek(0)
                        raise AssertionError(
                            f"the provider service died: {stderr.read()}"
                        ) from None
                    time.sleep(0.1)
            else:
                raise AssertionError("the provider service did not answer")
            yield Service(url, ledger_path, operator, auditor, serial)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)


def _subject_serial(home: Home) -> int:
    from cryptography.x509.oid import NameOID

    cert = meter_certificate(home)
    return int(str(cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value))


@dataclass
class Run:
    code: int
    result: dict[str, Any]
    stderr: str


def meter(home: Home, role: str, *args: str, key: str | None) -> Run:
    """The `meter` command line as its own process, logged on to the device as ``role``."""
    user, password = ROLE_USERS[role]
    env = {k: v for k, v in os.environ.items() if k != "METER_PROVIDER_KEY"}
    env["METER_PASSWORD"] = password
    if key is not None:
        env["METER_PROVIDER_KEY"] = key
    command = [sys.executable, "-m", "meter.cli.main", "--home", str(home.path)]
    done = subprocess.run(
        [*command, "--user", user, "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    lines = done.stdout.strip().splitlines()
    return Run(done.returncode, json.loads(lines[-1]) if lines else {}, done.stderr)


def status(home: Home) -> dict[str, Any]:
    with DeviceClient(home.socket) as client:
        client.logon(*ROLE_USERS["auditor"])
        answer: dict[str, Any] = client.get("/v1/status")
    return answer


def refunded(service: Service) -> int:
    from meter.provider.ledger_sql import open_ledger

    ledger = open_ledger(service.ledger)
    try:
        return ledger.refunded(service.serial)
    finally:
        ledger.close()


def last_audit(service: Service) -> dict[str, Any] | None:
    from meter.provider.ledger_sql import open_ledger

    ledger = open_ledger(service.ledger)
    try:
        return ledger.last_audit(service.serial)
    finally:
        ledger.close()


def check_withdrawn(home: Home, service: Service) -> None:
    with running_device(home):
        answer = status(home)
        with DeviceClient(home.socket) as client, pytest.raises(DeviceLocked, match="withdrawn"):
            client.logon(*ROLE_USERS["customer"])
            client.issue(REQUEST)
    assert answer["module_state"] == "withdrawn"
    assert refunded(service) == CREDITED  # exactly once
    last = last_audit(service)
    assert last is not None and last["outcome"] == WithdrawalOutcome.REVOKED
    with open_meter_token(home) as token:
        assert not token.has_key("indicium-signing")


def test_meter_withdraw_through_the_provider_service(device_home: Home, tmp_path: Path) -> None:
    home = device_home
    export = tmp_path / "revocations-export.json"
    with provider_service(home, tmp_path / "provider") as service, running_device(home):
        run = meter(
            home,
            "provider",
            "withdraw",
            "--provider",
            service.url,
            "--without-post-office",
            "--revocations-out",
            str(export),
            key=service.operator,
        )
        assert run.code == 0, run.stderr
        assert run.result["steps"] == [
            "final-audit",
            "refund",
            "destroy-keys",
            "revocation",
            "export",
        ]
        assert run.result["resumed_at"] is None
        assert run.result["refund"] == CREDITED
        assert run.result["module_state"] == "withdrawn"
        assert "step 3: the device destroyed its keys" in run.stderr
        # A rerun finds everything done but the (idempotent) revocation.
        again = meter(home, "provider", *WITHDRAW, service.url, key=service.operator)
        assert again.code == 0, again.stderr
        assert again.result["resumed_at"] == "revocation"
        assert again.result["steps"] == ["revocation"]
        assert "resuming at step 4" in again.stderr
    check_withdrawn(home, service)
    assert load_revocation_export(home.certs, export.read_bytes(), str(export)) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "nth", "resumes"),
    [("before-sign", 1, "final-audit"), ("after-destroy-key", 1, "destroy-keys")],
)
def test_an_interrupted_withdrawal_resumes_when_rerun(
    device_home: Home, tmp_path: Path, point: str, nth: int, resumes: str
) -> None:
    """The device is SIGKILLed inside step 1 (it had committed that it stops issuing, and
    died before signing) or step 3 (after the first key was destroyed: it can sign no new
    report); the rerun of the command picks up where it stopped, the customer refunded once."""
    home = device_home
    with provider_service(home, tmp_path / "provider") as service:
        with dying_device(home, point, nth) as proc:
            run = meter(home, "provider", *WITHDRAW, service.url, key=service.operator)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
        assert run.code == 1
        with running_device(home):
            state = status(home)
            assert state["withdrawing_since"] is not None and state["withdrawn_at"] is None
            again = meter(home, "provider", *WITHDRAW, service.url, key=service.operator)
            assert again.code == 0, again.stderr
            assert again.result["resumed_at"] == resumes
            step = {"final-audit": "step 1", "destroy-keys": "step 3"}[resumes]
            assert f"resuming at {step}" in again.stderr
            assert again.result["module_state"] == "withdrawn"
        check_withdrawn(home, service)


def test_a_wrong_or_missing_key_or_role_leaves_the_device_as_it_was(
    device_home: Home, tmp_path: Path
) -> None:
    home = device_home
    with provider_service(home, tmp_path / "provider") as service, running_device(home):
        withdraw = (*WITHDRAW, service.url)
        wrong = meter(home, "provider", *withdraw, key="pk_" + "0" * 40)
        assert wrong.code == 1 and wrong.result["error"] == "AuthenticationFailed"
        reader = meter(home, "provider", *withdraw, key=service.auditor)
        assert reader.code == 1 and reader.result["error"] == "AccessDenied"
        missing = meter(home, "provider", *withdraw, key=None)
        assert missing.code == 1 and "METER_PROVIDER_KEY" in missing.result["message"]
        # The operator's key but the device's Customer: the device refuses Withdraw PSD.
        customer = meter(home, "customer", *withdraw, key=service.operator)
        assert customer.code == 1 and customer.result["error"] == "AccessDenied"
        no_provider = meter(home, "provider", "withdraw", key=service.operator)
        assert no_provider.code == 1 and "--provider URL" in no_provider.result["message"]
        audit = meter(home, "auditor", *AUDIT, service.url, key="bogus")
        assert audit.code == 1 and audit.result["error"] == "AuthenticationFailed"
        # Neither the post office's reconciliation nor the explicit waiver (nor both):
        # refused before the provider or the device is asked.
        for role, command in (("provider", "withdraw"), ("auditor", "device-audit")):
            unchecked = meter(home, role, command, "--provider", service.url, key=service.operator)
            assert unchecked.code == 1 and unchecked.result["error"] == "InvalidInput"
            assert "--without-post-office" in unchecked.result["message"]
        both = tmp_path / "reconciliation.json"
        both.write_text('{"devices": [], "findings": []}')
        twice = meter(
            home, "auditor", *AUDIT, service.url, "--post-office", str(both), key=service.operator
        )
        assert twice.code == 1 and "not both" in twice.result["message"]
        state = status(home)
        assert state["withdrawing_since"] is None and state["module_state"] != "withdrawn"
        with DeviceClient(home.socket) as client:
            client.logon(*ROLE_USERS["customer"])
            assert client.issue(REQUEST).sequence == 1  # still issuing
    assert refunded(service) == 0
    assert last_audit(service) is None


def test_an_unreachable_provider_leaves_the_device_as_it_was(
    device_home: Home, tmp_path: Path
) -> None:
    home = device_home
    gone = f"http://127.0.0.1:{free_port()}"
    with running_device(home):
        for role, command in (("provider", "withdraw"), ("auditor", "device-audit")):
            run = meter(
                home, role, command, "--provider", gone, "--without-post-office", key="pk_whatever"
            )
            assert run.code == 1
            assert run.result["error"] == "ConfigurationError"
            assert "cannot reach the provider service" in run.result["message"]
        state = status(home)
        assert state["withdrawing_since"] is None and state["module_state"] != "withdrawn"


def test_device_audit_through_the_provider_clears_the_watchdog(
    device_home: Home, tmp_path: Path
) -> None:
    home = device_home
    with provider_service(home, tmp_path / "provider") as service, running_device(home):
        plain = meter(home, "auditor", "device-audit", key=None)  # the unsigned health check
        assert plain.code == 0, plain.stderr
        assert plain.result["signed_report"] is None
        with DeviceClient(home.socket) as client:
            client.logon(*ROLE_USERS["administrator"])
            ahead = datetime.now(UTC) + timedelta(days=121)
            client.post("/v1/clock", {"time": ahead.isoformat()})
        assert status(home)["watchdog"]["level"] == "stop"
        with (
            DeviceClient(home.socket) as client,
            pytest.raises(DeviceLocked, match="device audit"),
        ):
            client.logon(*ROLE_USERS["customer"])
            client.issue(REQUEST)
        run = meter(home, "auditor", *AUDIT, service.url, key=service.operator)
        assert run.code == 0, run.stderr
        assert run.result["watchdog"]["level"] == "ok"
        assert run.result["descending"] == CREDITED
        assert status(home)["watchdog"]["days_since_audit"] == 0
        with DeviceClient(home.socket) as client:
            client.logon(*ROLE_USERS["customer"])
            assert client.issue(REQUEST).sequence == 1  # issuing again
    last = last_audit(service)
    assert last is not None and last["outcome"] == "ok"
    assert last["details"]["post_office_waived"] is True  # the operator said so: recorded
    assert last["details"]["post_office_checked"] is False
    assert last["details"]["clock_skew_s"] > 120 * 86_400  # the provider saw the clock
