"""Shares on OpenPGP cards: the private-use data object 0103, through PC/SC (pyscard).

Custodians can keep their share on a card they already own (Nitrokey 3, YubiKey 5, any
OpenPGP card v3 with private DOs). DO 0103 is read and written only after PW1 is verified
in mode 82, so the card's own PIN and retry counter guard the share. The commands:

    SELECT       00 A4 04 00 06 D2 76 00 01 24 01 00   (Le 00: the card may return its FCI)
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from smartcard import scard
from smartcard.Exceptions import CardConnectionException, NoCardException, SmartcardException
from smartcard.pcsc.PCSCExceptions import BaseSCardException
from smartcard.System import readers as pcsc_readers

from meter.custody.card_types import (
    CardError,
    CardRemoved,
    CardStatus,
    NoCard,
    NoOpenPGPApplet,
    PinBlocked,
    ReadersUnavailable,
    WrongPin,
    blocked_message,
    describe_record,
    find_tlv,
    undone_message,
)
from meter.custody.shares import CustodyShare

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
# With Le = 00 (case 4): the spec's SELECT; some cards answer it with an FCI, which we skip.
_SELECT = [0x00, 0xA4, 0x04, 0x00, len(OPENPGP_AID), *OPENPGP_AID, 0x00]
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

    def wait_for_next_card(
        self,
        timeout: float,
        *,
        other_than: str | None = None,
        still_there: Callable[[CardStatus], None] | None = None,
    ) -> CardStatus:
        """The status of the OpenPGP card in the reader once there is one whose serial is not
        ``other_than`` (the previous custodian's card in this reader): a card left in must
        not receive the next custodian's PIN. ``still_there`` is told once when that card is
        still in; NoCard after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                status = self.status()
            except NoCard:
                status = None
            if status is not None:
                if status.serial != other_than:
                    return status
                if still_there is not None and not told:
                    still_there(status)
                    told = True
            if time.monotonic() > deadline:
                seen = "" if status is None else f" (only the card with serial {status.serial})"
                raise NoCard(f"no new card in reader {self.reader} within {timeout:g} s{seen}")
            time.sleep(0.1)

    def status(self) -> CardStatus:
        with self._session() as card:
            return card.status()

    def write(
        self,
        share: CustodyShare,
        pin: str,
        *,
        overwrite: bool = False,
        serial: str | None = None,
    ) -> CardStatus:
        """Store ``share`` in DO 0103, read it back and compare.

        Refused before the PIN is sent if the record does not fit, PW1 is blocked, or the
        card is not the one with ``serial`` (the card the PIN was asked for); after it, if
        the card holds another share (unless ``overwrite``): a custodian's card may still
        carry a share an earlier ceremony needs.
        """
        record = share.to_record()
        with self._session() as card:
            status = card.status(serial)
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
                    f"{describe_record(held)}: erase it first, or overwrite it on purpose"
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

    def read(self, pin: str, *, serial: str | None = None) -> CustodyShare:
        """The share in DO 0103, checked (fingerprint, RS1024 checksum) before it is returned;
        refused before the PIN is sent if the card is not the one with ``serial``."""
        with self._session() as card:
            status = card.status(serial)
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
                    + undone_message(step)
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

    def status(self, serial: str | None = None) -> CardStatus:
        """The card's status; with ``serial``, refused unless it is that card (the PIN was
        asked for it: a card swapped in since must not receive it)."""
        status = self._status()
        if serial is not None and status.serial != serial:
            raise CardError(
                f"the card in {self.reader} is now the one with serial {status.serial}, not "
                f"{serial} (the card the PIN was asked for): nothing was sent to it"
            )
        return status

    def _status(self) -> CardStatus:
        data, sw = self.send([0x00, 0xCA, 0x00, 0x6E, 0x00], "reading the card's capabilities")
        if sw != _OK:
            raise CardError(f"the card in {self.reader} answered {sw:04X} to GET DATA 6E")
        aid = find_tlv(data, 0x4F) or self._simple(0x4F)
        extcap = find_tlv(data, 0xC0) or self._simple(0xC0)
        pw_status = find_tlv(data, 0xC4) or self._simple(0xC4)
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
            raise PinBlocked(blocked_message(status))
        secret = pin.encode()
        if not _PW1_MIN <= len(secret) <= 127:
            # Refused here: a PIN the card cannot accept would still cost a try.
            raise CardError(f"a PW1 PIN has {_PW1_MIN} to 127 characters; nothing was sent")
        _data, sw = self.send([*_VERIFY_PW1_82, len(secret), *secret], "verifying the PIN")
        if sw == _OK:
            return
        if sw == 0x6983:
            raise PinBlocked(blocked_message(status))
        if sw & 0xFFF0 == 0x63C0 or sw == 0x6982:
            tries = sw & 0x0F if sw >> 8 == 0x63 else self.status_tries()
            if tries == 0:
                raise PinBlocked(f"wrong PIN: {blocked_message(status)}")
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
