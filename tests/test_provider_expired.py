"""`meter provider expired`: PREPARED reload transactions past PREPARE_TIMEOUT, for the
provider's operators, on SQLite and PostgreSQL.

A real reload session (the firmware over the meter's token, the provider's ReloadServer
over its token and the ledger) whose grant the host loses: the transaction stays PREPARED.
The command judges at `--now` (the 15 minutes need not pass in real time); it lists the
transaction and releases nothing, and the meter's next contact settles it.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _postgres import ledger_location as ledger_location  # a fixture: sqlite, postgresql
from click.testing import CliRunner

from meter.cli.home import Home
from meter.cli.main import cli
from meter.protocol.reload import PREPARE_TIMEOUT
from meter.provider.ledger import TransactionState
from meter.provider.ledger_sql import open_ledger
from tests._reload_lab import CUSTOMER, Lab, meter_and_provider, prepare_lab

pytestmark = pytest.mark.softhsm


def _reload(lab: Lab, amount: int, *, lose_the_grant: bool) -> bytes:
    """One session between the meter and the provider; with ``lose_the_grant`` the host
    drops the grant (a cut connection) and the meter's session is cancelled. The
    transaction id the provider prepared."""
    with meter_and_provider(lab) as (psd, server, _):
        begun = psd.reload_begin(amount)
        step = server.hello(bytes.fromhex(begun["message_hex"]))
        message = step.message
        for _ in range(2):  # accept -> finish, settle -> answers; the answer is the grant
            answer = psd.reload_next(message or b"")
            reply = server.next(step.session_id, bytes.fromhex(answer["message_hex"]))
            message = reply.message
        txid = bytes.fromhex(reply.result["transaction_id"])
        if lose_the_grant:
            psd.reload_cancel()
            return txid
        receipt = psd.reload_next(message or b"")
        server.next(step.session_id, bytes.fromhex(receipt["message_hex"]))
        return txid


def _expired(lab: Lab, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli,
        ["--home", str(lab.home.path), "provider", "expired", "--db", lab.ledger, *args],
        obj={},
    )
    return result.exit_code, result.output


def _listed(lab: Lab, *args: str) -> dict[str, Any]:
    code, output = _expired(lab, "--json", *args)
    assert code == 0, output
    answer: dict[str, Any] = json.loads(output.splitlines()[-1])
    return answer


def test_expired_lists_a_lost_grant_and_leaves_it_to_the_next_contact(
    device_home: Home, ledger_location: str
) -> None:
    lab = prepare_lab(device_home, ledger_location)
    lost = _reload(lab, 7_000, lose_the_grant=True)
    ledger = open_ledger(lab.ledger)
    try:
        prepared = ledger.transaction(lost)
        assert prepared is not None and prepared.state is TransactionState.PREPARED
        before = ledger.account(CUSTOMER)
    finally:
        ledger.close()
    assert before.reserved == 7_000

    assert _listed(lab)["expired"] == []  # not 15 minutes old yet
    later = prepared.prepared_at + PREPARE_TIMEOUT + timedelta(minutes=1)
    listed = _listed(lab, "--now", later.isoformat())
    assert listed["expired"] == [
        {
            "transaction_id": lost.hex(),
            "device_serial": lab.serial,
            "customer": CUSTOMER,
            "amount": 7_000,
            "prepared_at": prepared.prepared_at.isoformat(),
            "expires_at": prepared.expires_at.isoformat(),
            "age_s": 16 * 60,
        }
    ]
    assert listed["reserved"] == 7_000 and listed["timeout_s"] == 900
    assert "next contact" in listed["note"] and "never released blindly" in listed["note"]
    code, text = _expired(lab, "--now", later.isoformat())
    assert code == 0 and lost.hex() in text and "age 16 min" in text, text
    assert "next contact" in text

    ledger = open_ledger(lab.ledger)
    try:  # listing released nothing
        assert ledger.account(CUSTOMER) == before
    finally:
        ledger.close()
    # The meter's next contact settles it: its signed "not applied" aborts it.
    _reload(lab, 1_000, lose_the_grant=False)
    ledger = open_ledger(lab.ledger)
    try:
        aborted = ledger.transaction(lost)
        assert aborted is not None and aborted.state is TransactionState.ABORTED
        assert ledger.account(CUSTOMER).reserved == 0
    finally:
        ledger.close()
    assert _listed(lab, "--now", later.isoformat())["expired"] == []


def test_expired_refuses_a_time_it_cannot_place(tmp_path: Path) -> None:
    command = ["--home", str(tmp_path), "provider", "expired", "--db", str(tmp_path / "a.db")]
    for when, refusal in (("2026-12-02T09:00:00", "has no time zone"), ("soon", "not an ISO")):
        result = CliRunner().invoke(cli, [*command, "--now", when], obj={})
        assert result.exit_code == 1 and refusal in result.output, result.output
    assert not (tmp_path / "a.db").exists()  # refused before the ledger was opened
