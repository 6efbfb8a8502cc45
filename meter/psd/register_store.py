"""The registers kept in the token, crash-safe, as MAC'd generations (meter.psd.generations).

The register record changes with every piece, so its commit is the device's
hot path, and it differs from the other records in one way: the generation
before the current one is kept until the next commit. Every generation is
durable before anything depends on it, so the one before the previous can be
destroyed while the new one is still being synced, in parallel with the sync:
whatever happens to the new one, the previous one is there and valid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from meter.errors import MeterError, RegisterCorrupt
from meter.psd.generations import MAC_KEY_LABEL, Generations
from meter.psd.registers import Registers
from meter.token import DataObject, Token

__all__ = ["APPLICATION", "MAC_KEY_LABEL", "RegisterStore"]

APPLICATION = "meter.registers"


class RegisterStore:
    """The current register record of one device in its token."""

    def __init__(self, token: Token, current: Registers, obj: DataObject) -> None:
        self._generations: Generations[Registers] = Generations(token, APPLICATION)
        self._token = token
        self._current = current
        self._object = obj
        self._previous: DataObject | None = None  # the generation before, kept one commit

    @property
    def current(self) -> Registers:
        return self._current

    @classmethod
    def create(cls, token: Token, device_serial: int, state_generation: int) -> RegisterStore:
        """Registers at zero for a newly provisioned device (refuses if any exist)."""
        if token.data_objects(APPLICATION):
            raise RegisterCorrupt(f"{token.where}: registers exist already; refusing to reset them")
        initial = Registers.initial(device_serial, state_generation)
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

    def commit(
        self,
        new: Registers,
        *,
        before_sync: Callable[[], None] | None = None,
        also_durable: Callable[[], None] | None = None,
    ) -> None:
        """Make ``new`` (the next generation) the durable current record.

        ``before_sync`` runs once the record is in the token and before it is synced
        (what must become durable with it, e.g. an audit record, is written there);
        ``also_durable`` runs with the sync, for what the token's sync does not cover.
        Only when this returns is the new record, and all that, durable.
        """
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
            APPLICATION, f"registers-{new.generation}", self._generations.sealed(new.body())
        )
        try:
            if before_sync is not None:
                before_sync()
            durable = self._token.make_durable_async(also_durable)
            try:
                if self._previous is not None:  # two generations back: never needed again
                    self._generations.retire(self._previous)
                    self._previous = None
            finally:
                durable.result()
        except BaseException:
            # Not durable, never acknowledged: take it back, so that the next commit of
            # this generation number is the only one.
            with contextlib.suppress(MeterError):
                self._token.destroy(obj)
            raise
        self._previous, self._object, self._current = self._object, obj, new
