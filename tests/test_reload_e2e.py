"""Reload end to end: the device process (`meterd`), the provider's HTTP service (uvicorn
over the accounts ledger, SQLite and PostgreSQL) and the ``meter`` command relaying
between them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from _postgres import ledger_location as ledger_location  # a fixture: sqlite, postgresql
from click.testing import CliRunner

from meter.cli.home import Home
from meter.cli.main import cli
from meter.provider.ledger_sql import open_ledger
from tests._reload_harness import AUTHORITY_USER, CUSTOMER, PROVIDER_USER, Harness, prepare_lab

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def meter(home: Home, user: tuple[str, str], *args: str) -> tuple[int, dict[str, object]]:
    result = CliRunner().invoke(
        cli,
        ["--home", str(home.path), "--json", "--user", user[0], *args],
        obj={},
        env={"METER_PASSWORD": user[1]},
    )
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    return result.exit_code, json.loads(lines[-1]) if lines else {"output": result.output}


@pytest.fixture
def harness(device_home: Home, ledger_location: str) -> Iterator[Harness]:
    lab = prepare_lab(device_home, ledger_location)
    harness = Harness(lab)
    harness.start_device()
    try:
        yield harness
    finally:
        harness.close()


def test_reload_through_the_device_process_the_provider_service_and_the_cli(
    harness: Harness,
) -> None:
    lab = harness.lab
    # Authorize PSD for the reload key through the command (a new certificate replaces
    # the lab's), while the provider's token is free; then the provider's service starts.
    code, certified = meter(lab.home, AUTHORITY_USER, "reload-certify")
    assert code == 0, certified
    assert int(str(certified["certificate_serial"])) > 0
    harness.start_provider()
    code, result = meter(lab.home, PROVIDER_USER, "reload", "25.00", "--provider", harness.url())
    assert code == 0, result
    assert result["amount"] == 25_000 and result["provider_settled"] is True
    assert result["control_total"] == lab.baseline + 25_000
    ledger = open_ledger(lab.ledger)
    try:
        assert ledger.credited(lab.serial) == 25_000
        assert ledger.account(CUSTOMER).available == lab.funded - 25_000
    finally:
        ledger.close()
    assert harness.check()["credit_created"] == 0


def test_the_cli_reports_refusals_clearly(harness: Harness) -> None:
    lab = harness.lab
    harness.start_provider()
    code, out = meter(lab.home, PROVIDER_USER, "reload", "0", "--provider", harness.url())
    assert code != 0 and "positive" in str(out), out
    code, out = meter(lab.home, PROVIDER_USER, "reload", "5.00", "--provider", "http://127.0.0.1:9")
    assert code != 0 and "unreachable" in str(out) and "nothing is pending" in str(out)
    too_much = f"{(lab.funded + 1000) / 1000:.3f}"
    code, out = meter(lab.home, PROVIDER_USER, "reload", too_much, "--provider", harness.url())
    assert code != 0 and out["error"] == "InsufficientFunds", out
    assert "available" in str(out["message"]), out
    checked = harness.check()
    assert checked["applied"] == checked["credited"] == 0
    assert checked["unresolved"] == 0
