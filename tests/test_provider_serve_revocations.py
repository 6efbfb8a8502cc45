"""`meter provider serve` and its revocation list while it runs: a meter revoked after the
service started (by its own withdrawal route, or by an operator) gets no credit from the
next handshake on, and a damaged list stops new reloads instead of being ignored."""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meter.cli.provider_serve_cli import default_revocations
from meter.provider.ledger_sqlite import SqliteLedger
from meter.provider.withdrawal import RevocationBook
from tests._reload_harness import CUSTOMER, PROVIDER_USER, Harness
from tests.test_provider_serve_reload import harness, meter, served_process

__all__ = ["harness", "served_process"]  # the fixtures, shared with that module

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def test_a_meter_revoked_while_serve_runs_gets_no_credit_and_a_damaged_list_stops_reloads(
    harness: Harness, served_process: tuple[str, subprocess.Popen[str]]
) -> None:
    served, server = served_process
    lab = harness.lab
    book = RevocationBook(default_revocations(lab.home))
    code, result = meter(lab.home, PROVIDER_USER, "reload", "3.00", "--provider", served)
    assert code == 0 and result["amount"] == 3_000, result

    # An operator's bad copy: no reload starts (a revoked meter in it must not slip by).
    book.path.parent.mkdir(parents=True, exist_ok=True)
    book.path.write_text("[{not json")
    code, refused = meter(lab.home, PROVIDER_USER, "reload", "1.00", "--provider", served)
    assert code != 0 and "revocation list" in str(refused), refused

    # Repaired, and this meter revoked in it: refused at the handshake, no restart.
    book.path.unlink()
    time.sleep(0.01)  # a distinct modification time on coarse file systems
    book.revoke(lab.serial, datetime.now(UTC) - timedelta(seconds=1))
    code, refused = meter(lab.home, PROVIDER_USER, "reload", "1.00", "--provider", served)
    assert code != 0 and "revoked" in str(refused) and str(lab.serial) in str(refused), refused

    ledger = SqliteLedger(Path(lab.ledger))
    try:
        assert ledger.credited(lab.serial) == 3_000
        assert ledger.account(CUSTOMER).available == lab.funded - 3_000
        assert ledger.open_transactions(lab.serial) == []
    finally:
        ledger.close()
    checked = harness.check()
    assert checked["credit_created"] == checked["unresolved"] == 0
    server.send_signal(signal.SIGINT)
    _, err = server.communicate(timeout=30)
    assert "is unreadable" in err and "no reload starts until it is repaired" in err
