"""Import with bad shares, through the target's device process: k-1 shares, a share from
another ceremony, a tampered share, a wrong check value, a card pulled out mid-read.
Each is refused with a clear error before the device sees a transport key, and the target
stays an empty token; the good set then imports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from _openpgp_card import OpenPGPApplet
from conftest import require_service
from test_custody_card import READERS, Readers

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.custody import paper
from meter.custody.card import CardError, list_readers
from meter.custody.ceremony import Place, import_keys
from meter.custody.shares import CustodyShare, Group, Policy, split
from meter.errors import CustodyError
from meter.host import DeviceClient
from tests._ceremony import PIN, People, target_home
from tests.test_ceremony_refusals import _move

POLICY = Policy([Group("officers", 2, 3)], group_threshold=1)
FIRST, SECOND = READERS.values()


@pytest.fixture
def moved(device_home: Home, tmp_path: Path) -> tuple[Path, Path, list[CustodyShare]]:
    """A move exported in-process (the device's own steps), its key split here."""
    bundle, key, statement = _move(device_home)
    shares = split(key, POLICY, "m1")
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    (tmp_path / "final.json").write_text(json.dumps(statement))
    (tmp_path / "root.pem").write_bytes((device_home.certs / "postal-root.pem").read_bytes())
    return tmp_path / "bundle.json", tmp_path / "final.json", shares


def _sheet(path: Path, share: CustodyShare, custodian: str) -> Place:
    path.write_text(paper.to_paper(share))
    return Place("paper", str(path), custodian)


def _run(
    target: Home, moved: tuple[Path, Path, list[CustodyShare]], places: list[Place], **kw: Any
) -> dict[str, Any]:
    bundle, final, shares = moved
    people: People = kw.pop("people", People(None))
    with DeviceClient(target.socket) as client:
        result = import_keys(
            client,
            bundle_path=bundle,
            final_registers_path=final,
            places=places,
            expected_check=kw.get("check", shares[0].check),
            postal_root_pem=(bundle.parent / "root.pem").read_bytes(),
            officer="security",
            custodian="custodian",
            out=bundle.parent / "out",
            prompter=people,
        )
    return result.device


def _still_empty(target: Home) -> None:
    with DeviceClient(target.socket) as client:
        assert client.get("/v1/status")["module_state"] == "uninitialized"
        client.logon("custodian", "Keeper-pass-0007")
        status = client.get("/v1/status")
        assert status["keys"]["indicium-signing"]["present"] is False
        assert status["keys"]["register-mac"]["present"] is False


def test_bad_shares_are_refused_and_change_nothing(
    moved: tuple[Path, Path, list[CustodyShare]], tmp_path: Path
) -> None:
    _, _, shares = moved
    target = target_home(tmp_path / "target")
    one = _sheet(tmp_path / "one.txt", shares[0], "alice")
    two = _sheet(tmp_path / "two.txt", shares[1], "bob")
    foreign = split(os.urandom(32), POLICY, "m1")[1]  # same ceremony id, another split
    other = _sheet(tmp_path / "other.txt", foreign, "mallory")
    text = (tmp_path / "two.txt").read_text()
    word = shares[1].words[5]
    replacement = "academic" if word != "academic" else "acid"
    tampered = tmp_path / "tampered.txt"
    tampered.write_text(text.replace(f" {word}", f" {replacement}", 1))
    with running_device(target):
        with pytest.raises(CustodyError, match="not enough shares"):
            _run(target, moved, [one])
        with pytest.raises(CustodyError, match=r"different splits|digest"):
            _run(target, moved, [one, other])
        people = People(None)
        with pytest.raises(CustodyError, match="not enough shares"):
            _run(target, moved, [one, Place("paper", str(tampered), "bob")], people=people)
        refused = [m for m in people.said if m.startswith("not used")]
        assert len(refused) == 1 and ("checksum" in refused[0] or "fingerprint" in refused[0])
        with pytest.raises(CustodyError, match="check value"):
            _run(target, moved, [one, two], check=bytes(16))
        _still_empty(target)
        result = _run(target, moved, [one, two])
    assert result["registers"]["descending"] == 100_000


def test_a_card_pulled_out_mid_read_is_skipped_and_others_make_up_the_count(
    moved: tuple[Path, Path, list[CustodyShare]], tmp_path: Path
) -> None:
    try:
        names = list_readers()
    except CardError:
        names = []
    require_service(all(n in names for n in READERS.values()), "pcscd with two vpcd readers")
    _, _, shares = moved
    readers = Readers()
    try:
        cards = {"alice": OpenPGPApplet(serial=1), "bob": OpenPGPApplet(serial=2)}
        for applet, share, port in zip(cards.values(), shares, READERS, strict=False):
            readers.insert(applet, port).write(share, PIN)
        cards["alice"].vanish_on_read = True  # alice pulls her card out as it is read
        target = target_home(tmp_path / "target")
        carol = _sheet(tmp_path / "carol.txt", shares[2], "carol")
        people = People(readers, cards)
        places = [Place("card", FIRST, "alice"), Place("card", SECOND, "bob"), carol]
        with running_device(target):
            result = _run(target, moved, places, people=people)
        assert result["module_state"] == "authorized"
        assert any("not used" in m and "left reader" in m for m in people.said), people.said
    finally:
        readers.clear()
