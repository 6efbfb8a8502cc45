"""Emulated OpenPGP cards in two vpcd readers, for the card tests (the ``readers`` fixture
in tests/conftest.py gives a `Readers`).

Two vpcd readers (scripts/pcsc-services start): "Virtual PCD 00 00" takes a card on port
35963, "Virtual PCD 00 01" on 35964. The cards are tests/_openpgp_card.py, in threads (so
one card's state can move between readers) or as processes (so a card can be killed).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _openpgp_card import OpenPGPApplet, VirtualCard

from meter.custody.card import CardError, CardShareStore, NoCard

__all__ = ["CARD_SCRIPT", "PIN", "READERS", "Readers"]

READERS = {35963: "Virtual PCD 00 00", 35964: "Virtual PCD 00 01"}
# How long pcscd may take to see a card come or go (it polls vpcd's readers, slower on a
# loaded CI machine); the waits return as soon as the change is seen.
SEEN_WITHIN_S = 30
# A card put into a reader within one of vpcd's presence polls (0.4 s) after the previous
# card vanished mid-command is never powered: vpcd answers pcscd's presence checks with
# the new card's ATR, but pcscd, which marked the reader empty on the failed command, sees
# no insertion and reports the reader empty for good (measured with pcscd 1.9.9 and vpcd
# 3.3: the card gets GET ATR every 0.4 s and never a power-on). Taking the card out and
# putting it in again after a pause, as a custodian would, makes pcscd see it.
RESEAT_AFTER_S = 3.0
RESEAT_PAUSE_S = 1.0
PIN = "123456"
CARD_SCRIPT = Path(__file__).with_name("_openpgp_card.py")


class Readers:
    """Inserts and removes emulated cards, waiting until pcscd has seen each change."""

    def __init__(self) -> None:
        self.cards: dict[int, VirtualCard] = {}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def store(self, port: int) -> CardShareStore:
        return CardShareStore(READERS[port])

    def insert(self, applet: OpenPGPApplet, port: int) -> CardShareStore:
        def put_in() -> None:
            self.cards[port] = VirtualCard(applet, port).insert()

        self._seat(port, put_in)
        return self.store(port)

    def spawn(self, port: int, *options: str) -> subprocess.Popen[bytes]:
        """A card as a process of its own, with tests/_openpgp_card.py's options."""
        command = [sys.executable, str(CARD_SCRIPT), "--port", str(port), "--pin", PIN]

        def put_in() -> None:
            self.processes[port] = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL)

        self._seat(port, put_in)
        return self.processes[port]

    def _seat(self, port: int, put_in: Callable[[], None]) -> None:
        """Put a card in, until pcscd sees it: re-seated if it does not (RESEAT_AFTER_S)."""
        self.remove(port)
        deadline = time.monotonic() + SEEN_WITHIN_S
        while True:
            put_in()
            try:
                self.store(port).wait_for_card(RESEAT_AFTER_S)
                return
            except NoCard:
                if time.monotonic() > deadline:
                    raise
            self._take_out(port)
            time.sleep(RESEAT_PAUSE_S)

    def remove(self, port: int) -> None:
        if self._take_out(port):
            self.wait_until_empty(port)

    def _take_out(self, port: int) -> bool:
        card = self.cards.pop(port, None)
        process = self.processes.pop(port, None)
        if card is not None:
            card.remove()
        if process is not None:
            process.kill()
            process.wait(timeout=5)
        return card is not None or process is not None

    def wait_until_empty(self, port: int) -> None:
        deadline = time.monotonic() + SEEN_WITHIN_S
        while time.monotonic() < deadline:
            try:
                self.store(port).status()
            except NoCard:
                return
            except CardError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"pcscd still sees a card in {READERS[port]}")

    def clear(self) -> None:
        for port in list(self.cards) + list(self.processes):
            self.remove(port)
