"""Register reconciliation over indicia signed here by the test meters' keys, and on SoftHSM2."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import _vectors
import pytest
from _vectors import ECDSA_SERIAL, signed
from click.testing import CliRunner

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.main import cli
from meter.errors import ConfigurationError, InvalidInput
from meter.indicium import Algorithm
from meter.postoffice import MemoryReplayStore, Verdict, Verifier
from meter.postoffice.reconcile import (
    FindingKind,
    ReconciliationReport,
    RegisterLedger,
    load_credited,
    reconcile,
)
from tests.conftest import ROLE_USERS

VECTORS = _vectors.load()
TODAY = _vectors.verification_date(VECTORS)
ECDSA, EDDSA = Algorithm.ECDSA_P256, Algorithm.ED25519
SERIAL = _vectors.ECDSA_SERIAL
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
CREDIT = 20_000


def honest(postages: Sequence[int], credit: int = CREDIT, first: int = 1) -> list[bytes]:
    """Pieces first, first+1, ... of an honest meter credited ``credit`` mills."""
    pieces, ascending = [], 0
    for offset, postage in enumerate(postages):
        ascending += postage
        pieces.append(piece(first + offset, ascending, credit - ascending, postage))
    return pieces


def piece(sequence: int, ascending: int, descending: int, postage: int, **more: object) -> bytes:
    return signed(
        VECTORS,
        ECDSA,
        sequence=sequence,
        ascending=ascending,
        descending=descending,
        postage=postage,
        **more,
    )


def verify_into(ledger: RegisterLedger, batches: Sequence[Sequence[bytes]]) -> list[Verdict]:
    """Verify each batch as one office would (one replay store for all), record, return verdicts."""
    verifier = Verifier(
        _vectors.trust_store(VECTORS), _vectors.revocations(VECTORS), MemoryReplayStore(), TODAY
    )
    verdicts = []
    for batch in batches:
        results = verifier.verify_batch(list(batch))
        ledger.record(results)
        verdicts += [r.verdict for r in results]
    return verdicts


def report_of(
    tmp_path: Path, *batches: Sequence[bytes], credited: dict[int, int] | None = None
) -> ReconciliationReport:
    tmp_path.mkdir(exist_ok=True)
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        verify_into(ledger, batches)
        return reconcile(ledger, credited)


def kinds(report: ReconciliationReport) -> list[tuple[FindingKind, tuple[int, ...]]]:
    return [(f.kind, f.sequences) for f in report.findings]


def test_an_honest_meter_is_clean_whatever_the_order_of_arrival(tmp_path: Path) -> None:
    pieces = honest([730, 500, 1200, 730, 90])
    shuffled = pieces[:]
    random.Random(7).shuffle(shuffled)
    # Two offices' days: different batches, out of order.
    report = report_of(tmp_path, shuffled[:2], shuffled[2:], credited={SERIAL: CREDIT})
    assert report.clean, report.findings
    (device,) = report.devices
    assert (device.pieces, device.first_sequence, device.last_sequence) == (5, 1, 5)
    assert (device.last_ascending, device.last_descending) == (3250, CREDIT - 3250)
    assert device.credited == CREDIT and device.missing == 0
    assert report.to_json()["clean"] is True


def test_ascending_step(tmp_path: Path) -> None:
    pieces = honest([730, 500])
    pieces.append(piece(3, 1230 + 730 + 100, CREDIT - 1230 - 730 - 100, 730))
    report = report_of(tmp_path, pieces)
    assert kinds(report) == [(FindingKind.ASCENDING_STEP, (2, 3))]
    assert "grew by 830" in report.findings[0].detail


def test_gaps_allow_growth_of_at_least_the_later_postage(tmp_path: Path) -> None:
    pieces = honest([730, 500, 1200, 730, 90])
    report = report_of(tmp_path, [pieces[0], pieces[1], pieces[4]])
    assert report.clean and report.devices[0].missing == 2
    # Across the gap 2..5 the ascending register grows by only 50, less than piece 5's 90.
    too_little = piece(5, 1230 + 50, CREDIT - 1280, 90)
    report = report_of(tmp_path / "b", [pieces[0], pieces[1], too_little])
    assert kinds(report) == [(FindingKind.ASCENDING_STEP, (2, 5))]


def test_ascending_not_monotone(tmp_path: Path) -> None:
    pieces = honest([730, 500])
    pieces.append(piece(3, 900, CREDIT - 900, 730))  # lower than piece 2's 1230
    report = report_of(tmp_path, pieces)
    assert kinds(report) == [(FindingKind.ASCENDING_NOT_MONOTONE, (2, 3))]


def test_register_sum_may_rise_by_credit_but_never_fall(tmp_path: Path) -> None:
    pieces = honest([730, 500])
    # A credit of 5000 between pieces 2 and 3: the sum rises, which is fine.
    credited = honest([730, 500, 300], credit=CREDIT + 5000)[2:]
    assert report_of(tmp_path, pieces, credited).clean
    # The descending register fell by more than the postage: the sum fell.
    fell = piece(3, 1530, CREDIT - 1530 - 1000, 300)
    report = report_of(tmp_path / "b", pieces, [fell])
    assert kinds(report) == [(FindingKind.REGISTER_SUM, (2, 3))]


def test_registers_above_the_providers_credit(tmp_path: Path) -> None:
    pieces = honest([730, 500, 1200])
    report = report_of(tmp_path, pieces, credited={SERIAL: 1000})
    assert kinds(report) == [
        (FindingKind.OVER_CREDITED, (2, 3)),
        (FindingKind.REGISTER_SUM, (1, 2, 3)),
    ]
    assert report.devices[0].credited == 1000
    # A meter that inflated its descending register claims credit never granted.
    inflated = honest([730, 500], credit=CREDIT + 9000)
    report = report_of(tmp_path / "b", inflated, credited={SERIAL: CREDIT})
    assert kinds(report) == [(FindingKind.REGISTER_SUM, (1, 2))]


def test_a_reissued_sequence_is_a_conflict_but_a_malleated_signature_is_not(
    tmp_path: Path,
) -> None:
    pieces = honest([730, 500, 1200])
    # A rolled-back meter issues piece 3 again, for another address and postage.
    again = piece(3, 1230 + 90, CREDIT - 1320, 90, address_digest=bytes(8))
    s = int.from_bytes(pieces[0][116:148])
    malleated = pieces[0][:116] + (P256_ORDER - s).to_bytes(32)
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        verdicts = verify_into(ledger, [pieces, [again, malleated, again]])
        assert verdicts[3:] == [Verdict.DUPLICATE] * 3
        assert len(ledger) == 4  # the conflicting copy once; the malleated one is the same piece
        report = reconcile(ledger)
    assert kinds(report) == [(FindingKind.SEQUENCE_CONFLICT, (3,))]
    assert "rolled back or cloned" in report.findings[0].detail
    assert report.devices[0].pieces == 3 and report.devices[0].copies == 4


def test_a_duplicate_seen_first_is_recorded(tmp_path: Path) -> None:
    """With a replay store shared by several offices, this office may see only the DUPLICATE."""
    first = honest([730])[0]
    verifier = Verifier(
        _vectors.trust_store(VECTORS), _vectors.revocations(VECTORS), MemoryReplayStore(), TODAY
    )
    verifier.verify(first)  # accepted at another office
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        ledger.record([verifier.verify(first)])
        assert len(ledger) == 1 and reconcile(ledger).clean


def test_specimens_take_a_sequence_and_no_postage(tmp_path: Path) -> None:
    pieces = honest([730])
    specimen = piece(2, 730, CREDIT - 730, 0, flags=2)
    pieces += [specimen, piece(3, 1230, CREDIT - 1230, 500)]
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        verdicts = verify_into(ledger, [pieces, [specimen]])
        assert verdicts == [Verdict.VALID, Verdict.SPECIMEN, Verdict.VALID, Verdict.SPECIMEN]
        assert len(ledger) == 3  # the specimen once
        report = reconcile(ledger)
    assert report.clean and report.devices[0].missing == 0
    # A specimen that moves the ascending register breaks the step rule.
    moved = piece(2, 830, CREDIT - 830, 0, flags=2)
    report = report_of(tmp_path / "b", [pieces[0], moved])
    assert kinds(report) == [(FindingKind.ASCENDING_STEP, (1, 2))]


def test_corrections_follow_the_same_rules(tmp_path: Path) -> None:
    pieces = honest([730, 500])
    pieces.append(piece(3, 1230 + 70, CREDIT - 1300, 70, flags=1, reference_sequence=1))
    assert report_of(tmp_path, pieces).clean


def test_devices_are_reconciled_apart_and_other_verdicts_are_not_recorded(
    tmp_path: Path,
) -> None:
    ecdsa = honest([730, 500])
    eddsa = [
        signed(VECTORS, EDDSA, sequence=1, ascending=100, descending=900, postage=100),
        signed(VECTORS, EDDSA, sequence=2, ascending=50, descending=950, postage=100),
    ]
    forged = ecdsa[0][:84] + bytes(64)
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        verify_into(ledger, [[*ecdsa, *eddsa, forged, b"garbage"]])
        assert len(ledger) == 4
        report = reconcile(ledger, {_vectors.ED25519_SERIAL: 1000, 12345: 500})
    assert [(f.device_serial, f.kind) for f in report.findings] == [
        (_vectors.ED25519_SERIAL, FindingKind.ASCENDING_NOT_MONOTONE)
    ]
    serials = [d.device_serial for d in report.devices]
    assert serials == [_vectors.ED25519_SERIAL, SERIAL, 12345]  # a credited device with no piece
    assert report.devices[2].pieces == 0


def test_the_ledger_survives_reopening_and_refuses_what_is_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "registers.sqlite"
    with RegisterLedger.open(path) as ledger:
        verify_into(ledger, [honest([730, 500])])
    with RegisterLedger.open(path) as ledger:
        assert len(ledger) == 2
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ConfigurationError, match=str(garbage)):
        RegisterLedger.open(garbage)
    assert garbage.read_bytes() == b"this is not a database at all" * 100
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(ConfigurationError, match="not a version 2 register ledger"):
        RegisterLedger.open(other)


def test_the_ledger_keeps_who_recorded_each_piece_and_when(tmp_path: Path) -> None:
    first, second = honest([730, 500])
    verifier = Verifier(
        _vectors.trust_store(VECTORS), _vectors.revocations(VECTORS), MemoryReplayStore(), TODAY
    )
    at = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        ledger.record(verifier.verify_batch([first]), station="counter-1", at=at)
        again = verifier.verify_batch([first])
        assert [r.verdict for r in again] == [Verdict.DUPLICATE]
        ledger.record(again, station="counter-2")  # same signed part: not a new copy
        found = ledger.first_accepted([(ECDSA_SERIAL, 1), (ECDSA_SERIAL, 2)])
        assert found[0] is not None and found[0].to_json() == {
            "station": "counter-1",
            "at": "2026-12-02T09:30:00+00:00",
        }
        assert found[1] is None  # never accepted here
        assert [(p.station, p.recorded_at) for p in ledger.pieces()] == [("counter-1", at)]
        ledger.record(verifier.verify_batch([second]))
        assert [p.station for p in ledger.pieces()] == ["counter-1", "local"]


def test_a_format_1_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "registers.sqlite"
    with RegisterLedger.open(path) as ledger:
        verify_into(ledger, [honest([730])])
    with sqlite3.connect(path) as db:  # what format 1 was: no station, no time
        db.execute("ALTER TABLE pieces DROP COLUMN station")
        db.execute("ALTER TABLE pieces DROP COLUMN recorded_at")
        db.execute("PRAGMA user_version = 1")
    with RegisterLedger.open(path) as ledger:
        (only,) = ledger.pieces()
        assert (only.station, only.recorded_at, only.postage) == ("unknown", None, 730)
        assert ledger.first_accepted([(ECDSA_SERIAL, 1)])[0] is not None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "'format' must be 'pim-credited-v1'"),
        ({"devices": {"12x": 5}}, "is not a decimal integer"),
        ({"devices": {"12": -5}}, "must be 0 to"),
        ({"devices": {"12": True}}, "must be 0 to"),
        ({"extra": 1}, "unknown members ['extra']"),
        ({"generated_at": "yesterday"}, "not an ISO-8601 time"),
        ({"signature": "abcd"}, "64 bytes of hex"),
    ],
)
def test_credited_exports_are_checked_strictly(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    document: dict[str, object] = {
        "format": "pim-credited-v1",
        "authorization_id": 60669,
        "generated_at": "2026-01-02T03:04:05+00:00",
        "devices": {str(SERIAL): 1000},
        "signature": "00" * 64,
    }
    path = tmp_path / "credited.json"
    path.write_text(json.dumps(document))
    assert load_credited(path) == {SERIAL: 1000}  # format only: no trust store given
    path.write_text(json.dumps({**document, **change}))
    with pytest.raises(InvalidInput) as caught:
        load_credited(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


# -- end to end on SoftHSM2 ------------------------------------------------------------------


def run(home: Path, *args: str, exit_code: int = 0, role: str | None = None) -> dict[str, object]:
    """``meter --json ARGS``; with ``role``, logged on as that role's test user."""
    user: list[str] = []
    env = {}
    if role is not None:
        user_id, password = ROLE_USERS[role]
        user, env = ["--user", user_id], {"METER_PASSWORD": password}
    result = CliRunner().invoke(cli, ["--home", str(home), "--json", *user, *args], obj={}, env=env)
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout.splitlines()[-1]) if result.stdout else {}


def issue(home: Path, postage: str) -> str:
    out = run(
        home,
        "issue",
        "--postage",
        postage,
        "--from-zip",
        "94043",
        "--to-zip",
        "62704",
        "--to",
        "Jane|1 Main St",
        role="customer",
    )
    return str(out["indicium_hex"])


def verify_all(home: Path, hexes: Sequence[str], tmp_path: Path) -> list[str]:
    listing = tmp_path / f"in-{len(list(tmp_path.iterdir()))}.txt"
    listing.write_text("".join(h + "\n" for h in hexes))
    result = CliRunner().invoke(
        cli, ["--home", str(home), "verify-batch", "--workers", "2", str(listing)], obj={}
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line)["verdict"] for line in result.stdout.splitlines()]


def test_credit_issue_verify_export_reconcile_then_roll_the_meter_back(
    device_home: Home, tmp_path: Path
) -> None:
    h = device_home.path  # credited $100.000 by its provider
    with running_device(device_home):
        first = issue(h, "0.73")
        snapshot = tmp_path / "tokens-after-piece-1"
        shutil.copytree(h / "tokens", snapshot)
        later = [issue(h, "0.50"), issue(h, "1.20")]
    assert verify_all(h, [first, *later], tmp_path) == ["VALID"] * 3

    credited = tmp_path / "credited.json"
    run(h, "provider", "export-credited", "--out", str(credited))
    assert json.loads(credited.read_text())["devices"] == {"983973031309": 100_000}
    report = run(h, "postoffice", "reconcile", "--credited", str(credited))
    assert report["clean"] is True and report["credited_checked"] is True
    (device,) = report["devices"]  # type: ignore[misc]
    assert device["last_sequence"] == 3 and device["last_ascending"] == 2430

    # An altered export is refused, not believed.
    altered = json.loads(credited.read_text())
    altered["devices"]["983973031309"] = 99_000
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(altered))
    err = run(h, "postoffice", "reconcile", "--credited", str(forged), exit_code=1)
    assert "does not verify" in str(err["message"])

    # Root copies the token files back while the device is stopped: the meter forgets
    # pieces 2 and 3 and, started again, reissues piece 2.
    shutil.rmtree(h / "tokens")
    shutil.copytree(snapshot, h / "tokens")
    with running_device(device_home):
        out = run(
            h,
            *("issue", "--postage", "0.60", "--from-zip", "94043", "--to-zip", "62704"),
            *("--to", "Someone Else|2 Side St"),
            role="customer",
        )
    reissued = str(out["indicium_hex"])
    assert reissued[52:60] == later[0][52:60]  # the same piece sequence, 2
    assert verify_all(h, [reissued], tmp_path) == ["DUPLICATE"]
    report = run(h, "postoffice", "reconcile", "--credited", str(credited), exit_code=3)
    found = {(f["kind"], tuple(f["sequences"])) for f in report["findings"]}  # type: ignore[union-attr]
    assert ("sequence-conflict", (2,)) in found
