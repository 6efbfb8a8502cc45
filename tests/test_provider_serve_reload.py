"""`meter provider serve` as an operator runs it: the reload routes over the home's ledger,
stapling the status `meter provider issue-status` wrote, and the device audit routes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from meter.cli.home import Home
from meter.cli.main import cli
from meter.provider.ledger_sql import open_ledger
from tests._provider_serve import serving
from tests._reload_harness import CUSTOMER, PROVIDER_USER, Harness, prepare_lab

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def meter(home: Home, user: tuple[str, str] | None, *args: str) -> tuple[int, dict[str, object]]:
    who = ["--user", user[0]] if user else []
    env = {"METER_PASSWORD": user[1]} if user else {}
    result = CliRunner().invoke(
        cli, ["--home", str(home.path), "--json", *who, *args], obj={}, env=env
    )
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    return result.exit_code, json.loads(lines[-1]) if lines else {"output": result.output}


@pytest.fixture
def harness(device_home: Home) -> Iterator[Harness]:
    harness = Harness(prepare_lab(device_home))
    harness.start_device()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def served(served_process: tuple[str, subprocess.Popen[str]]) -> str:
    """`meter provider serve` on the lab's ledger, as a process of its own: its URL."""
    return served_process[0]


@pytest.fixture
def served_process(harness: Harness) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`meter provider serve` on the lab's ledger: its URL and its process."""
    lab = harness.lab
    code, status = meter(lab.home, None, "provider", "issue-status")
    assert code == 0 and status["status"] == "GOOD", status
    with serving(lab.home, "--db", lab.ledger) as (base, server):
        yield base, server


def test_the_served_provider_reloads_and_a_revoked_status_stops_it(
    harness: Harness, served: str
) -> None:
    lab = harness.lab
    code, result = meter(lab.home, PROVIDER_USER, "reload", "12.50", "--provider", served)
    assert code == 0, result
    assert result["amount"] == 12_500 and result["provider_settled"] is True
    # The root revokes the provider: serve rereads the file, and the meter refuses it.
    time.sleep(0.01)  # a distinct modification time on coarse file systems
    # The root works from the provider's certificate: serve holds the provider's token.
    code, certs = meter(lab.home, None, "export-certs")
    assert code == 0, certs
    revoke = ("provider", "issue-status", "--revoked", "--provider-cert", str(certs["provider"]))
    wrong = ("provider", "issue-status", "--provider-cert", str(certs["meter"]))
    code, refused = meter(lab.home, None, *wrong)
    assert code != 0 and "not issued by this postal root" in str(refused["message"]), refused
    code, status = meter(lab.home, None, *revoke)
    assert code == 0 and status["status"] == "REVOKED", status
    code, refused = meter(lab.home, PROVIDER_USER, "reload", "1.00", "--provider", served)
    assert code != 0 and "revoked" in str(refused["message"]), refused
    ledger = open_ledger(lab.ledger)
    try:
        assert ledger.credited(lab.serial) == 12_500
        assert ledger.account(CUSTOMER).available == lab.funded - 12_500
        assert ledger.open_transactions(lab.serial) == []
    finally:
        ledger.close()
    assert harness.check()["credit_created"] == 0


def test_serve_mounts_the_audit_and_withdrawal_routes(served: str) -> None:
    """The audit desk is there (it asks for an operator key), where an unmounted route is 404."""
    for path in ("/v1/audits/nonce", "/v1/withdrawals", "/v1/no-such-route"):
        request = urllib.request.Request(
            f"{served}{path}",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        expected = 404 if "no-such" in path else 401
        assert refused.value.code == expected, (path, refused.value.code)


def test_without_a_status_serve_runs_with_reload_off(device_home: Home) -> None:
    status = device_home.path / "provider" / "status.bin"
    assert not status.exists()
    with serving(device_home) as (base, server):
        request = urllib.request.Request(
            f"{base}/v1/reload/hello",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 404
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert "reload is off: no provider status" in err


def test_a_damaged_new_status_is_refused_and_the_last_good_one_kept(
    harness: Harness, served_process: tuple[str, subprocess.Popen[str]]
) -> None:
    """An operator copies a broken status file over the good one: serve says so on its
    error output and keeps stapling the good one, so reloads go on."""
    served, server = served_process
    lab = harness.lab
    status = lab.home.path / "provider" / "status.bin"
    time.sleep(0.01)
    status.write_bytes(b"not a provider status")
    code, result = meter(lab.home, PROVIDER_USER, "reload", "2.00", "--provider", served)
    assert code == 0 and result["amount"] == 2_000, result
    server.send_signal(signal.SIGINT)
    _, err = server.communicate(timeout=30)
    assert f"provider status {status} not taken" in err and "previous one" in err
