"""The device's firmware: one user at a time, every service of Table 2 behind its roles.

`PSD` puts together the core (meter.psd.firmware_core: power, sessions,
self-tests, over meter.psd.firmware_boundary: who is calling and the service
boundary), the status reports (meter.psd.services_status)
and the services, grouped by what they manage (meter.psd.services_admin,
meter.psd.services_meter, meter.psd.services_withdrawal: device audit and
Withdraw PSD). The
device process (meter.psd.daemon) is the only one that holds a PSD; every
user reaches it as a client of the device's socket.
"""

from __future__ import annotations

from meter.psd.firmware_core import (
    AUDIT_KEY_LABEL,
    CRYPTO_SERVICES,
    KEY_EXCHANGE_LABEL,
    Caller,
    ModuleState,
    Session,
)
from meter.psd.services_admin import AdminServices, secrets_for
from meter.psd.services_custody import CustodyServices
from meter.psd.services_meter import MeterServices
from meter.psd.services_reload import ReloadServices

__all__ = [
    "AUDIT_KEY_LABEL",
    "CRYPTO_SERVICES",
    "KEY_EXCHANGE_LABEL",
    "PSD",
    "Caller",
    "ModuleState",
    "Session",
    "secrets_for",
]


class PSD(AdminServices, MeterServices, CustodyServices, ReloadServices):
    """The firmware of one device over its token; one instance per device process."""
