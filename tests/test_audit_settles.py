"""What a device audit settles and counts beyond the accounts ledger's COMMITTED credit:

- a withdrawal's final report commits the reload whose receipt was lost (its signed
  control total proves the meter applied it, and a withdrawing meter has no next reload
  to hand the receipt over), so the customer's funds do not stay reserved for credit the
  refund pays back; and only when the figures prove exactly that;
- the lab's local signed grants count as credit the provider granted: the README's flow
  (local credit, then a reload, then `meter device-audit`) audits clean.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.workflows import DEMO_CUSTOMER
from meter.protocol.device_audit import DeviceAuditReport
from meter.provider.api_keys import ApiKeys, KeyRole
from meter.provider.audits import WITHOUT_POST_OFFICE, AuditFailed
from meter.provider.ledger import TransactionState
from meter.psd.firmware import PSD
from tests._audit_lab import provider_lab
from tests._reload_harness import AUDITOR_USER, PROVIDER_USER, prepare_lab
from tests.conftest import ROLE_USERS
from tests.test_reconcile_reload import last_audit, meter, served

pytestmark = pytest.mark.softhsm

# The lab's meter holds 100,000 mills (conftest.set_up). The books below say 60,000 were
# committed; the rest came under an open transaction whose receipt never arrived.
COMMITTED = 60_000


def _final_report(device_home: Home, tmp_path: Path, open_amount: int) -> None:
    with (
        provider_lab(device_home, tmp_path / "provider", credited=COMMITTED) as lab,
        PSD.power_up(device_home.open_device_token(), device_home.device) as psd,
    ):
        psd.logon(*ROLE_USERS["provider"])
        now = datetime.now(UTC)
        txid = bytes(16 * [9])
        lab.ledger.prepare(
            txid, DEMO_CUSTOMER, lab.serial, open_amount, now, now + timedelta(minutes=15)
        )
        step = psd.withdraw_psd(nonce=lab.desk.new_nonce(lab.serial, now))
        report = DeviceAuditReport.from_json(step["signed_report"], "final report")
        available = lab.ledger.available(DEMO_CUSTOMER)
        if COMMITTED + open_amount == report.control_total:
            lab.withdrawals.final_audit(report, lab.meter_certificate, now, WITHOUT_POST_OFFICE)
            settled = lab.ledger.transaction(txid)
            assert settled is not None and settled.state is TransactionState.COMMITTED
            assert settled.receipt == report.to_bytes()  # the signed report is the proof
            assert lab.ledger.open_transactions(lab.serial) == []
            assert lab.ledger.credited(lab.serial) == report.control_total
            recorded = lab.ledger.last_audit(lab.serial)
            assert recorded is not None
            assert recorded["details"]["committed_applied"] == [txid.hex()]
            # Refunded: the descending register, paid from funds already taken.
            assert lab.ledger.available(DEMO_CUSTOMER) == available + report.descending
        else:
            with pytest.raises(AuditFailed, match="control total"):
                lab.withdrawals.final_audit(report, lab.meter_certificate, now, WITHOUT_POST_OFFICE)
            still = lab.ledger.transaction(txid)
            assert still is not None and still.state is TransactionState.PREPARED
            assert lab.ledger.available(DEMO_CUSTOMER) == available  # no refund either


def test_a_withdrawal_commits_the_reload_whose_receipt_was_lost(
    device_home: Home, tmp_path: Path
) -> None:
    _final_report(device_home, tmp_path, open_amount=40_000)


def test_a_withdrawal_commits_nothing_the_figures_do_not_prove(
    device_home: Home, tmp_path: Path
) -> None:
    _final_report(device_home, tmp_path, open_amount=30_000)


@pytest.mark.slow
def test_local_credit_then_a_reload_audits_clean(device_home: Home) -> None:
    """The README's walk-through: the lab's local grant, a reload over the provider's
    service, then a device audit through that service: no control-total finding."""
    lab = prepare_lab(device_home)
    home = lab.home
    code, status = meter(home, None, "provider", "issue-status")
    assert code == 0, status
    operator = ApiKeys(home.path / "provider" / "keys.json").add("desk", KeyRole.OPERATOR)
    with running_device(home), served(lab) as url:
        code, reloaded = meter(home, PROVIDER_USER, "reload", "25.00", "--provider", url)
        assert code == 0 and reloaded["provider_settled"] is True, reloaded
        audit = ("device-audit", "--provider", url, "--without-post-office")
        code, audited = meter(home, AUDITOR_USER, *audit, key=operator)
        assert code == 0, audited
    recorded = last_audit(lab)
    assert recorded is not None and recorded["outcome"] == "ok", recorded
    assert recorded["details"]["post_office_waived"] is True
