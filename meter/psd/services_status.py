"""Rule 8's Show Status: what Request Status reports, shared by the services that
report the device's state (Key Administration, Authorize PSD, Request Device Audit)."""

from __future__ import annotations

from typing import Any

from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.device_state import DeviceState
from meter.psd.firmware_core import AUDIT_KEY_LABEL, KEY_EXCHANGE_LABEL, FirmwareCore, ModuleState
from meter.psd.register_store import MAC_KEY_LABEL
from meter.psd.roles import Service
from meter.psd.watchdog import watchdog_of

__all__ = ["StatusServices", "psc_status"]


class StatusServices(FirmwareCore):
    def module_state(self) -> str:
        if self._device_state().withdrawn_at is not None:
            return ModuleState.WITHDRAWN
        if self._error is not None:
            return ModuleState.ERROR
        if not self.unlocked:
            # Every object in the token is private: before a logon, only the user store
            # tells a provisioned device (it has users) from a new one.
            return ModuleState.LOCKED if self.users.count() else ModuleState.UNINITIALIZED
        if self._meter is None:
            return ModuleState.UNINITIALIZED
        if self._meter.certificates is None:
            return ModuleState.INITIALIZED
        return ModuleState.AUTHORIZED

    def request_status(self) -> dict[str, Any]:
        """Request Status (every role): rule 8's Show Status."""
        with self._service(Service.REQUEST_STATUS) as out:
            status = self._status()
            out["module_state"] = status["module_state"]
        return status

    def _status(self) -> dict[str, Any]:
        caller = self.caller()
        state = self._device_state()
        meter = self._meter
        watchdog = watchdog_of(meter, self.meter_now())  # the inspection watchdog's warning
        registers = None
        if meter is not None and caller.user_id is not None:
            r = meter.registers
            registers = {
                "ascending": r.ascending,
                "descending": r.descending,
                "control_total": r.control_total,
                "piece_count": r.sequence,
            }
        return {
            "user_id": caller.user_id,
            "role": caller.role.value,
            "module_state": self.module_state(),
            "error": self._error,
            "session": self.session_info(),
            "keys": self._key_status(state),
            "registers": registers,
            "piece_count": registers["piece_count"] if registers else None,
            "device_serial": meter.identity.device_serial if meter else None,
            "customer": state.customer,
            "administration_authorized": state.administration_authorized,
            "psc_version": state.psc_version,
            "psc": psc_status(state, meter),
            "withdrawn_at": state.withdrawn_at,
            # A move's ceremony id: its rerun asks for the documents it kept (docs/custody.md).
            "withdrawn_for": state.withdrawn_for,
            "withdrawing_since": state.withdrawing_since,
            "last_audit_at": state.last_audit_at,
            "watchdog": None if watchdog is None else watchdog.to_json(),
            "time": self.meter_now().isoformat(),
            "clock_offset_s": state.clock_offset_s,
            "self_tests": self.self_tests.to_json() if self.self_tests else None,
            "state_verified": meter is not None,
            "unlocked": self.unlocked,
        }

    def _key_status(self, state: DeviceState) -> dict[str, Any]:
        logged_on = self._session is not None and self.unlocked
        keys: dict[str, Any] = {}
        for label, kind in (
            (SIGNING_KEY_LABEL, "private"),
            (MAC_KEY_LABEL, "secret"),
            (AUDIT_KEY_LABEL, "private"),
            (KEY_EXCHANGE_LABEL, "private"),
        ):
            if not logged_on:
                keys[label] = {"present": None, "detail": "log on to inspect"}
                continue
            if not self.token.has_key(label):
                keys[label] = {"present": False}
                continue
            attributes = self.token.key_attributes(label, kind)  # type: ignore[arg-type]
            keys[label] = {"present": True, **attributes}
        keys[SIGNING_KEY_LABEL]["state"] = "active" if state.signing_key_active else "inactive"
        return keys


def psc_status(state: DeviceState, meter: Meter | None) -> dict[str, Any]:
    """The installed software (Update PSC): version, the software id every indicium prints,
    the installed bundle's SHA-256, its rate table and watchdog thresholds."""
    installed = state.update_bundle
    bundle = meter.bundle if meter is not None else None
    software_id = installed.software_id if installed is not None else None
    if software_id is None and meter is not None:
        software_id = meter.identity.software_id
    return {
        "version": state.psc_version,
        "software_id": software_id,
        "bundle_sha256": installed.bundle_sha256 if installed is not None else None,
        "rate_table": bundle.contents.rates.name if bundle is not None else None,
        "watchdog": installed.watchdog.to_json() if installed is not None else None,
        "history": list(state.psc_history),
    }
