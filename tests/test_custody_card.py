"""Shares on OpenPGP cards through the real stack: pyscard -> pcscd -> vpcd -> emulated card.

Two vpcd readers (scripts/pcsc-services start): "Virtual PCD 00 00" takes a card on port
35963, "Virtual PCD 00 01" on 35964. The cards are tests/_openpgp_card.py, in threads (so
one card's state can move between readers) or as processes (so a card can be killed).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
from _card_readers import PIN, READERS, Readers
from _openpgp_card import OpenPGPApplet

from meter.custody.card import (
    CardError,
    CardRemoved,
    CardShareStore,
    CardStatus,
    NoCard,
    NoOpenPGPApplet,
    PinBlocked,
    ReadersUnavailable,
    WrongPin,
)
from meter.custody.shares import CustodyShare, Group, Policy, combine, split
from meter.errors import AuthenticationFailed, CustodyError, LockedOut, TokenUnavailable

FIRST, SECOND = READERS


@pytest.fixture(scope="module")
def shares() -> tuple[bytes, list[CustodyShare]]:
    secret = os.urandom(32)
    return secret, split(secret, Policy([Group("officers", 2, 3)], group_threshold=1), "c-card")


def test_two_cards_in_two_readers(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    secret, officers = shares
    one = readers.insert(OpenPGPApplet(serial=1), FIRST)
    two = readers.insert(OpenPGPApplet(serial=2), SECOND)
    status = one.status()
    assert (status.version, status.max_share, status.pin_tries) == ("3.4", 255, 3)
    assert status.serial == "FFFE:00000001" and two.status().serial == "FFFE:00000002"
    one.write(officers[0], PIN)
    two.write(officers[1], PIN)
    back = [one.read(PIN), two.read(PIN)]
    assert back == officers[:2]
    assert combine(back).secret == secret


def test_the_select_is_the_specs_apdu_with_le(readers: Readers) -> None:
    applet = OpenPGPApplet()
    readers.insert(applet, FIRST).status()
    # 00 A4 04 00 06 D2 76 00 01 24 01 00: case 4, Le 00, byte for byte as the card got it.
    assert applet.apdus[0] == bytes.fromhex("00A4040006D2760001240100")


def test_a_pin_goes_only_to_the_card_it_was_asked_for(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    applet = OpenPGPApplet(serial=7)
    store = readers.insert(applet, FIRST)
    with pytest.raises(
        CardError, match=r"serial FFFE:00000007, not FFFE:00000001.*nothing was sent"
    ):
        store.read(PIN, serial="FFFE:00000001")
    with pytest.raises(CardError, match="not FFFE:00000001"):
        store.write(shares[1][0], PIN, serial="FFFE:00000001")
    assert "20" not in applet.log and applet.do_0103 == b""
    # The next custodian's wait: the card with the previous serial is reported, not taken.
    seen: list[CardStatus] = []
    with pytest.raises(NoCard, match=r"no new card .* \(only the card with serial FFFE:00000007\)"):
        store.wait_for_next_card(0.3, other_than="FFFE:00000007", still_there=seen.append)
    assert [s.serial for s in seen] == ["FFFE:00000007"]
    assert store.wait_for_next_card(0.3, other_than="FFFE:00000001").serial == "FFFE:00000007"


def test_wrong_pin_counts_down_then_blocks(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    applet = OpenPGPApplet()
    store = readers.insert(applet, FIRST)
    store.write(shares[1][0], PIN)
    verified = applet.log.count("20")
    for left in (2, 1):
        with pytest.raises(WrongPin, match=f"{left} tr") as wrong:
            store.read("654321")
        assert wrong.value.tries_left == left
        assert isinstance(wrong.value, AuthenticationFailed)
    with pytest.raises(PinBlocked, match="is blocked"):
        store.read("654321")
    with pytest.raises(PinBlocked) as blocked:  # the right PIN no longer helps
        store.read(PIN)
    assert isinstance(blocked.value, LockedOut)
    assert store.status().pin_tries == 0
    assert applet.log.count("20") == verified + 3  # once blocked, no VERIFY is even sent
    assert applet.do_0103 == shares[1][0].to_record()  # the share itself is untouched
    assert PIN not in str(blocked.value) and "654321" not in str(wrong.value)


def test_wrong_pin_answered_6982_reads_tries_from_c4(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    store = readers.insert(OpenPGPApplet(wrong_pin_sw=0x6982), FIRST)
    with pytest.raises(WrongPin, match="2 tries left") as wrong:
        store.read("000000")
    assert wrong.value.tries_left == 2
    store.write(shares[1][0], PIN)  # the right PIN restores the counter
    assert store.status().pin_tries == 3


def test_two_of_three_with_one_card_blocked(readers: Readers) -> None:
    secret = os.urandom(32)
    officers = split(secret, Policy([Group("officers", 2, 3)], 1), "c-blocked")
    cards = [OpenPGPApplet(serial=n) for n in (1, 2, 3)]
    readers.insert(cards[0], FIRST).write(officers[0], PIN)
    readers.insert(cards[1], SECOND).write(officers[1], PIN)
    readers.insert(cards[2], SECOND).write(officers[2], PIN)  # card 2 out, card 3 in

    readers.insert(cards[1], SECOND)
    for _ in range(3):
        with pytest.raises((WrongPin, PinBlocked)):
            readers.store(SECOND).read("999999")

    # The ceremony: card 1 in the first reader, card 2 (blocked) then card 3 in the second.
    recovered = [readers.store(FIRST).read(PIN)]
    with pytest.raises(PinBlocked):
        readers.store(SECOND).read(PIN)
    readers.insert(cards[2], SECOND)
    recovered.append(readers.store(SECOND).read(PIN))
    assert combine(recovered).secret == secret
    with pytest.raises(CustodyError, match="not enough shares"):
        combine(recovered[:1])


def test_card_removed_mid_read(readers: Readers, shares: tuple[bytes, list[CustodyShare]]) -> None:
    # The process kills itself on receiving GET DATA 0103 in a later session: no answer.
    process = readers.spawn(SECOND, "--vanish-on-read")
    store = readers.store(SECOND)
    store.write(shares[1][1], PIN)
    with pytest.raises(
        CardRemoved,
        match=r"left reader Virtual PCD 00 01 .* while reading the share: nothing was changed",
    ) as gone:
        store.read(PIN)
    assert isinstance(gone.value, TokenUnavailable)
    assert process.wait(timeout=5) == -signal.SIGKILL
    with pytest.raises(NoCard, match="no card in reader Virtual PCD 00 01"):
        store.read(PIN)


def test_card_killed_between_steps(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    process = readers.spawn(FIRST)
    store = readers.store(FIRST)
    store.write(shares[1][2], PIN)
    process.kill()
    process.wait(timeout=5)
    readers.wait_until_empty(FIRST)
    with pytest.raises(NoCard, match="no card in reader Virtual PCD 00 00"):
        store.read(PIN)
    with pytest.raises(NoCard):
        store.wait_for_card(0.3)


def test_share_from_another_set_on_a_card(readers: Readers) -> None:
    policy = Policy([Group("officers", 2, 3)], 1)
    first = split(os.urandom(32), policy, "c-one")
    second = split(os.urandom(32), policy, "c-two")
    readers.insert(OpenPGPApplet(serial=1), FIRST).write(first[0], PIN)
    readers.insert(OpenPGPApplet(serial=2), SECOND).write(second[1], PIN)
    back = [readers.store(FIRST).read(PIN), readers.store(SECOND).read(PIN)]
    with pytest.raises(CustodyError, match="2 different splits"):
        combine(back)


def test_tampered_share_on_a_card(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    applet = OpenPGPApplet()
    store = readers.insert(applet, FIRST)
    share = shares[1][0]
    store.write(share, PIN)
    flipped = bytearray(applet.do_0103)
    flipped[-20] ^= 0x04  # one bit of the packed words
    applet.do_0103 = bytes(flipped)
    with pytest.raises(CustodyError, match="damaged or altered: its fingerprint"):
        store.read(PIN)
    # A word changed and the record's fingerprint recomputed: the words' checksum remains.
    words = share.words
    words[12] = "academic" if words[12] != "academic" else "acid"
    applet.do_0103 = dataclasses.replace(share, mnemonic=" ".join(words)).to_record()
    with pytest.raises(CustodyError, match="fails its RS1024 checksum"):
        store.read(PIN)
    applet.do_0103 = b"not a share"
    with pytest.raises(CustodyError, match="no custody share record"):
        store.read(PIN)


def test_share_that_does_not_fit_changes_nothing(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    applet = OpenPGPApplet(max_special_do=64)
    store = readers.insert(applet, FIRST)
    size = len(shares[1][0].to_record())
    with pytest.raises(CardError, match=f"share record is {size} bytes .* at most 64"):
        store.write(shares[1][0], PIN)
    assert applet.do_0103 == b"" and applet.tries == 3 and "20" not in applet.log


def test_card_holding_another_share_is_not_overwritten(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    applet = OpenPGPApplet()
    store = readers.insert(applet, FIRST)
    old, new = shares[1][0], shares[1][1]
    store.write(old, PIN)
    with pytest.raises(CardError, match=f"already holds share {old.group} #1"):
        store.write(new, PIN)
    assert store.read(PIN) == old
    store.write(new, PIN, overwrite=True)
    assert store.read(PIN) == new
    store.erase(PIN)
    with pytest.raises(CardError, match="holds no share: DO 0103 is empty"):
        store.read(PIN)


def test_long_answers_arrive_in_parts(
    readers: Readers, shares: tuple[bytes, list[CustodyShare]]
) -> None:
    applet = OpenPGPApplet(chunk=16)  # every answer above 16 bytes comes as 61 xx + GET RESPONSE
    store = readers.insert(applet, SECOND)
    store.write(shares[1][2], PIN)
    assert store.read(PIN) == shares[1][2]
    assert "C0" in applet.log


def test_card_without_the_applet_or_private_dos(readers: Readers) -> None:
    store = readers.insert(OpenPGPApplet(no_applet=True), FIRST)
    with pytest.raises(NoOpenPGPApplet, match="has no OpenPGP application"):
        store.status()
    store = readers.insert(OpenPGPApplet(private_dos=False), FIRST)
    with pytest.raises(CardError, match="no private-use DOs"):
        store.read(PIN)


def test_pin_the_card_cannot_take_costs_no_try(readers: Readers) -> None:
    applet = OpenPGPApplet()
    store = readers.insert(applet, FIRST)
    with pytest.raises(CardError, match="6 to 127 characters; nothing was sent"):
        store.read("123")
    assert applet.tries == 3


def test_unknown_reader_and_empty_reader(readers: Readers) -> None:
    with pytest.raises(ReadersUnavailable, match=r"no reader named 'Nope'.*Virtual PCD 00 00"):
        CardShareStore("Nope").status()
    with pytest.raises(NoCard, match="no card in reader Virtual PCD 00 01"):
        readers.store(SECOND).status()


def test_only_the_custody_package_imports_pyscard() -> None:
    package = Path(__file__).parents[1] / "meter"
    importers = {
        str(path.relative_to(package.parent))
        for path in package.rglob("*.py")
        if any(
            line.lstrip().startswith(("import smartcard", "from smartcard"))
            for line in path.read_text().splitlines()
        )
    }
    assert importers == {"meter/custody/card.py"}
