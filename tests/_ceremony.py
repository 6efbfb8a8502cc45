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
_CARD_STEP = re.compile(
    r"^(\S+): (?:insert your card into reader|your share from the card in reader) '(.+)'$"
)
_PIN = re.compile(r"^PIN of (\S+)'s card$")
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

    def say(self, message: str) -> None:
        self.said.append(message)
        match = _CARD_STEP.match(message)
        if match and self.readers is not None and match[1] not in self.absent:
            self.readers.insert(self.cards[match[1]], PORT_OF[match[2]])

    def password(self, user_id: str) -> str:
        return PASSWORDS[user_id]

    def secret(self, what: str) -> str:
        match = _PIN.match(what)
        if match:
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
