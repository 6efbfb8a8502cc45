"""The provider's credited export counts reload credit: a meter that reloads over the real
protocol (the device process, `meter provider serve`, the `meter` command relaying) is
reconciled clean at the post office against `meter provider export-credited`, and its
device audit given that reconciliation succeeds; a stale export produces the finding, and
the audit given that reconciliation fails, recorded as failed, the watchdog not reset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.main import cli
from meter.provider import Provider
from meter.provider.api_keys import ApiKeys, KeyRole
from meter.provider.ledger_sqlite import SqliteLedger
from tests._audit_lab import local_grant_id
from tests._provider_serve import serving
from tests._reload_harness import AUDITOR_USER, CUSTOMER, PROVIDER_USER, Lab, prepare_lab
from tests.conftest import ROLE_USERS

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

CUSTOMER_USER = ROLE_USERS["customer"]
LOCAL_GRANT = 100_000  # what conftest.set_up's local signed grant credited the meter


def meter(
    home: Home, user: tuple[str, str] | None, *args: str, key: str | None = None
) -> tuple[int, dict[str, Any]]:
    """`meter --json ...` in this process; the exit code and the last JSON object printed."""
    who = ["--user", user[0]] if user else []
    env = {"METER_PASSWORD": user[1]} if user else {}
    if key is not None:
        env["METER_PROVIDER_KEY"] = key
    result = CliRunner().invoke(
        cli, ["--home", str(home.path), "--json", *who, *args], obj={}, env=env
    )
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    return result.exit_code, json.loads(lines[-1]) if lines else {"output": result.output}


@contextmanager
def served(lab: Lab) -> Iterator[str]:
    """`meter provider serve` on the lab's accounts ledger (reload and audit routes), as a
    process of its own; it holds the provider's token while it runs."""
    with serving(lab.home, "--db", str(lab.ledger)) as (base, _):
        yield base


def record_local_grant(lab: Lab) -> None:
    """The provider's accounts hold every credit it sold: the lab's local grant too, under
    its own transaction id (so the export must count it once, not twice)."""
    now = datetime.now(UTC)
    ledger = SqliteLedger(Path(lab.ledger))
    try:
        txid = local_grant_id(lab.home)
        ledger.prepare(txid, CUSTOMER, lab.serial, LOCAL_GRANT, now, now + timedelta(hours=1))
        ledger.commit(txid, b"the lab's local signed grant", now)
    finally:
        ledger.close()


def export(lab: Lab, out: Path) -> dict[str, int]:
    code, summary = meter(
        lab.home, None, "provider", "export-credited", "--db", str(lab.ledger), "--out", str(out)
    )
    assert code == 0, summary
    devices: dict[str, int] = json.loads(out.read_text())["devices"]
    return devices


def reconcile(home: Home, credited: Path, out: Path, exit_code: int) -> dict[str, Any]:
    code, report = meter(home, None, "postoffice", "reconcile", "--credited", str(credited))
    assert code == exit_code, report
    out.write_text(json.dumps(report))
    return report


def issue(home: Home, postage: str) -> str:
    code, out = meter(
        home,
        CUSTOMER_USER,
        *("issue", "--postage", postage, "--from-zip", "94043", "--to-zip", "62704"),
        *("--to", "Jane|1 Main St"),
    )
    assert code == 0, out
    return str(out["indicium_hex"])


def verify_all(home: Home, hexes: list[str], folder: Path) -> list[str]:
    listing = folder / "pieces.txt"
    listing.write_text("".join(h + "\n" for h in hexes))
    result = CliRunner().invoke(
        cli, ["--home", str(home.path), "verify-batch", "--workers", "2", str(listing)], obj={}
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line)["verdict"] for line in result.stdout.splitlines()]


def last_audit(lab: Lab) -> dict[str, Any] | None:
    ledger = SqliteLedger(Path(lab.ledger))
    try:
        return ledger.last_audit(lab.serial)
    finally:
        ledger.close()


def test_reload_credit_is_exported_reconciled_and_audited(
    device_home: Home, tmp_path: Path
) -> None:
    lab = prepare_lab(device_home)
    home, serial = lab.home, str(lab.serial)
    record_local_grant(lab)
    code, status = meter(home, None, "provider", "issue-status")  # what serve staples
    assert code == 0, status
    operator = ApiKeys(home.path / "provider" / "keys.json").add("desk", KeyRole.OPERATOR)
    with running_device(home):
        with served(lab) as url:
            code, first = meter(home, PROVIDER_USER, "reload", "25.00", "--provider", url)
            assert code == 0 and first["provider_settled"] is True, first
        stale = tmp_path / "credited-stale.json"  # exported between the two reloads
        assert export(lab, stale) == {serial: LOCAL_GRANT + 25_000}
        with served(lab) as url:
            code, second = meter(home, PROVIDER_USER, "reload", "10.00", "--provider", url)
            assert code == 0 and second["provider_settled"] is True, second
        pieces = [issue(home, "0.73"), issue(home, "0.50"), issue(home, "1.20")]
        credited = tmp_path / "credited.json"
        # The COMMITTED credit of the accounts ledger, the local grant counted once.
        assert export(lab, credited) == {serial: LOCAL_GRANT + 35_000}
        assert verify_all(home, pieces, tmp_path) == ["VALID"] * 3

        clean = reconcile(home, credited, tmp_path / "reconciliation.json", exit_code=0)
        assert clean["credited_checked"] is True and clean["findings"] == []
        (device,) = clean["devices"]
        assert device["credited"] == LOCAL_GRANT + 35_000 and device["last_sequence"] == 3

        # A stale export (the credit of the second reload missing): the post office finds
        # a control total above what the provider credited.
        found = reconcile(home, stale, tmp_path / "reconciliation-stale.json", exit_code=3)
        assert {f["kind"] for f in found["findings"]} == {"register-sum"}
        # An export altered after signing is refused, not believed.
        altered = json.loads(credited.read_text())
        altered["devices"][serial] += 1
        forged = tmp_path / "credited-forged.json"
        forged.write_text(json.dumps(altered))
        code, refused = meter(home, None, "postoffice", "reconcile", "--credited", str(forged))
        assert code == 1 and "does not verify" in str(refused["message"]), refused

        with served(lab) as url:
            audit = ("device-audit", "--provider", url, "--post-office")
            stale_audit = str(tmp_path / "reconciliation-stale.json")
            code, failed = meter(home, AUDITOR_USER, *audit, stale_audit, key=operator)
            assert code == 1 and failed["error"] == "AuditFailed", failed
            assert "register-sum" in failed["message"]
            recorded = last_audit(lab)
            assert recorded is not None and recorded["outcome"] == "failed"
            assert any("register-sum" in f for f in recorded["details"]["findings"])
            _, status = meter(home, AUDITOR_USER, "status")
            assert status["last_audit_at"] is None  # the watchdog was not reset

            good = str(tmp_path / "reconciliation.json")
            code, audited = meter(home, AUDITOR_USER, *audit, good, key=operator)
            assert code == 0, audited
            assert audited["watchdog"]["level"] == "ok"
    recorded = last_audit(lab)
    assert recorded is not None and recorded["outcome"] == "ok"
    assert recorded["details"]["post_office_checked"] is True
    assert recorded["details"]["post_office_waived"] is False


def test_the_export_adds_reload_credit_to_local_grants_and_never_counts_one_twice(
    device_home: Home, tmp_path: Path
) -> None:
    """In-process, over a real accounts ledger: COMMITTED reload credit plus the home's local
    grants; PREPARED and ABORTED credit not at all; a local grant that the accounts ledger
    also holds (same transaction id) once; no accounts ledger: the local grants alone."""
    lab = prepare_lab(device_home)
    now = datetime.now(UTC)
    other = lab.serial + 1
    ledger = SqliteLedger(Path(lab.ledger))
    try:
        ledger.authorize_meter(CUSTOMER, other, now)
        later = now + timedelta(minutes=15)
        for txid, device, amount in (
            (bytes(16 * [1]), lab.serial, 25_000),
            (bytes(16 * [2]), other, 4_000),
            (bytes(16 * [3]), lab.serial, 7_000),  # stays PREPARED
            (bytes(16 * [4]), lab.serial, 9_000),  # ABORTED
        ):
            ledger.prepare(txid, CUSTOMER, device, amount, now, later)
        ledger.commit(bytes(16 * [1]), b"receipt", now)
        ledger.commit(bytes(16 * [2]), b"receipt", now)
        ledger.abort(bytes(16 * [4]), "not applied", now)
        with lab.home.open_token("provider") as token:
            provider = Provider.open(token, lab.home.ledger)
            exported = provider.export_credited(now, ledger)
            assert exported["devices"] == {str(lab.serial): LOCAL_GRANT + 25_000, str(other): 4_000}
            local_only = provider.export_credited(now, None)
            assert local_only["devices"] == {str(lab.serial): LOCAL_GRANT}
            txid = local_grant_id(lab.home)
            ledger.prepare(txid, CUSTOMER, lab.serial, LOCAL_GRANT, now, later)
            ledger.commit(txid, b"the local grant, in the accounts too", now)
            once = provider.export_credited(now, ledger)
            assert once["devices"] == {str(lab.serial): LOCAL_GRANT + 25_000, str(other): 4_000}
    finally:
        ledger.close()


def test_export_credited_refuses_a_named_ledger_that_does_not_exist(
    device_home: Home, tmp_path: Path
) -> None:
    out = tmp_path / "credited.json"
    missing = tmp_path / "no-such-ledger.sqlite"
    code, refused = meter(
        device_home, None, "provider", "export-credited", "--db", str(missing), "--out", str(out)
    )
    assert code == 1 and "no accounts ledger" in str(refused["message"]), refused
    assert not out.exists() and not missing.exists()
