"""The device's life-cycle state, kept in its token next to the registers.

What Authorize Customer, Administration Authorization, Key Administration,
Set Clock, Update PSC and Withdraw PSD change. Like the registers, each
change is a new MAC'd generation (meter.psd.generations) in a **private**
token object, made durable before the old one is destroyed. Nothing public
decides what the device does: a caller without the token's PIN can neither
see nor delete these objects.

Which generation is current is not decided here but by the register record,
which pins it (``Registers.state_generation``) under its own MAC. A commit
writes the new state object first, then a register record pinning it; the
register write is the commit point. So on open exactly the pinned
generation is taken: a newer one is an uncommitted change (a crash between
the two writes) and is removed; a missing pinned generation, or only an
older one, is tampering or a rollback, and the device must not operate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from meter.errors import RegisterCorrupt
from meter.protocol.watchdog import WatchdogThresholds
from meter.psd.generations import Generations
from meter.token import DataObject, Token

__all__ = ["STATE_APPLICATION", "DeviceState", "DeviceStateStore", "InstalledPsc"]

STATE_APPLICATION = "meter.state"


@dataclass(frozen=True)
class InstalledPsc:
    """What Update PSC installed, as the MAC'd state records it."""

    version: str
    software_id: int
    bundle_sha256: str
    watchdog: WatchdogThresholds


@dataclass(frozen=True)
class DeviceState:
    generation: int = 1
    customer: str | None = None  # the customer account the provider authorized
    # The provider-signed record that authorized it (canonical JSON, meter/protocol/authorization.py).
    customer_authorization: str | None = None
    administration_authorized: bool = False  # may administrators manage users?
    signing_key_active: bool = True
    withdrawn_at: str | None = None  # ISO time; a withdrawn device never signs again
    withdrawn_for: str | None = None  # the key ceremony that moved this device elsewhere
    withdrawing_since: str | None = None  # Withdraw PSD began (meter time): issuing stops
    last_audit_at: str | None = None  # meter time of the last provider-acknowledged audit
    clock_offset_s: int = 0  # Set Clock: meter time = host UTC clock + offset
    psc_version: str = "1.0.0"
    psc_history: tuple[str, ...] = field(default_factory=tuple)
    # Update PSC: the installed update bundle (meter.psd.psc_store keeps its document,
    # pinned here by SHA-256), its software id and the watchdog thresholds it carries.
    psc_software_id: int | None = None
    psc_bundle_sha256: str | None = None
    psc_watchdog: dict[str, int] | None = None

    @property
    def update_bundle(self) -> InstalledPsc | None:
        """The installed update bundle's figures, or None before the first Update PSC."""
        if self.psc_bundle_sha256 is None or self.psc_software_id is None:
            return None
        watchdog = WatchdogThresholds.from_json(self.psc_watchdog, "installed watchdog")
        return InstalledPsc(
            self.psc_version, self.psc_software_id, self.psc_bundle_sha256, watchdog
        )

    def body(self) -> bytes:
        data = asdict(self)
        data["psc_history"] = list(self.psc_history)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, body: bytes) -> DeviceState:
        try:
            data: dict[str, Any] = json.loads(body)
            data["psc_history"] = tuple(data.get("psc_history", ()))
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise RegisterCorrupt(f"device state object is unreadable: {exc}") from exc

    def next(self, **changes: Any) -> DeviceState:
        return replace(self, generation=self.generation + 1, **changes)


class DeviceStateStore:
    """The current state object of the device in its token."""

    def __init__(
        self, generations: Generations[DeviceState], current: DeviceState, obj: DataObject
    ):
        self._generations = generations
        self._current = current
        self._object = obj

    @property
    def current(self) -> DeviceState:
        return self._current

    @classmethod
    def create(cls, token: Token) -> DeviceStateStore:
        """The first state of a newly provisioned device (refuses if any state exists)."""
        generations = _generations(token)
        if token.data_objects(STATE_APPLICATION):
            raise RegisterCorrupt(f"{token.where}: a device state exists already; not resetting it")
        initial = DeviceState()
        return cls(generations, initial, generations.write("state-1", initial.body()))

    @classmethod
    def open(cls, token: Token, pinned: int) -> DeviceStateStore:
        """The state of generation ``pinned`` (the register record's), MAC checked; others removed."""
        generations = _generations(token)
        chosen, found = generations.exactly(_parsed, lambda s: s.generation, pinned)
        if chosen is None:
            raise RegisterCorrupt(
                f"{token.where}: the device state of generation {pinned}, which the register "
                f"record commits, is missing or fails its MAC ({found} state object(s) found): "
                "the state was deleted, replaced or rolled back; the device must not operate"
            )
        return cls(generations, *chosen)

    def stage(self, new: DeviceState) -> DataObject:
        """Write ``new`` (the next generation) durably; it counts once a register record pins it."""
        if new.generation != self._current.generation + 1:
            raise RegisterCorrupt(
                f"device state update from generation {self._current.generation} to "
                f"{new.generation} is out of order"
            )
        return self._generations.write(f"state-{new.generation}", new.body())

    def committed(self, new: DeviceState, obj: DataObject) -> None:
        """The register record pins ``new`` now: make it current and retire the old object."""
        old, self._object, self._current = self._object, obj, new
        self._generations.retire(old)


def _generations(token: Token) -> Generations[DeviceState]:
    return Generations(token, STATE_APPLICATION)


def _parsed(body: bytes) -> DeviceState | None:
    try:
        return DeviceState.parse(body)
    except RegisterCorrupt:
        return None
