"""The device's life-cycle state, kept in its token next to the registers.

What Authorize Customer, Administration Authorization, Key Administration,
Set Clock, Update PSC and Withdraw PSD change. Like the registers, each
change is a new MAC'd generation (meter.psd.generations), made durable before
the old one is destroyed. The object is public so that Request Status can show
the state before anyone logs on; its MAC is checked whenever a user is
logged on, and every service that relies on it runs logged on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from meter.errors import RegisterCorrupt
from meter.psd.generations import MAC_LENGTH, Generations
from meter.token import DataObject, Token

__all__ = ["STATE_APPLICATION", "DeviceState", "DeviceStateStore"]

STATE_APPLICATION = "meter.state"


@dataclass(frozen=True)
class DeviceState:
    generation: int = 0
    customer: str | None = None  # the customer account the provider authorized
    administration_authorized: bool = False  # may administrators manage users?
    signing_key_active: bool = True
    withdrawn_at: str | None = None  # ISO time; a withdrawn device never signs again
    clock_offset_s: int = 0  # Set Clock: meter time = host UTC clock + offset
    psc_version: str = "1.0.0"
    psc_history: tuple[str, ...] = field(default_factory=tuple)

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
        self, generations: Generations[DeviceState], current: DeviceState, obj: DataObject | None
    ) -> None:
        self._generations = generations
        self._current = current
        self._object = obj

    @property
    def current(self) -> DeviceState:
        return self._current

    @classmethod
    def read_unverified(cls, token: Token) -> DeviceState:
        """The newest state without its MAC checked: for display before anyone logs on."""
        states = [_parsed(obj.value[:-MAC_LENGTH]) for obj in token.data_objects(STATE_APPLICATION)]
        return max(
            (s for s in states if s is not None), key=lambda s: s.generation, default=DeviceState()
        )

    @classmethod
    def open(cls, token: Token) -> DeviceStateStore:
        """The newest state whose MAC verifies (logged on); a device never given one starts fresh."""
        generations: Generations[DeviceState] = Generations(token, STATE_APPLICATION, private=False)
        best, found = generations.newest(_parsed, lambda s: s.generation)
        if best is not None:
            return cls(generations, *best)
        if found:
            raise RegisterCorrupt(
                f"{token.where}: no device state object with a valid MAC "
                f"({found} found); the device must not operate"
            )
        return cls(generations, DeviceState(), None)

    def commit(self, new: DeviceState) -> None:
        if new.generation != self._current.generation + 1:
            raise RegisterCorrupt(
                f"device state update from generation {self._current.generation} to "
                f"{new.generation} is out of order"
            )
        obj = self._generations.write(f"state-{new.generation}", new.body())
        old, self._object, self._current = self._object, obj, new
        self._generations.retire(old)


def _parsed(body: bytes) -> DeviceState | None:
    try:
        return DeviceState.parse(body)
    except RegisterCorrupt:
        return None
