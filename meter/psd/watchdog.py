"""The inspection watchdog: a meter not audited by its provider for too long stops issuing.

The clock runs from the meter's last successful provider audit (a provider-signed
acknowledgement the meter verified, DeviceState.last_audit_at) or, for a meter
never audited, from its authorization (the meter certificate's notBefore: the
provider certified it then). Days are counted on the meter's own clock. Past
``warn_days`` the meter warns at every logon and in Request Status; from
``stop_days`` on it refuses Create Indicium, Create Correction Indicium and
batches until an audit succeeds. The thresholds are the provider's
(`thresholds_for`), never the customer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from meter.errors import DeviceLocked
from meter.protocol.watchdog import COMMERCIAL, WatchdogThresholds
from meter.psd.device import Meter
from meter.psd.device_state import DeviceState

__all__ = ["WatchdogLevel", "WatchdogStatus", "evaluate", "thresholds_for", "watchdog_of"]


class WatchdogLevel(StrEnum):
    OK = "ok"
    WARN = "warn"
    STOP = "stop"


def thresholds_for(state: DeviceState) -> tuple[WatchdogThresholds, str]:
    """THE ONE PLACE that picks the thresholds, and says where they came from.

    The provider-signed update bundle installed by Update PSC carries them
    (meter.protocol.update_bundle), which the MAC'd device state records
    (DeviceState.update_bundle). Until a bundle is installed, the commercial
    thresholds of meter.protocol.watchdog apply: they are compiled into the
    firmware, so a customer cannot change them either.
    """
    bundle = state.update_bundle
    if bundle is not None:
        return bundle.watchdog, f"the provider-signed update bundle (PSC {bundle.version})"
    return COMMERCIAL, "the firmware's commercial defaults"


@dataclass(frozen=True)
class WatchdogStatus:
    level: WatchdogLevel
    days: int  # whole days since `since` on the meter's clock
    since: datetime
    since_what: str  # "the last successful provider audit" or "authorization"
    thresholds: WatchdogThresholds
    source: str

    @property
    def warning(self) -> str | None:
        if self.level is WatchdogLevel.OK:
            return None
        if self.level is WatchdogLevel.WARN:
            left = self.thresholds.stop_days - self.days
            return (
                f"inspection due: {self.days} days since {self.since_what} "
                f"({self.since.isoformat()}); issuing stops at {self.thresholds.stop_days} "
                f"days ({left} left): ask the provider for a device audit"
            )
        return (
            f"inspection overdue: {self.days} days since {self.since_what} "
            f"({self.since.isoformat()}), the limit is {self.thresholds.stop_days}; issuing "
            "is refused until a device audit by the provider succeeds"
        )

    def refuse(self, service: str) -> None:
        """DeviceLocked naming the days and what to do, from stop_days on."""
        if self.level is WatchdogLevel.STOP:
            raise DeviceLocked(
                f"{service} is refused: {self.days} days since {self.since_what} "
                f"({self.since.isoformat()}), the provider allows "
                f"{self.thresholds.stop_days}; have the provider run a device audit "
                "(Request Device Audit, then its acknowledgement) to resume issuing"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level.value,
            "days_since_audit": self.days,
            "since": self.since.isoformat(),
            "since_what": self.since_what,
            **self.thresholds.to_json(),
            "thresholds_from": self.source,
            "warning": self.warning,
        }


def evaluate(
    now: datetime,
    last_audit_at: str | None,
    authorized_at: datetime,
    thresholds: WatchdogThresholds,
    source: str,
) -> WatchdogStatus:
    """The watchdog's verdict at meter time ``now``.

    A clock set back before the last audit counts as zero days, not negative ones.
    """
    if last_audit_at is not None:
        since, what = datetime.fromisoformat(last_audit_at), "the last successful provider audit"
    else:
        since, what = authorized_at, "authorization (no provider audit yet)"
    days = max(0, (now - since).days)
    if days >= thresholds.stop_days:
        level = WatchdogLevel.STOP
    elif days >= thresholds.warn_days:
        level = WatchdogLevel.WARN
    else:
        level = WatchdogLevel.OK
    return WatchdogStatus(level, days, since, what, thresholds, source)


def watchdog_of(meter: Meter | None, now: datetime) -> WatchdogStatus | None:
    """The watchdog of a certified meter at meter time ``now``; None where it does not apply
    (no records readable, not certified yet, or withdrawn: nothing can be issued)."""
    if meter is None or meter.certificates is None or meter.state.withdrawn_at is not None:
        return None
    thresholds, source = thresholds_for(meter.state)
    authorized = meter.certificates.meter.not_valid_before_utc
    return evaluate(now, meter.state.last_audit_at, authorized, thresholds, source)
