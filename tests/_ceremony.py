"""What the ceremony tests share: the people in the room (a scripted `Prompter` that moves
emulated cards between the two vpcd readers as custodians would), and the homes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from _card_readers import READERS, Readers
from _openpgp_card import OpenPGPApplet
from conftest import ROLE_USERS, TEST_POLICY

from meter.cli.ceremony_cli import init_target_home
from meter.cli.home import Home
from meter.psd.roles import Role

PIN = "123456"
PASSPHRASE = "sealed-share-passphrase-1"
PORT_OF = {name: port for port, name in READERS.items()}
_CARD_STEP = re.compile(r"^(\S+): insert your card into reader '(.+)'$")
_TAKE_OUT = re.compile(
    r"^take (\S+)'s card \(serial (\S+)\) out of reader '(.+)': it is (\S+)'s turn$"
)
_PIN = re.compile(r"^PIN of (\S+)'s card \(serial (\S+)\)$")
PASSWORDS = dict(ROLE_USERS.values())


@dataclass
class People:
    """The custodians and officers: each custodian's card goes in when the ceremony asks."""

    readers: Readers | None
    cards: dict[str, OpenPGPApplet] = field(default_factory=dict)
    pins: dict[str, str] = field(default_factory=dict)
    said: list[str] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)
    refuse_confirm: str | None = None  # a custodian who does not confirm their fingerprint
    absent: set[str] = field(default_factory=set)  # custodians whose card stays at home
    # Custodians who leave their card in the reader after their turn: the next one in that
    # reader puts theirs in only when the ceremony asks for the card left in to come out.
    leave_in: set[str] = field(default_factory=set)
    in_reader: dict[str, str] = field(default_factory=dict)  # reader -> whose card
    waiting: dict[str, str] = field(default_factory=dict)  # reader -> who waits for it
    pin_asked: list[str] = field(default_factory=list)  # the serial each PIN was asked for

    def say(self, message: str) -> None:
        self.said.append(message)
        if self.readers is None:
            return
        match = _CARD_STEP.match(message)
        if match and match[1] not in self.absent:
            who, reader = match[1], match[2]
            if self.in_reader.get(reader, who) != who and self.in_reader[reader] in self.leave_in:
                self.waiting[reader] = who
                return
            self._insert(who, reader)
        take_out = _TAKE_OUT.match(message)
        if take_out and self.waiting.get(take_out[3]) == take_out[4]:
            self._insert(self.waiting.pop(take_out[3]), take_out[3])

    def _insert(self, who: str, reader: str) -> None:
        assert self.readers is not None
        self.readers.insert(self.cards[who], PORT_OF[reader])
        self.in_reader[reader] = who

    def password(self, user_id: str) -> str:
        return PASSWORDS[user_id]

    def secret(self, what: str) -> str:
        match = _PIN.match(what)
        if match:
            self.pin_asked.append(match[2])
            return self.pins.get(match[1], PIN)
        return PASSPHRASE

    def confirm(self, message: str) -> bool:
        self.confirmed.append(message)
        return not (self.refuse_confirm and message.startswith(self.refuse_confirm + ":"))


def target_home(path: Path) -> Home:
    """A replacement device's home: empty token, an Administrator, SO and Key Custodian."""
    home = Home.at(path)
    home.device.mkdir(parents=True, mode=0o700)
    (home.device / "policy.toml").write_text(TEST_POLICY)
    init_target_home(
        home,
        [
            ("admin", Role.ADMINISTRATOR, PASSWORDS["admin"]),
            ("security", Role.SECURITY_OFFICER, PASSWORDS["security"]),
            ("custodian", Role.KEY_CUSTODIAN, PASSWORDS["custodian"]),
        ],
    )
    return home
