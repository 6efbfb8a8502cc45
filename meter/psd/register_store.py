"""The registers kept in the token, crash-safe, as MAC'd generations (meter.psd.generations)."""

from __future__ import annotations

from meter.errors import RegisterCorrupt
from meter.psd.generations import MAC_KEY_LABEL, Generations
from meter.psd.registers import Registers
from meter.token import DataObject, Token

__all__ = ["APPLICATION", "MAC_KEY_LABEL", "RegisterStore"]

APPLICATION = "meter.registers"


class RegisterStore:
    """The current register record of one device in its token."""

    def __init__(self, token: Token, current: Registers, obj: DataObject) -> None:
        self._generations: Generations[Registers] = Generations(token, APPLICATION)
        self._current = current
        self._object = obj

    @property
    def current(self) -> Registers:
        return self._current

    @classmethod
    def create(cls, token: Token, device_serial: int) -> RegisterStore:
        """Registers at zero for a newly provisioned device (refuses if any exist)."""
        if token.data_objects(APPLICATION):
            raise RegisterCorrupt(f"{token.where}: registers exist already; refusing to reset them")
        initial = Registers.initial(device_serial)
        generations: Generations[Registers] = Generations(token, APPLICATION)
        obj = generations.write(f"registers-{initial.generation}", initial.body())
        return cls(token, initial, obj)

    @classmethod
    def open(cls, token: Token, device_serial: int) -> RegisterStore:
        """Recover the newest valid generation and remove every other record."""

        def parse(body: bytes) -> Registers | None:
            try:
                registers = Registers.from_body(body)
            except RegisterCorrupt:
                return None
            if registers.device_serial != device_serial:
                return None
            registers.check()  # a MAC'd record that breaks the invariants is not skipped
            return registers

        generations: Generations[Registers] = Generations(token, APPLICATION)
        best, found = generations.newest(parse, lambda r: r.generation)
        if best is None:
            raise RegisterCorrupt(
                f"{token.where}: no register record with a valid MAC for device {device_serial} "
                f"({found} record(s) found); the meter must not issue"
            )
        return cls(token, *best)

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
        obj = self._generations.write(f"registers-{new.generation}", new.body())
        old, self._object, self._current = self._object, obj, new
        self._generations.retire(old)
