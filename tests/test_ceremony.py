"""The whole ceremony through real parts: two device processes (SoftHSM2), two emulated
OpenPGP cards moved between two vpcd readers, sealed files and paper.

Export for a move from the source, "2 of 3 officers and 1 of 2 auditors"; import into a
new token with one officer's card PIN blocked; the target then issues where the source
stopped, and the source is withdrawn for good.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _card_readers import READERS, Readers
from _openpgp_card import OpenPGPApplet
from cryptography.hazmat.primitives import serialization

from meter.cli import workflows
from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.custody.card import CardRemoved
from meter.custody.ceremony import CeremonyResult, Place, export_keys, import_keys
from meter.custody.ceremony_transcript import verify_transcript
from meter.custody.paper import from_paper
from meter.custody.shares import Group, Policy
from meter.errors import CustodyError, DeviceLocked
from meter.host import DeviceClient
from meter.psd.firmware import PSD
from meter.psd.roles import Role
from tests._ceremony import PASSWORDS, People, target_home
from tests.conftest import LETTER, local_grant

FIRST, SECOND = READERS.values()
POLICY = Policy([Group("officers", 2, 3), Group("auditors", 1, 2)], group_threshold=2)


def _places(tmp: Path) -> list[Place]:
    return [
        Place("card", FIRST, "alice"),  # officers 1
        Place("card", SECOND, "bob"),  # officers 2
        Place("sealed", str(tmp / "carol.share"), "carol", log2_n=14),  # officers 3
        Place("paper", str(tmp / "dave.txt"), "dave"),  # auditors, copy 1
        Place("sealed", str(tmp / "erin.share"), "erin", log2_n=14),  # auditors, copy 2
    ]


def _issue_one(home: Home) -> None:
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon("customer", PASSWORDS["customer"])
        psd.create_indicium(LETTER)


def test_move_to_a_replacement_token_with_cards_sealed_files_and_paper(
    device_home: Home, readers: Readers, tmp_path: Path
) -> None:
    source = device_home
    _issue_one(source)
    out = tmp_path / "ceremony"
    out.mkdir()
    people = People(readers, {"alice": OpenPGPApplet(serial=1), "bob": OpenPGPApplet(serial=2)})
    with running_device(source), DeviceClient(source.socket) as client:
        exported = export_keys(
            client,
            ceremony="move-1",
            purpose="export-move",
            policy=POLICY,
            places=_places(out),
            officer="security",
            custodian="custodian",
            out=out,
            prompter=people,
        )
    files = exported.files
    bundle = json.loads(files["bundle"].read_text())
    # The transcript is signed by the source's audit key and holds no share's words.
    audit_spki = next(k for k in bundle["keys"] if k["label"] == "audit-signing")["public_spki"]
    audit_pem = serialization.load_der_public_key(bytes.fromhex(audit_spki)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = verify_transcript(json.loads(files["transcript"].read_text()), audit_pem)
    assert body["outcome"] == "completed" and len(body["shares"]) == 5
    assert [s["custodian"] for s in body["shares"]] == ["alice", "bob", "carol", "dave", "erin"]
    # Which card took which share: its serial (the PIN was asked for that card only).
    assert [s.get("card_serial") for s in body["shares"][:3]] == [
        "FFFE:00000001",
        "FFFE:00000002",
        None,
    ]
    assert body["final_registers"]["statement"]["piece_count"] == 1
    # What the device vouches for itself: the KCVs it wrapped, its serial, who authorized.
    assert body["device"]["kcvs"] == {k["label"]: k["kcv"] for k in bundle["keys"]}
    assert body["device"]["device_serial"] == bundle["device"]["device_serial"]
    assert body["device"]["authorized_by"] == "security"
    assert [s["role"] for s in body["steps"]] == [
        "security-officer",
        "key-custodian",
        "security-officer",
    ]
    # No run of three of dave's words: single SLIP-39 words are common English ones that
    # may occur in any text (one did, as a substring), a leaked share carries every run.
    words = from_paper((out / "dave.txt").read_text()).words
    text = " ".join(re.findall(r"[a-z]+", files["transcript"].read_text().lower()))
    runs = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    assert not any(f" {run} " in f" {text} " for run in runs)
    assert people.cards["alice"].do_0103 and people.cards["bob"].do_0103

    # The source is withdrawn for the move and never signs again.
    with PSD.power_up(source.open_device_token(), source.device) as psd:
        psd.logon("customer", PASSWORDS["customer"])
        with pytest.raises(DeviceLocked, match="withdrawn"):
            psd.create_indicium(LETTER)
        assert psd._device_state().withdrawn_for == "move-1"
        # Its signing, audit and key-exchange keys are gone: they live in the replacement.
        for label in ("indicium-signing", "audit-signing", "key-exchange"):
            assert not psd.token.has_key(label), label
        assert psd.token.has_key("register-mac")  # the final registers stay readable

    # Import: alice's PIN is blocked; bob, carol (sealed) and dave (paper) make up the rule.
    people.cards["alice"].tries = 0
    target = target_home(tmp_path / "target")
    check = bytes.fromhex(body["keys"]["share_check_value"])
    with running_device(target), DeviceClient(target.socket) as client:
        imported = import_keys(
            client,
            bundle_path=files["bundle"],
            final_registers_path=files["final_registers"],
            places=[_places(out)[i] for i in (0, 1, 2, 3)],
            expected_check=check,
            postal_root_pem=(source.certs / "postal-root.pem").read_bytes(),
            officer="security",
            custodian="custodian",
            out=out,
            prompter=people,
        )
    result = imported.device
    assert result["registers"] == {"ascending": 730, "descending": 99_270, "piece_count": 1}
    assert result["kcvs_verified"] == body["keys"]["kcvs"]
    assert result["module_state"] == "authorized"
    import_body = verify_transcript(json.loads(imported.files["transcript"].read_text()), audit_pem)
    assert [r["custodian"] for r in import_body["refused"]] == ["alice"]
    assert "blocked" in import_body["refused"][0]["reason"]
    assert import_body["refused"][0]["card_serial"] == "FFFE:00000001"
    assert import_body["shares"][0]["card_serial"] == "FFFE:00000002"
    # Import walks each custodian as export does: card in, PIN, the share confirmed.
    assert "bob: insert your card into reader 'Virtual PCD 00 01'" in people.said
    assert any(m.startswith("carol: this is share officers #3") for m in people.confirmed)

    # The replacement issues where the source stopped, under the same certificate.
    with _as(target, "security") as psd:
        psd.administration_authorization(True)
    with _as(target, "admin") as psd:
        psd.create_user("provider", Role.PROVIDER, PASSWORDS["provider"])
        psd.create_user("customer", Role.CUSTOMER, PASSWORDS["customer"])
    authorization = workflows.local_customer_authorization(
        source, workflows.DEMO_CUSTOMER, device_serial=bundle["device"]["device_serial"]
    )
    with _as(target, "provider") as psd:
        psd.authorize_customer(authorization)
        request = psd.request_credit()
    grant = local_grant(source, 5_000)(request)  # the same provider (the source's home)
    with _as(target, "provider") as psd:
        assert psd.apply_credit(grant)["descending"] == 99_270 + 5_000
    with _as(target, "customer") as psd:
        indicium = psd.create_indicium(LETTER)
        assert (indicium.sequence, indicium.ascending) == (2, 1460)
        certificates = psd._require_meter().certificates
        assert certificates is not None
        assert (
            certificates.meter.public_bytes(serialization.Encoding.PEM).decode()
            == (bundle["certificates"]["meter"])
        )


@contextmanager
def _as(home: Home, user_id: str) -> Iterator[PSD]:
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(user_id, PASSWORDS[user_id])
        yield psd


def test_an_unconfirmed_fingerprint_or_a_pulled_card_stops_the_export_and_changes_nothing(
    device_home: Home, readers: Readers, tmp_path: Path
) -> None:
    people = People(
        readers,
        {"alice": OpenPGPApplet(serial=1), "bob": OpenPGPApplet(serial=2)},
        refuse_confirm="carol",
    )
    with running_device(device_home), DeviceClient(device_home.socket) as client:
        with pytest.raises(CustodyError, match="did not confirm"):
            export_keys(
                client,
                ceremony="move-2",
                purpose="export-move",
                policy=POLICY,
                places=_places(tmp_path),
                officer="security",
                custodian="custodian",
                out=tmp_path,
                prompter=people,
            )
        # The failed run's transcript says why, signed by the source's audit key.
        failed = _verified(
            tmp_path / "move-2.transcript.failed.json", tmp_path / "move-2.bundle.json"
        )
        assert failed["outcome"] == "failed" and "carol did not confirm" in failed["reason"]
        assert [s["custodian"] for s in failed["shares"]] == ["alice", "bob"]
        # Not withdrawn: a customer still issues; and a rerun of the ceremony completes.
        with DeviceClient(device_home.socket) as customer:  # its session ends as it closes
            customer.logon("customer", PASSWORDS["customer"])
            customer.issue(LETTER)
        people.refuse_confirm = None
        # Second attempt: alice pulls her card out while the meter reads what it holds.
        people.cards["alice"].vanish_on_read = True
        with pytest.raises(CardRemoved, match="left reader"):
            export_keys(
                client,
                ceremony="move-2",
                purpose="export-move",
                policy=POLICY,
                places=_places(tmp_path / "second"),
                officer="security",
                custodian="custodian",
                out=tmp_path / "second",
                prompter=people,
            )
        people.cards["alice"].vanish_on_read = False
        second = tmp_path / "second"
        pulled = _verified(second / "move-2.transcript.failed.json", second / "move-2.bundle.json")
        assert pulled["outcome"] == "failed" and "left reader" in pulled["reason"]
        with DeviceClient(device_home.socket) as customer:  # still not withdrawn
            customer.logon("customer", PASSWORDS["customer"])
            assert customer.get("/v1/status")["module_state"] == "authorized"
        result = export_keys(
            client,
            ceremony="move-2",
            purpose="export-move",
            policy=POLICY,
            places=_places(tmp_path / "again"),
            officer="security",
            custodian="custodian",
            out=tmp_path / "again",
            prompter=people,
        )
    statement = json.loads(result.files["final_registers"].read_text())["statement"]
    assert statement["piece_count"] == 1 and statement["ceremony"] == "move-2"
    # The rerun overwrote the cards' shares of the first attempt, with their consent.
    assert any("Overwrite" in message for message in people.confirmed)


def _verified(transcript: Path, bundle_path: Path) -> dict[str, Any]:
    """The transcript's body, checked under the audit key the bundle names."""
    bundle = json.loads(bundle_path.read_text())
    spki = next(k for k in bundle["keys"] if k["label"] == "audit-signing")["public_spki"]
    pem = serialization.load_der_public_key(bytes.fromhex(spki)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return verify_transcript(json.loads(transcript.read_text()), pem)


def test_a_card_left_in_the_reader_gets_no_pin_of_the_next_custodian(
    device_home: Home, readers: Readers, tmp_path: Path
) -> None:
    """alice and bob share one reader, and alice leaves her card in: the ceremony asks for
    it to come out, and bob's PIN goes only to bob's card."""
    people = People(
        readers,
        {"alice": OpenPGPApplet(serial=1), "bob": OpenPGPApplet(serial=2)},
        leave_in={"alice"},
    )
    with running_device(device_home), DeviceClient(device_home.socket) as client:
        result = export_keys(
            client,
            ceremony="backup-1",
            purpose="export-backup",
            policy=Policy([Group("officers", 2, 2)], group_threshold=1),
            places=[Place("card", FIRST, "alice"), Place("card", FIRST, "bob")],
            officer="security",
            custodian="custodian",
            out=tmp_path,
            prompter=people,
        )
    assert (
        f"take alice's card (serial FFFE:00000001) out of reader '{FIRST}': it is bob's turn"
        in (people.said)
    )
    assert people.pin_asked == ["FFFE:00000001", "FFFE:00000002"]
    alice, bob = people.cards["alice"], people.cards["bob"]
    assert alice.log.count("20") == 1 and bob.log.count("20") == 1  # one VERIFY each
    assert alice.do_0103 and bob.do_0103 and alice.do_0103 != bob.do_0103
    serials = [s["card_serial"] for s in result.transcript["transcript"]["shares"]]
    assert serials == ["FFFE:00000001", "FFFE:00000002"]


def test_a_move_whose_last_answer_was_lost_hands_out_its_documents_on_a_rerun(
    device_home: Home, tmp_path: Path
) -> None:
    """The host cannot write the final-register statement after the source committed the
    move (as if it crashed with the answer): the rerun, refused Key Administration on the
    withdrawn source, gets the same statement and transcript without any share step."""
    first, again = tmp_path / "first", tmp_path / "again"
    (first / "paper-move.final-registers.json").mkdir(parents=True)  # the write fails
    people = People(None)

    def move(client: DeviceClient, out: Path) -> CeremonyResult:
        return export_keys(
            client,
            ceremony="paper-move",
            purpose="export-move",
            policy=Policy([Group("officers", 1, 1)], group_threshold=1),
            places=[Place("paper", str(out / "p.txt"), "dave")],
            officer="security",
            custodian="custodian",
            out=out,
            prompter=people,
        )

    with running_device(device_home), DeviceClient(device_home.socket) as client:
        with pytest.raises(IsADirectoryError):
            move(client, first)
        assert not list(first.glob("*transcript*"))  # no "failed": it moved
        assert any("rerun with --ceremony-id paper-move" in m for m in people.said)
        people.said.clear()
        result = move(client, again)
        status = client.get("/v1/status")
    assert not any(m.startswith("Share for") for m in people.said)  # no share asked again
    assert not (again / "p.txt").exists() and "bundle" not in result.files
    body = _verified(result.files["transcript"], first / "paper-move.bundle.json")
    assert body["outcome"] == "completed" and [s["custodian"] for s in body["shares"]] == ["dave"]
    statement = json.loads(result.files["final_registers"].read_text())
    assert statement == body["final_registers"] and statement["statement"]["piece_count"] == 0
    assert status["module_state"] == "withdrawn"
