"""The registers kept in the token, crash-safe.

SoftHSM2 cannot change a data object's value in place and rewrites object
files without fsync, so each update creates a new MAC'd object (the next
generation), makes it durable, and only then destroys the previous one. On
open the highest generation whose MAC verifies wins and the rest are removed.
A crash at any instant leaves either the old or the new generation valid.
"""

from __future__ import annotations

import hmac as _hmac

from meter.errors import RegisterCorrupt
from meter.psd.registers import Registers
from meter.token import DataObject, Token

__all__ = ["APPLICATION", "MAC_KEY_LABEL", "RegisterStore"]

APPLICATION = "meter.registers"
MAC_KEY_LABEL = "register-mac"


class RegisterStore:
    """The current register record of one device in its token."""

    def __init__(self, token: Token, current: Registers, obj: DataObject) -> None:
        self._token = token
        self._current = current
        self._object = obj

    @property
    def current(self) -> Registers:
        return self._current

    @staticmethod
    def _record(token: Token, registers: Registers) -> bytes:
        body = registers.body()
        return body + token.hmac(MAC_KEY_LABEL, body)

    @classmethod
    def create(cls, token: Token, device_serial: int) -> RegisterStore:
        """Registers at zero for a newly provisioned device (refuses if any exist)."""
        if token.data_objects(APPLICATION):
            raise RegisterCorrupt(f"{token.where}: registers exist already; refusing to reset them")
        initial = Registers.initial(device_serial)
        obj = token.create_data(
            APPLICATION, f"registers-{initial.generation}", cls._record(token, initial)
        )
        token.make_durable()
        return cls(token, initial, obj)

    @classmethod
    def open(cls, token: Token, device_serial: int) -> RegisterStore:
        """Recover the newest valid generation and remove every other record."""
        objects = token.data_objects(APPLICATION)
        best: tuple[Registers, DataObject] | None = None
        for obj in objects:
            try:
                registers, body, mac = Registers.parse(obj.value)
            except RegisterCorrupt:
                continue
            if not _hmac.compare_digest(mac, token.hmac(MAC_KEY_LABEL, body)):
                continue
            if registers.device_serial != device_serial:
                continue
            registers.check()
            if best is None or registers.generation > best[0].generation:
                best = (registers, obj)
        if best is None:
            raise RegisterCorrupt(
                f"{token.where}: no register record with a valid MAC for device {device_serial} "
                f"({len(objects)} record(s) found); the meter must not issue"
            )
        for obj in objects:
            if obj is not best[1]:
                token.destroy(obj)
        return cls(token, best[0], best[1])

    def commit(self, new: Registers) -> None:
        """Make ``new`` (the next generation) the durable current record."""
        if (
            new.generation != self._current.generation + 1
            or new.device_serial != self._current.device_serial
        ):
            raise RegisterCorrupt(
                f"register update from generation {self._current.generation} to {new.generation} "
                "is out of order"
            )
        new.check()
        obj = self._token.create_data(
            APPLICATION, f"registers-{new.generation}", self._record(self._token, new)
        )
        self._token.make_durable()
        old, self._object, self._current = self._object, obj, new
        self._token.destroy(old)
