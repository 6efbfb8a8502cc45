"""What meter.custody.card reports: its errors, a card's status, and the pure helpers
(BER-TLV search, the messages); no PC/SC here, so this can be read without pyscard."""

from __future__ import annotations

from dataclasses import dataclass

from meter.custody.shares import CustodyShare
from meter.errors import AuthenticationFailed, CustodyError, LockedOut, TokenUnavailable

__all__ = [
    "CardError",
    "CardRemoved",
    "CardStatus",
    "NoCard",
    "NoOpenPGPApplet",
    "PinBlocked",
    "ReadersUnavailable",
    "WrongPin",
    "blocked_message",
    "describe_record",
    "find_tlv",
    "undone_message",
]


class CardError(CustodyError):
    """A card refused or failed an operation; the message names the reader and the step."""


class ReadersUnavailable(CardError, TokenUnavailable):
    """pcscd does not answer, or no reader of that name: start it, plug the reader in."""


class NoCard(CardError, TokenUnavailable):
    """No card in the reader: insert it."""


class CardRemoved(NoCard):
    """The card left the reader during an operation: the message says what was done."""


class NoOpenPGPApplet(CardError):
    """The card has no OpenPGP application (SELECT answered 6A 82)."""


class WrongPin(CardError, AuthenticationFailed):
    """PW1 was wrong; ``tries_left`` from the card (None when it did not say)."""

    def __init__(self, message: str, tries_left: int | None) -> None:
        super().__init__(message)
        self.tries_left = tries_left


class PinBlocked(CardError, LockedOut):
    """PW1 is blocked (69 83): unblock it with the reset code or admin PIN (gpg --card-edit)."""


@dataclass(frozen=True)
class CardStatus:
    """What the card says about itself, read before any PIN is sent."""

    reader: str
    serial: str  # manufacturer and serial number from the AID, as gpg shows them
    version: str
    private_dos: bool
    max_share: int  # bytes DO 0103 can hold
    pin_tries: int  # PW1's tries left


def find_tlv(data: bytes, wanted: int) -> bytes:
    """The value of BER-TLV tag ``wanted`` in ``data``, searched into constructed tags."""
    at = 0
    while at < len(data):
        if data[at] in (0x00, 0xFF):  # padding between objects
            at += 1
            continue
        tag = data[at]
        constructed = bool(tag & 0x20)
        at += 1
        if tag & 0x1F == 0x1F:  # a multi-byte tag: continues while bit 8 is set
            while at < len(data) and data[at] & 0x80:
                tag = tag << 8 | data[at]
                at += 1
            if at >= len(data):
                return b""
            tag = tag << 8 | data[at]
            at += 1
        if at >= len(data):
            return b""
        length = data[at]
        at += 1
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[at : at + count], "big")
            at += count
        value = data[at : at + length]
        at += length
        if tag == wanted:
            return value
        if constructed:
            found = find_tlv(value, wanted)
            if found:
                return found
    return b""


def describe_record(record: bytes) -> str:
    try:
        return f"share {CustodyShare.from_record(record).label()}"
    except CustodyError:
        return f"{len(record)} bytes that are no readable share"


def blocked_message(status: CardStatus) -> str:
    return (
        f"PW1 of the card in {status.reader} (serial {status.serial}) is blocked: unblock it "
        "with the reset code or the admin PIN (gpg --card-edit, admin, passwd); nothing was read or written"
    )


def undone_message(step: str) -> str:
    if step.startswith("writing"):
        return "the share may or may not be on the card; reinsert it and read it back"
    return "nothing was changed on the card; reinsert it and try again"
