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
from pathlib import Path

from _openpgp_card import OpenPGPApplet, VirtualCard

from meter.custody.card import CardError, CardShareStore, NoCard

__all__ = ["CARD_SCRIPT", "PIN", "READERS", "Readers"]

READERS = {35963: "Virtual PCD 00 00", 35964: "Virtual PCD 00 01"}
# How long pcscd may take to see a card come or go: it polls vpcd's readers, and after a
# card vanished mid-command it reconnects the reader first; under a loaded CI machine
# that took longer than 5 s once. The waits return as soon as the change is seen.
SEEN_WITHIN_S = 30
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
        self.remove(port)
        self.cards[port] = VirtualCard(applet, port).insert()
        self.store(port).wait_for_card(SEEN_WITHIN_S)
        return self.store(port)

    def spawn(self, port: int, *options: str) -> subprocess.Popen[bytes]:
        """A card as a process of its own, with tests/_openpgp_card.py's options."""
        self.remove(port)
        command = [sys.executable, str(CARD_SCRIPT), "--port", str(port), "--pin", PIN]
        process = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL)
        self.processes[port] = process
        self.store(port).wait_for_card(SEEN_WITHIN_S)
        return process

    def remove(self, port: int) -> None:
        card = self.cards.pop(port, None)
        process = self.processes.pop(port, None)
        if card is None and process is None:
            return
        if card is not None:
            card.remove()
        if process is not None:
            process.kill()
            process.wait(timeout=5)
        self.wait_until_empty(port)

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
