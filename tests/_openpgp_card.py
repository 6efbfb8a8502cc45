"""A virtual OpenPGP card (the applet subset meter.custody.card uses) for vsmartcard's vpcd.

The card side of vpcd's socket protocol: this program connects to vpcd on 127.0.0.1
(port 35963 is reader "Virtual PCD 00 00", 35964 "Virtual PCD 00 01"); every message
either way is a 2-byte big-endian length, then the payload. A 1-byte message from vpcd is
a control: 00 power off, 01 power on, 02 reset, 04 get ATR (answered with the ATR); any
other is a command APDU, answered with the response APDU. Debian's own vicc does not run
on Python 3.11, hence this emulator.

The applet (OpenPGP card spec v3.4, only what the custody layer needs):
  SELECT   00 A4 04 00 06 D2 76 00 01 24 01 [00]   (Le optional; 6A 82 with ``no_applet``)
  VERIFY   00 20 00 82 [PIN]  PW1 mode 82: 63 Cx wrong (x tries left; or 69 82 with
           ``wrong_pin_sw=0x6982``), 69 83 blocked; three tries; no data: the state
  GET DATA 00 CA: 6E (application related data: 4F AID, 5F52, 73 { C0, C4 }), 4F, C0, C4,
           0103 (after VERIFY 82, else 69 82)
  PUT DATA 00 DA 01 03 (after VERIFY 82; 67 00 above the maximum; no data erases)
  GET RESPONSE 00 C0 after a 61 xx (responses longer than ``chunk`` are sent in parts)
C0 (Extended Capabilities, 10 bytes): byte 1 bit 4 = private DOs, bytes 5-6 the maximum
cardholder certificate, bytes 7-8 the maximum length of special DOs (0103 among them).
C4 (PW Status Bytes, 7 bytes): byte 5 is PW1's retry counter. Verification is lost at
power off, reset and SELECT, as on a real card.

Runs as a thread (`VirtualCard`, whose applet state survives removal, so one card can go
from reader to reader) or as a process:
    python tests/_openpgp_card.py --port 35963 --pin 123456
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

AID_PREFIX = bytes.fromhex("D27600012401")
# Version 3.4, manufacturer FFFE (test cards), serial number, RFU.
AID_TAIL = bytes.fromhex("0304FFFE") + b"\x00\x00\x00\x00" + b"\x00\x00"
# An OpenPGP card's ATR (T=1); TCK is computed so that pcscd accepts it.
HISTORICAL = bytes.fromhex("0031F573C00160009000")
_ATR_BODY = bytes.fromhex("3BDA18FF81B1FE751F03") + HISTORICAL
MAX_TRIES = 3
DEFAULT_PIN = "123456"  # the OpenPGP card's factory PW1: a lab card only


def _atr() -> bytes:
    tck = 0
    for byte in _ATR_BODY[1:]:
        tck ^= byte
    return _ATR_BODY + bytes([tck])


ATR = _atr()


def _tlv(tag: int, value: bytes) -> bytes:
    tag_bytes = tag.to_bytes(2 if tag > 0xFF else 1, "big")
    if len(value) < 0x80:
        length = bytes([len(value)])
    elif len(value) <= 0xFF:
        length = bytes([0x81, len(value)])
    else:
        length = bytes([0x82]) + len(value).to_bytes(2, "big")
    return tag_bytes + length + value


@dataclass
class OpenPGPApplet:
    """The card's state and its answers; no sockets here."""

    pin: str = DEFAULT_PIN
    serial: int = 1
    max_special_do: int = 255
    private_dos: bool = True
    no_applet: bool = False
    wrong_pin_sw: int = 0  # 0: answer 63 Cx; 0x6982: answer 69 82
    chunk: int = 256  # longest response part before 61 xx
    vanish_on_read: bool = False  # see VirtualCard / --vanish-on-read
    tries: int = MAX_TRIES
    do_0103: bytes = b""
    selected: bool = False
    verified: bool = False
    written_this_session: bool = False
    pending: bytes = b""
    log: list[str] = field(default_factory=list)  # commands seen (INS names), never data
    # Every command APDU as received, except VERIFY's data (the PIN): its header only.
    apdus: list[bytes] = field(default_factory=list)

    def aid(self) -> bytes:
        return AID_PREFIX + AID_TAIL[:4] + self.serial.to_bytes(4, "big") + AID_TAIL[8:]

    def extended_capabilities(self) -> bytes:
        flags = 0x70 | (0x08 if self.private_dos else 0)  # GET CHALLENGE, key import, PW status
        return (
            bytes([flags, 0x00])
            + (0x0800).to_bytes(2, "big")  # max GET CHALLENGE
            + (0x0800).to_bytes(2, "big")  # max cardholder certificate
            + self.max_special_do.to_bytes(2, "big")  # max special DOs: 0101-0104 among them
            + bytes([0x00, 0x00])  # PIN block 2 format, MSE: not supported
        )

    def pw_status(self) -> bytes:
        return bytes([0x01, 0x7F, 0x7F, 0x7F, self.tries, 0x00, MAX_TRIES])

    def power_off(self) -> None:
        self.selected = self.verified = self.written_this_session = False
        self.pending = b""

    def answer(self, apdu: bytes) -> bytes | None:
        """The response APDU; None when the card is to vanish instead of answering."""
        if len(apdu) < 4:
            return b"\x67\x00"
        cla, ins, p1, p2 = apdu[:4]
        data, _le = _body(apdu[4:])
        if data is None:
            return b"\x67\x00"
        if cla != 0x00:
            return b"\x6e\x00"
        self.log.append(f"{ins:02X}")
        self.apdus.append(apdu[:4] if ins == 0x20 else apdu)
        if ins == 0xA4:
            return self._select(p1, p2, data)
        if ins == 0xC0:
            part, self.pending = self.pending, b""
            return self._send(part) if part else b"\x69\x85"
        if not self.selected:
            return b"\x69\x85"  # conditions of use not satisfied: no application selected
        if ins == 0x20:
            return self._verify(p1, p2, data)
        if ins == 0xCA:
            return self._get_data(p1 << 8 | p2)
        if ins == 0xDA:
            return self._put_data(p1 << 8 | p2, data)
        return b"\x6d\x00"

    def _select(self, p1: int, p2: int, data: bytes) -> bytes:
        self.verified = False
        if p1 != 0x04 or self.no_applet or not data or not self.aid().startswith(data):
            self.selected = False
            return b"\x6a\x82"
        self.selected = True
        return b"\x90\x00"

    def _verify(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00 or p2 != 0x82:
            return b"\x6a\x86"  # only PW1 mode 82 in this subset
        if self.tries == 0:
            return b"\x69\x83"
        if not data:  # asks the state without a try
            return b"\x90\x00" if self.verified else bytes([0x63, 0xC0 | self.tries])
        if data == self.pin.encode():
            self.tries = MAX_TRIES
            self.verified = True
            return b"\x90\x00"
        self.tries -= 1
        self.verified = False
        if self.wrong_pin_sw:
            return self.wrong_pin_sw.to_bytes(2, "big")
        return bytes([0x63, 0xC0 | self.tries])

    def _get_data(self, tag: int) -> bytes | None:
        if tag == 0x0103:
            if not self.verified:
                return b"\x69\x82"
            if self.vanish_on_read and self.do_0103 and not self.written_this_session:
                return None
            return self._send(self.do_0103)
        if tag == 0x6E:
            discretionary = _tlv(0xC0, self.extended_capabilities()) + _tlv(0xC4, self.pw_status())
            related = _tlv(0x4F, self.aid()) + _tlv(0x5F52, HISTORICAL) + _tlv(0x73, discretionary)
            return self._send(_tlv(0x6E, related))
        simple = {0x4F: self.aid(), 0xC0: self.extended_capabilities(), 0xC4: self.pw_status()}
        if tag in simple:
            return self._send(simple[tag])
        return b"\x6a\x88"

    def _put_data(self, tag: int, data: bytes) -> bytes:
        if tag != 0x0103:
            return b"\x6a\x88"
        if not self.verified:
            return b"\x69\x82"
        if len(data) > self.max_special_do:
            return b"\x67\x00"
        self.do_0103 = data
        self.written_this_session = True
        return b"\x90\x00"

    def _send(self, response: bytes) -> bytes:
        if len(response) <= self.chunk:
            return response + b"\x90\x00"
        part, self.pending = response[: self.chunk], response[self.chunk :]
        return part + bytes([0x61, min(len(self.pending), 0xFF) & 0xFF])


def _body(rest: bytes) -> tuple[bytes | None, int]:
    """Short APDU body: (data, Le); data None if the lengths do not add up."""
    if not rest:
        return b"", 0
    if len(rest) == 1:
        return b"", rest[0] or 256
    lc = rest[0]
    if len(rest) == 1 + lc:
        return rest[1:], 0
    if len(rest) == 2 + lc:
        return rest[1 : 1 + lc], rest[-1] or 256
    return None, 0


def _read_exact(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        # vpcd writes the length and the payload separately: acknowledged at once, the
        # payload follows at once too (else Nagle and delayed ACKs cost 40 ms a message).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(
    applet: OpenPGPApplet, sock: socket.socket, on_vanish: Callable[[], None] | None = None
) -> None:
    """Answer vpcd on ``sock`` until it closes (or the card vanishes)."""
    while True:
        try:
            header = _read_exact(sock, 2)
            if header is None:
                return
            (length,) = struct.unpack(">H", header)
            message = _read_exact(sock, length)
        except OSError:
            return
        if message is None:
            return
        if len(message) == 1:
            control = message[0]
            if control in (0x00, 0x01, 0x02):  # off, on, reset: verification is lost
                applet.power_off()
            elif control == 0x04:
                sock.sendall(struct.pack(">H", len(ATR)) + ATR)
            continue
        response = applet.answer(message)
        if response is None:  # removed in the middle of the command: no answer, ever
            if on_vanish is not None:
                on_vanish()
            sock.close()
            return
        sock.sendall(struct.pack(">H", len(response)) + response)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    """A socket to vpcd's card side on loopback; waits for pcscd to listen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class VirtualCard:
    """``applet`` inserted into the vpcd reader on ``port`` (a thread), until `remove`."""

    def __init__(self, applet: OpenPGPApplet, port: int) -> None:
        self.applet = applet
        self.port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def insert(self) -> VirtualCard:
        sock = connect(self.port)
        sock.settimeout(None)
        self._sock = sock
        self._thread = threading.Thread(
            target=serve, args=(self.applet, sock), name=f"card:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def remove(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # vpcd may have closed it first
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.applet.power_off()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=35963)
    parser.add_argument("--pin", default=DEFAULT_PIN, help="PW1 (a lab card's PIN)")
    parser.add_argument("--serial", type=int, default=1)
    parser.add_argument("--max-do", type=int, default=255)
    parser.add_argument("--no-applet", action="store_true")
    parser.add_argument("--wrong-pin-sw", choices=["63cx", "6982"], default="63cx")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument(
        "--vanish-on-read",
        action="store_true",
        help="kill this process when a share stored in an earlier session is read (GET DATA 0103)",
    )
    args = parser.parse_args()
    applet = OpenPGPApplet(
        pin=args.pin,
        serial=args.serial,
        max_special_do=args.max_do,
        no_applet=args.no_applet,
        wrong_pin_sw=0x6982 if args.wrong_pin_sw == "6982" else 0,
        chunk=args.chunk,
        vanish_on_read=args.vanish_on_read,
    )
    sock = connect(args.port)
    sock.settimeout(None)
    print(f"card {args.serial} in vpcd port {args.port}", flush=True)

    def vanish() -> None:  # as abrupt as pulling the card: no reply, no clean close
        os.kill(os.getpid(), signal.SIGKILL)

    serve(applet, sock, vanish)


if __name__ == "__main__":
    main()
