"""The meter's registers: pure arithmetic and their MAC'd record format.

Ascending (all postage ever issued), descending (postage still available),
control total (all postage ever credited; always ascending + descending) and
the piece sequence of the last indicium issued. Every change makes a new
generation; the record binds the device serial so it cannot be moved to
another meter.

The record also pins what the device trusts and which device state is
current: the generation of the device state object (meter.psd.device_state)
and the SHA-256 of the postal root certificate the device was authorized
under (all zero before Authorize PSD). Both sit under the register MAC in a
private token object, so deleting, replacing or rolling back the state or
the certificate objects is detected at the next open.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from meter.errors import InsufficientFunds, InvalidInput, RegisterCorrupt

__all__ = ["NO_NONCE", "NO_ROOT", "RECORD_LENGTH", "PieceRegisters", "Registers"]

_MAGIC = b"PREG"
_VERSION = 2
# magic, version, device serial, generation, ascending, descending, control
# total, sequence, outstanding credit nonce, last credit transaction id,
# device state generation, SHA-256 of the postal root certificate
_FORMAT = ">4sBQQQQQI16s16sQ32s"
_BODY_LENGTH = struct.calcsize(_FORMAT)
_MAC_LENGTH = 32
RECORD_LENGTH = _BODY_LENGTH + _MAC_LENGTH
NO_NONCE = bytes(16)
NO_ROOT = bytes(32)
_MAX_REGISTER = 2**40 - 1  # PIM-1 carries registers in 5 bytes
_MAX_SEQUENCE = 2**32 - 1


class PieceRegisters(NamedTuple):
    """What one piece's indicium carries: its sequence and the registers once it is debited."""

    sequence: int
    ascending: int
    descending: int


@dataclass(frozen=True)
class Registers:
    device_serial: int
    generation: int
    ascending: int
    descending: int
    control_total: int
    sequence: int
    credit_nonce: bytes = NO_NONCE
    last_credit_id: bytes = NO_NONCE
    state_generation: int = 0  # the device state object this record commits
    root_digest: bytes = NO_ROOT  # SHA-256 of the trusted postal root certificate (DER)

    @classmethod
    def initial(cls, device_serial: int, state_generation: int = 1) -> Registers:
        return cls(device_serial, 1, 0, 0, 0, 0, state_generation=state_generation)

    def pinning(
        self, *, state_generation: int | None = None, root_digest: bytes | None = None
    ) -> Registers:
        """The next generation, committing another device state or trust anchor."""
        if root_digest is not None and len(root_digest) != 32:
            raise InvalidInput("a postal root digest is 32 bytes (SHA-256)")
        return replace(
            self,
            generation=self.generation + 1,
            state_generation=self.state_generation
            if state_generation is None
            else state_generation,
            root_digest=self.root_digest if root_digest is None else root_digest,
        )

    def check(self) -> None:
        """The conservation law; a record that breaks it is corrupt."""
        if self.ascending + self.descending != self.control_total:
            raise RegisterCorrupt(
                f"device {self.device_serial} generation {self.generation}: ascending "
                f"{self.ascending} + descending {self.descending} != control total {self.control_total}"
            )

    @property
    def piece(self) -> PieceRegisters:
        """The registers as the indicium of the piece last debited carries them."""
        return PieceRegisters(self.sequence, self.ascending, self.descending)

    def debit(self, postage: int) -> Registers:
        """The registers after issuing one piece of ``postage`` mills (0 for a specimen)."""
        if postage < 0:
            raise InvalidInput(f"postage must not be negative (got {postage} mills)")
        if postage > self.descending:
            raise InsufficientFunds(
                f"device {self.device_serial}: postage {postage} mills exceeds the descending "
                f"register ({self.descending} mills)"
            )
        if self.sequence >= _MAX_SEQUENCE:
            raise InvalidInput(f"device {self.device_serial}: piece sequence exhausted")
        if self.ascending + postage > _MAX_REGISTER:
            raise InvalidInput(f"device {self.device_serial}: ascending register would overflow")
        return replace(
            self,
            generation=self.generation + 1,
            ascending=self.ascending + postage,
            descending=self.descending - postage,
            sequence=self.sequence + 1,
        )

    def debit_batch(self, postages: Sequence[int]) -> tuple[Registers, list[PieceRegisters]]:
        """The batch's ONE next generation, debiting every piece, and the registers after
        each piece as if debited one by one (what each piece's indicium carries, so the
        post office's chain holds piece by piece).

        The whole batch is checked before any of it: the total against the descending
        register, the piece sequence and the ascending register against their limits.
        """
        count = len(postages)
        if count == 0:
            raise InvalidInput("a batch needs at least one piece")
        negative = next((i for i, p in enumerate(postages, 1) if p < 0), None)
        if negative is not None:
            raise InvalidInput(
                f"piece {negative} of the batch: postage must not be negative "
                f"(got {postages[negative - 1]} mills)"
            )
        total = sum(postages)
        if total > self.descending:
            raise InsufficientFunds(
                f"device {self.device_serial}: the batch of {count} pieces totals {total} mills, "
                f"more than the descending register ({self.descending} mills); nothing was debited"
            )
        if self.sequence + count > _MAX_SEQUENCE:
            raise InvalidInput(
                f"device {self.device_serial}: a batch of {count} pieces would exhaust the "
                "piece sequence"
            )
        if self.ascending + total > _MAX_REGISTER:
            raise InvalidInput(f"device {self.device_serial}: ascending register would overflow")
        pieces: list[PieceRegisters] = []
        ascending, descending, sequence = self.ascending, self.descending, self.sequence
        for postage in postages:
            ascending, descending, sequence = (
                ascending + postage,
                descending - postage,
                sequence + 1,
            )
            pieces.append(PieceRegisters(sequence, ascending, descending))
        after = replace(
            self,
            generation=self.generation + 1,
            ascending=ascending,
            descending=descending,
            sequence=sequence,
        )
        return after, pieces

    def with_nonce(self, nonce: bytes) -> Registers:
        """Record an outstanding credit request's nonce (one at a time)."""
        if len(nonce) != 16 or nonce == NO_NONCE:
            raise InvalidInput("a credit nonce is 16 bytes, not all zero")
        return replace(self, generation=self.generation + 1, credit_nonce=nonce)

    def credit(self, amount: int, nonce: bytes, credit_id: bytes) -> Registers:
        """Add ``amount`` mills for the outstanding request ``nonce``, consuming the nonce."""
        if amount <= 0:
            raise InvalidInput(f"credit amount must be positive (got {amount} mills)")
        if self.credit_nonce == NO_NONCE or nonce != self.credit_nonce:
            raise InvalidInput(
                f"device {self.device_serial}: credit does not answer the outstanding request "
                "(replayed, stale or for another request)"
            )
        if self.control_total + amount > _MAX_REGISTER:
            raise InvalidInput(f"device {self.device_serial}: control total would overflow")
        return replace(
            self,
            generation=self.generation + 1,
            descending=self.descending + amount,
            control_total=self.control_total + amount,
            credit_nonce=NO_NONCE,
            last_credit_id=credit_id,
        )

    def credit_reload(self, amount: int, credit_id: bytes) -> Registers:
        """Add ``amount`` mills for reload transaction ``credit_id`` (meter.psd.services_reload).

        The reload protocol binds its grant to the session's nonce, which the device checks
        in memory (a session never outlives the device process); the outstanding nonce of
        a local credit request, if any, stays as it is.
        """
        if amount <= 0:
            raise InvalidInput(f"credit amount must be positive (got {amount} mills)")
        if len(credit_id) != 16 or credit_id == NO_NONCE:
            raise InvalidInput("a transaction id is 16 bytes, not all zero")
        if credit_id == self.last_credit_id:
            raise InvalidInput(f"transaction {credit_id.hex()} is applied already")
        if self.control_total + amount > _MAX_REGISTER:
            raise InvalidInput(f"device {self.device_serial}: control total would overflow")
        return replace(
            self,
            generation=self.generation + 1,
            descending=self.descending + amount,
            control_total=self.control_total + amount,
            last_credit_id=credit_id,
        )

    def body(self) -> bytes:
        return struct.pack(
            _FORMAT,
            _MAGIC,
            _VERSION,
            self.device_serial,
            self.generation,
            self.ascending,
            self.descending,
            self.control_total,
            self.sequence,
            self.credit_nonce,
            self.last_credit_id,
            self.state_generation,
            self.root_digest,
        )

    @classmethod
    def parse(cls, record: bytes) -> tuple[Registers, bytes, bytes]:
        """Split a record into registers, the MAC'd body and the MAC; RegisterCorrupt if unreadable."""
        if len(record) != RECORD_LENGTH:
            raise RegisterCorrupt(
                f"register record has {len(record)} bytes, expected {RECORD_LENGTH}"
            )
        body, mac = record[:_BODY_LENGTH], record[_BODY_LENGTH:]
        return cls.from_body(body), body, mac

    @classmethod
    def from_body(cls, body: bytes) -> Registers:
        """The registers in a record's MAC'd body; RegisterCorrupt if unreadable."""
        if len(body) != _BODY_LENGTH:
            raise RegisterCorrupt(f"register body has {len(body)} bytes, expected {_BODY_LENGTH}")
        magic, version, *fields = struct.unpack(_FORMAT, body)
        if magic != _MAGIC or version != _VERSION:
            raise RegisterCorrupt("register record has an unknown magic or version")
        serial, generation, asc, desc, total, seq, nonce, credit_id, state, root = fields
        return cls(serial, generation, asc, desc, total, seq, nonce, credit_id, state, root)
