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
from cryptography.hazmat.primitives import serialization
from test_custody_card import READERS, Readers

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.custody import paper
from meter.custody.card import CardError, list_readers
from meter.custody.ceremony import Place, import_keys
from meter.custody.ceremony_transcript import verify_transcript
from meter.custody.shares import CustodyShare, Group, Policy, split
from meter.errors import ConfigurationError, CustodyError, MeterError
from meter.host import DeviceClient
from meter.psd.firmware import PSD
from tests._ceremony import PASSWORDS, PIN, People, target_home
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
            after_import=kw.get("after_import"),
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
        # The failed import's transcript: no audit key on the target yet, so unsigned, and
        # saying so; the device's audit log keeps it too (checked below).
        document = json.loads((tmp_path / "out" / "m1.import-transcript.failed.json").read_text())
        body = document["transcript"]
        assert body["outcome"] == "failed" and "not enough shares" in body["reason"]
        assert document["signature"] is None and "no audit key" in document["unsigned"]
        assert [s["custodian"] for s in body["shares"]] == ["alice"]
        with pytest.raises(CustodyError, match="not signed: the device has no audit key"):
            verify_transcript(document, (tmp_path / "root.pem").read_bytes())
        _still_empty(target)
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
    with PSD.power_up(target.open_device_token(), target.device) as psd:
        psd.logon("custodian", PASSWORDS["custodian"])
        kept = [r for r in psd.audit.records() if r.service == "ceremony-transcript"]
    outcomes = [(r.values["transcript"]["outcome"], "unsigned" in r.values) for r in kept]
    assert outcomes[0] == ("failed", True) and outcomes[-1] == ("completed", False)


def test_an_import_whose_transcript_was_not_signed_is_finished_by_a_rerun(
    moved: tuple[Path, Path, list[CustodyShare]], tmp_path: Path
) -> None:
    """The target's device dies between the import (committed) and the transcript: the
    rerun asks for no share, checks the KCVs, and has the imported audit key sign it."""
    _, _, shares = moved
    target = target_home(tmp_path / "target")
    places = [_sheet(tmp_path / f"{n}.txt", shares[n], who) for n, who in ((0, "a"), (1, "b"))]
    out = tmp_path / "out" / "m1.import-transcript.json"
    with running_device(target) as device:

        def die() -> None:  # the device process dies with the import's answer sent
            device.kill()
            device.wait(timeout=10)

        with pytest.raises(MeterError):
            _run(target, moved, places, after_import=die)
    lost = json.loads(out.with_name("m1.import-transcript.failed.json").read_text())
    assert lost["signature"] is None and "rerun the same import" in lost["transcript"]["reason"]
    people = People(None)
    with running_device(target):
        assert _run(target, moved, places, people=people) == {"resumed": "transcript"}
        assert not any(m.startswith(("a:", "b:")) for m in people.said)  # no share asked
        # Signed now: a further rerun is a second import, refused.
        with pytest.raises(ConfigurationError, match="holds a meter signing key already"):
            _run(target, moved, places)
    document = json.loads(out.read_text())
    spki = json.loads(moved[0].read_text())["keys"]
    audit = next(k for k in spki if k["label"] == "audit-signing")["public_spki"]
    pem = serialization.load_der_public_key(bytes.fromhex(audit)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = verify_transcript(document, pem)
    assert body["outcome"] == "completed" and body["device"]["kcvs"] == body["keys"]["kcvs"]


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
