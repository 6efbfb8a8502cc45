"""The inspection watchdog: warn from 90 days without a successful provider audit, refuse to
issue from 120, an acknowledged audit clears it; the thresholds are the provider's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meter.cli.home import Home
from meter.errors import AccessDenied, DeviceLocked, ProtocolError
from meter.protocol.device_audit import DeviceAuditReport
from meter.protocol.watchdog import COMMERCIAL, WatchdogThresholds
from meter.provider.audits import WITHOUT_POST_OFFICE
from meter.psd.device_state import DeviceState
from meter.psd.firmware import PSD
from meter.psd.watchdog import WatchdogLevel, evaluate, thresholds_for
from tests._audit_lab import ProviderLab, provider_lab
from tests.conftest import LETTER, ROLE_USERS, Clock

START = datetime(2026, 1, 1, tzinfo=UTC)


# -- pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "level"),
    [
        (0, WatchdogLevel.OK),
        (89, WatchdogLevel.OK),
        (90, WatchdogLevel.WARN),
        (119, WatchdogLevel.WARN),
        (120, WatchdogLevel.STOP),
        (400, WatchdogLevel.STOP),
    ],
)
def test_commercial_meters_warn_at_90_days_and_stop_at_120(days: int, level: WatchdogLevel) -> None:
    now = START + timedelta(days=days, hours=1)
    status = evaluate(now, START.isoformat(), START, COMMERCIAL, "test")
    assert status.level is level and status.days == days
    if level is WatchdogLevel.OK:
        assert status.warning is None
        status.refuse("Create Indicium")  # nothing raised
    else:
        assert status.warning is not None and f"{days} days" in status.warning
    if level is WatchdogLevel.STOP:
        with pytest.raises(DeviceLocked, match=f"Create Indicium is refused: {days} days"):
            status.refuse("Create Indicium")


def test_never_audited_counts_from_authorization_and_a_clock_set_back_counts_zero() -> None:
    status = evaluate(START + timedelta(days=95), None, START, COMMERCIAL, "test")
    assert status.level is WatchdogLevel.WARN and "authorization" in status.since_what
    back = evaluate(START - timedelta(days=30), START.isoformat(), START, COMMERCIAL, "test")
    assert back.days == 0 and back.level is WatchdogLevel.OK


def test_thresholds_come_from_the_installed_signed_bundle_else_the_firmware() -> None:
    assert thresholds_for(DeviceState()) == (COMMERCIAL, "the firmware's commercial defaults")
    installed = DeviceState(
        psc_version="1.1.0",
        psc_software_id=2,
        psc_bundle_sha256="ab" * 32,
        psc_watchdog={"warn_days": 30, "stop_days": 45},
    )
    thresholds, source = thresholds_for(installed)
    assert thresholds == WatchdogThresholds(30, 45) and "provider-signed" in source


# -- the device on SoftHSM2 ------------------------------------------------------------


def _customer_after(psd: PSD, clock: Clock, days: int) -> dict[str, object]:
    """Move the host clock on (the open session idles out) and log the customer on."""
    clock.now += timedelta(days=days)
    psd.reap()
    return psd.logon(*ROLE_USERS["customer"])


def _audit(psd: PSD, lab: ProviderLab) -> None:
    nonce = lab.desk.new_nonce(lab.serial, datetime.now(UTC))
    report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
    psd.acknowledge_device_audit(
        lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), WITHOUT_POST_OFFICE)
    )


@pytest.mark.softhsm
def test_warn_at_logon_and_in_status_then_stop_then_an_audit_clears_it(
    psd: PSD, clock: Clock, device_home: Home, tmp_path: Path
) -> None:
    first = _customer_after(psd, clock, 0)
    assert "watchdog" not in first
    psd.create_indicium(LETTER)

    warned = _customer_after(psd, clock, 91)
    watchdog = warned["watchdog"]
    assert isinstance(watchdog, dict) and watchdog["level"] == "warn"
    assert "inspection due" in watchdog["warning"]
    assert psd.request_status()["watchdog"]["level"] == "warn"
    psd.create_indicium(LETTER)  # warned, still issuing
    logged = [r for r in psd.audit.records() if r.service == "watchdog"]
    assert logged and logged[-1].outcome == "warn"

    stopped = _customer_after(psd, clock, 30)  # 121 days since authorization
    assert stopped["watchdog"]["level"] == "stop"  # type: ignore[index]
    with pytest.raises(DeviceLocked, match="Create Indicium is refused: 121 days"):
        psd.create_indicium(LETTER)
    with pytest.raises(DeviceLocked, match="121 days"):
        psd.create_correction_indicium(LETTER, 1)
    with pytest.raises(DeviceLocked, match="121 days"):
        psd.create_indicium_batch([LETTER, LETTER])
    assert psd.retrieve_psd_status()["piece_count"] == 2  # the refusals issued nothing

    with provider_lab(device_home, tmp_path / "provider") as lab:
        _audit(psd, lab)
    assert psd.request_status()["watchdog"]["level"] == "ok"
    assert psd.create_indicium(LETTER).sequence == 3


@pytest.mark.softhsm
def test_a_customer_cannot_move_the_thresholds_or_the_clock(psd: PSD, clock: Clock) -> None:
    _customer_after(psd, clock, 0)
    before = psd.request_status()["watchdog"]
    with pytest.raises(AccessDenied, match="Update PSC"):
        psd.update_psc(b'{"watchdog": {"warn_days": 3650, "stop_days": 3650}}')
    with pytest.raises(AccessDenied, match="Set Clock"):
        psd.set_clock(datetime.now(UTC) - timedelta(days=300))
    after = psd.request_status()["watchdog"]
    assert after == before and after["stop_days"] == 120


@pytest.mark.softhsm
def test_an_acknowledgement_a_day_late_does_not_count(
    psd: PSD, clock: Clock, device_home: Home, tmp_path: Path
) -> None:
    _customer_after(psd, clock, 0)
    with provider_lab(device_home, tmp_path / "provider") as lab:
        nonce = lab.desk.new_nonce(lab.serial, datetime.now(UTC))
        report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
        ack = lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), WITHOUT_POST_OFFICE)
        clock.now += timedelta(hours=25)
        with pytest.raises(ProtocolError, match="older than"):
            psd.acknowledge_device_audit(ack)
    assert psd.request_status()["last_audit_at"] is None
