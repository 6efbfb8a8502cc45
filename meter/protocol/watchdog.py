"""Inspection watchdog thresholds: how long a meter may go without a successful provider audit.

The thresholds travel inside the provider-signed update bundle (Update PSC,
meter.protocol.update_bundle), so a customer cannot change them. A meter
warns (at every logon and in status) once ``warn_days`` have passed since its
last successful device audit, and refuses Create Indicium once ``stop_days``
have passed, until an audit succeeds. Commercial meters: 90 and 120 days.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meter.errors import InvalidInput

__all__ = ["COMMERCIAL", "MAX_DAYS", "WatchdogThresholds"]

MAX_DAYS = 3650


@dataclass(frozen=True)
class WatchdogThresholds:
    warn_days: int
    stop_days: int

    def __post_init__(self) -> None:
        for name in ("warn_days", "stop_days"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DAYS:
                raise InvalidInput(
                    f"watchdog {name} must be a whole number of days, 1 to {MAX_DAYS}"
                )
        if self.warn_days > self.stop_days:
            raise InvalidInput(
                f"watchdog warn_days ({self.warn_days}) must not exceed stop_days ({self.stop_days})"
            )

    def to_json(self) -> dict[str, int]:
        return {"warn_days": self.warn_days, "stop_days": self.stop_days}

    @classmethod
    def from_json(cls, data: Any, source: str = "watchdog thresholds") -> WatchdogThresholds:
        if not isinstance(data, dict) or set(data) != {"warn_days", "stop_days"}:
            raise InvalidInput(f"{source}: must be an object with exactly warn_days and stop_days")
        try:
            return cls(data["warn_days"], data["stop_days"])
        except InvalidInput as exc:
            raise InvalidInput(f"{source}: {exc}") from exc


COMMERCIAL = WatchdogThresholds(warn_days=90, stop_days=120)
