"""Shares on OpenPGP cards: the private-use data object 0103, through PC/SC (pyscard).

Custodians can keep their share on a card they already own (Nitrokey 3, YubiKey 5, any
OpenPGP card v3 with private DOs). DO 0103 is read and written only after PW1 is verified
in mode 82, so the card's own PIN and retry counter guard the share. The commands:

    SELECT       00 A4 04 00 06 D2 76 00 01 24 01
    GET DATA     00 CA 00 6E 00   application related data: C0 and C4 inside
    VERIFY       00 20 00 82 Lc PIN
    GET DATA     00 CA 01 03 00
    PUT DATA     00 DA 01 03 Lc record

From the Extended Capabilities (C0, spec v3.4 4.4.3.7) come the private-DO flag (byte 1,
bit 4) and the maximum length of special DOs (bytes 7-8; bytes 5-6 are the cardholder
certificate's); from the PW Status Bytes (C4) PW1's tries left (byte 5). A share record is
refused before VERIFY if it does not fit, and if PW1 is blocked, so that neither costs a
try. Wrong PINs answer 63 Cx (x tries left) or, on some cards, 69 82; a blocked PW1 69 83.

The card is opened exclusively (no other program's command between our VERIFY and our
read) and unpowered on disconnect, so it does not stay verified after we leave. The PIN
goes to the card and nowhere else: never logged, never in a message.

This module is the only importer of ``smartcard`` (pyscard) in the meter package.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from smartcard import scard
from smartcard.Exceptions import CardConnectionException, NoCardException, SmartcardException
from smartcard.pcsc.PCSCExceptions import BaseSCardException
from smartcard.System import readers as pcsc_readers

from meter.custody.shares import CustodyShare
from meter.errors import (
    AuthenticationFailed,
    CustodyError,
    LockedOut,
    TokenUnavailable,
)

__all__ = [
    "CardError",
    "CardRemoved",
    "CardShareStore",
    "CardStatus",
    "NoCard",
    "NoOpenPGPApplet",
    "PinBlocked",
    "ReadersUnavailable",
    "WrongPin",
    "list_readers",
]

OPENPGP_AID = [0xD2, 0x76, 0x00, 0x01, 0x24, 0x01]
_SELECT = [0x00, 0xA4, 0x04, 0x00, len(OPENPGP_AID), *OPENPGP_AID]
_VERIFY_PW1_82 = [0x00, 0x20, 0x00, 0x82]
_PUT_DATA_0103 = [0x00, 0xDA, 0x01, 0x03]
_SHORT_APDU_DATA = 255  # longest data field of a short APDU: no chaining, no extended length
_V2_PRIVATE_DO = 254  # spec v2.x: private DOs hold up to 254 bytes (no special-DO field)
_PW1_MIN = 6  # spec: PW1 has at least 6 characters
_OK = 0x9000
# PC/SC answers that mean the card is no longer there (or was swapped or reset under us).
_GONE = {
    scard.SCARD_W_REMOVED_CARD,
    scard.SCARD_E_NO_SMARTCARD,
    scard.SCARD_E_NOT_TRANSACTED,
    scard.SCARD_W_RESET_CARD,
    scard.SCARD_W_UNPOWERED_CARD,
    scard.SCARD_E_READER_UNAVAILABLE,
    scard.SCARD_W_UNRESPONSIVE_CARD,
}


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


def list_readers() -> list[str]:
    """The PC/SC readers' names; ReadersUnavailable when pcscd does not answer."""
    try:
        return [str(reader) for reader in pcsc_readers()]
    except (BaseSCardException, SmartcardException) as exc:
        raise ReadersUnavailable(f"PC/SC is unavailable (is pcscd running?): {exc}") from None


class CardShareStore:
    """The OpenPGP card in one reader as the place one custodian's share lives."""

    def __init__(self, reader: str) -> None:
        self.reader = reader

    def wait_for_card(self, timeout: float) -> None:
        """Return once a card (any card) is in the reader; NoCard after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._session(select=False):
                    return
            except NoCard:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def status(self) -> CardStatus:
        with self._session() as card:
            return card.status()

    def write(self, share: CustodyShare, pin: str, *, overwrite: bool = False) -> CardStatus:
        """Store ``share`` in DO 0103, read it back and compare.

        Refused before the PIN is sent if the record does not fit or PW1 is blocked; after
        it, if the card holds another share (unless ``overwrite``): a custodian's card may
        still carry a share an earlier ceremony needs.
        """
        record = share.to_record()
        with self._session() as card:
            status = card.status()
            limit = min(status.max_share, _SHORT_APDU_DATA)
            if len(record) > limit:
                raise CardError(
                    f"the share record is {len(record)} bytes but the card in {self.reader} "
                    f"(serial {status.serial}) holds at most {limit} in DO 0103: nothing was written"
                )
            card.verify(pin, status)
            held = card.get_0103("checking what the card holds")
            if held and held != record and not overwrite:
                raise CardError(
                    f"the card in {self.reader} (serial {status.serial}) already holds "
                    f"{_describe(held)}: erase it first, or overwrite it on purpose"
                )
            sw = card.put_0103(record, "writing the share")
            if sw != _OK:
                raise CardError(
                    f"the card in {self.reader} refused the {len(record)}-byte share "
                    f"(PUT DATA answered {sw:04X})"
                )
            if card.get_0103("reading the share back") != record:
                raise CardError(
                    f"the card in {self.reader} did not return the share as written: do not rely on it"
                )
            return card.status()

    def read(self, pin: str) -> CustodyShare:
        """The share in DO 0103, checked (fingerprint, RS1024 checksum) before it is returned."""
        with self._session() as card:
            status = card.status()
            card.verify(pin, status)
            record = card.get_0103("reading the share")
            if not record:
                raise CardError(
                    f"the card in {self.reader} (serial {status.serial}) holds no share: DO 0103 is empty"
                )
            return CustodyShare.from_record(
                record, f"the share on the card in {self.reader} (serial {status.serial})"
            )

    def erase(self, pin: str) -> None:
        """Empty DO 0103 (the share is gone from this card)."""
        with self._session() as card:
            status = card.status()
            card.verify(pin, status)
            sw = card.put_0103(b"", "erasing the share")
            if sw != _OK:
                raise CardError(f"the card in {self.reader} refused to erase DO 0103 ({sw:04X})")

    @contextmanager
    def _session(self, select: bool = True) -> Iterator[_Card]:
        reader = next((r for r in _readers() if str(r) == self.reader), None)
        if reader is None:
            names = ", ".join(str(r) for r in _readers()) or "none"
            raise ReadersUnavailable(f"no reader named {self.reader!r} (readers: {names})")
        connection = reader.createConnection()
        try:
            # Exclusive: no other program's command between VERIFY and our GET DATA.
            # Unpowered on disconnect: the card does not stay verified after we leave.
            connection.connect(
                mode=scard.SCARD_SHARE_EXCLUSIVE, disposition=scard.SCARD_UNPOWER_CARD
            )
        except NoCardException:
            connection.release()
            raise NoCard(f"no card in reader {self.reader}") from None
        except CardConnectionException as exc:
            connection.release()
            if exc.hresult == scard.SCARD_E_SHARING_VIOLATION:
                raise CardError(
                    f"the card in {self.reader} is in use by another program (gpg's scdaemon?): "
                    "close it, then try again"
                ) from None
            if exc.hresult in _GONE:
                raise NoCard(f"no card in reader {self.reader}") from None
            raise CardError(f"cannot connect to the card in {self.reader}: {exc}") from None
        try:
            card = _Card(connection, self.reader)
            if select:
                card.select()
            yield card
        finally:
            with suppress(SmartcardException):  # a removed card has nothing left to undo
                connection.disconnect()
            connection.release()


class _Card:
    """One connected session: APDUs and their status words, with failures named."""

    def __init__(self, connection: Any, reader: str) -> None:
        self._connection = connection
        self.reader = reader

    def send(self, apdu: list[int], step: str) -> tuple[bytes, int]:
        data, sw = self._transmit(apdu, step)
        while sw >> 8 == 0x61:  # more data waits: GET RESPONSE for it
            more, sw = self._transmit([0x00, 0xC0, 0x00, 0x00, sw & 0xFF], step)
            data += more
        return data, sw

    def _transmit(self, apdu: list[int], step: str) -> tuple[bytes, int]:
        try:
            data, sw1, sw2 = self._connection.transmit(apdu)
        except CardConnectionException as exc:
            # hresult 0 with the exception: PC/SC delivered an answer without a status
            # word, which is what vpcd passes on when the card vanishes mid-command.
            if exc.hresult in _GONE or exc.hresult == scard.SCARD_S_SUCCESS:
                raise CardRemoved(
                    f"the card left reader {self.reader} (or stopped answering) while {step}: "
                    + _undone(step)
                ) from None
            raise CardError(f"reader {self.reader} failed while {step}: {exc}") from None
        return bytes(data), sw1 << 8 | sw2

    def select(self) -> None:
        _data, sw = self.send(_SELECT, "selecting the OpenPGP application")
        if sw == 0x6A82:
            raise NoOpenPGPApplet(f"the card in {self.reader} has no OpenPGP application")
        if sw != _OK:
            raise CardError(
                f"the card in {self.reader} answered {sw:04X} to SELECT of the OpenPGP application"
            )

    def status(self) -> CardStatus:
        data, sw = self.send([0x00, 0xCA, 0x00, 0x6E, 0x00], "reading the card's capabilities")
        if sw != _OK:
            raise CardError(f"the card in {self.reader} answered {sw:04X} to GET DATA 6E")
        aid = _find(data, 0x4F) or self._simple(0x4F)
        extcap = _find(data, 0xC0) or self._simple(0xC0)
        pw_status = _find(data, 0xC4) or self._simple(0xC4)
        if len(aid) < 14 or len(extcap) < 8 or len(pw_status) < 7:
            raise CardError(
                f"the card in {self.reader} reports no usable AID, C0 or C4: not an OpenPGP card v2+"
            )
        major, minor = aid[6], aid[7]
        private = bool(extcap[0] & 0x08)
        # v3: bytes 7-8 of C0 are the special DOs' maximum; v2 has no such field.
        max_share = (extcap[6] << 8 | extcap[7]) if major >= 3 else _V2_PRIVATE_DO
        status = CardStatus(
            reader=self.reader,
            serial=f"{aid[8]:02X}{aid[9]:02X}:{aid[10:14].hex().upper()}",
            version=f"{major}.{minor}",
            private_dos=private,
            max_share=max_share if private else 0,
            pin_tries=pw_status[4],
        )
        if not private:
            raise CardError(
                f"the card in {self.reader} (serial {status.serial}, OpenPGP {status.version}) "
                "has no private-use DOs: it cannot hold a share"
            )
        return status

    def _simple(self, tag: int) -> bytes:
        data, sw = self.send([0x00, 0xCA, tag >> 8, tag & 0xFF, 0x00], f"reading DO {tag:02X}")
        return data if sw == _OK else b""

    def verify(self, pin: str, status: CardStatus) -> None:
        if status.pin_tries == 0:
            raise PinBlocked(_blocked(status))
        secret = pin.encode()
        if not _PW1_MIN <= len(secret) <= 127:
            # Refused here: a PIN the card cannot accept would still cost a try.
            raise CardError(f"a PW1 PIN has {_PW1_MIN} to 127 characters; nothing was sent")
        _data, sw = self.send([*_VERIFY_PW1_82, len(secret), *secret], "verifying the PIN")
        if sw == _OK:
            return
        if sw == 0x6983:
            raise PinBlocked(_blocked(status))
        if sw & 0xFFF0 == 0x63C0 or sw == 0x6982:
            tries = sw & 0x0F if sw >> 8 == 0x63 else self.status_tries()
            if tries == 0:
                raise PinBlocked(f"wrong PIN: {_blocked(status)}")
            left = {None: "an unknown number of tries", 1: "1 try"}.get(tries, f"{tries} tries")
            raise WrongPin(
                f"wrong PIN for the card in {self.reader} (serial {status.serial}): "
                f"{left} left before it blocks",
                tries,
            )
        raise CardError(f"the card in {self.reader} answered {sw:04X} to VERIFY")

    def status_tries(self) -> int | None:
        """PW1's tries left, for cards that answer 69 82 without saying."""
        try:
            return self.status().pin_tries
        except CardError:
            return None

    def get_0103(self, step: str) -> bytes:
        data, sw = self.send([0x00, 0xCA, 0x01, 0x03, 0x00], step)
        if sw in (0x6A88, 0x6A82):  # some cards say "not found" for an empty DO
            return b""
        if sw != _OK:
            raise CardError(f"the card in {self.reader} answered {sw:04X} to GET DATA 0103")
        return data

    def put_0103(self, record: bytes, step: str) -> int:
        apdu = [*_PUT_DATA_0103, len(record), *record] if record else list(_PUT_DATA_0103)
        _data, sw = self.send(apdu, step)
        return sw


def _readers() -> list[Any]:
    try:
        return list(pcsc_readers())
    except (BaseSCardException, SmartcardException) as exc:
        raise ReadersUnavailable(f"PC/SC is unavailable (is pcscd running?): {exc}") from None


def _find(data: bytes, wanted: int) -> bytes:
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
            found = _find(value, wanted)
            if found:
                return found
    return b""


def _describe(record: bytes) -> str:
    try:
        return f"share {CustodyShare.from_record(record).label()}"
    except CustodyError:
        return f"{len(record)} bytes that are no readable share"


def _blocked(status: CardStatus) -> str:
    return (
        f"PW1 of the card in {status.reader} (serial {status.serial}) is blocked: unblock it "
        "with the reset code or the admin PIN (gpg --card-edit, admin, passwd); nothing was read or written"
    )


def _undone(step: str) -> str:
    if step.startswith("writing"):
        return "the share may or may not be on the card; reinsert it and read it back"
    return "nothing was changed on the card; reinsert it and try again"
