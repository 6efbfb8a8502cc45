"""Batch issuing on SoftHSM2, through the real device process and the real command.

A batch is debited in one durable register write and released together. Checked
here: consecutive sequences and registers piece by piece, every indicium VALID at
the post office and the reconciliation clean; a bad CSV row, a bad piece and a
batch larger than the descending register refused before any debit; a SIGKILL of
the device mid-batch loses at most that batch and creates nothing; the one PDF
has a page (or a place on a page) per label.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from meter.cli import provision
from meter.cli.batch_csv import read_batch_csv
from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.main import cli
from meter.errors import AccessDenied, InsufficientFunds, InvalidInput, TokenUnavailable
from meter.host import DeviceClient
from meter.indicium import Indicium, RateCategory, decode
from meter.label import decode_image
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import MemoryReplayStore, Verdict, Verifier
from meter.postoffice.reconcile import RegisterLedger, reconcile
from meter.protocol.issue import IssueRequest
from meter.psd import Meter
from meter.psd.registers import Registers
from tests.conftest import (
    ROLE_USERS,
    SOFTHSM_MODULE,
    TEST_METER_PINS,
    TEST_PASSWORDS,
    TEST_PINS,
    TEST_POLICY,
    open_meter_token,
    require_service,
    set_up,
)
from tests.test_crash import device as crashing_device
from tests.test_crash import killed

pytestmark = [pytest.mark.softhsm]

CREDIT = 100_000  # set_up's $100
PIECE = IssueRequest(
    postage=730,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="62704",
    address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
)
CSV_HEADER = "rate,postage,weight,from_zip,to_zip,name,address1,address2\n"


def pieces(count: int) -> list[IssueRequest]:
    """``count`` pieces of different postage and address."""
    return [
        replace(
            PIECE,
            postage=100 + 37 * i,
            destination_zip=f"{10001 + i:05d}",
            address=[f"Mailer Customer {i}", f"{i} Main St.", "Springfield, IL 62704"],
        )
        for i in range(count)
    ]


def csv_rows(count: int) -> str:
    """Rows under CSV_HEADER: postage $0.100, $0.101, ..."""
    return "".join(
        f"first-class-letter,0.{100 + i:03d},,94043,{10001 + i:05d},"
        f"Customer {i},{i} Main St.,Springfield IL 62704\n"
        for i in range(count)
    )


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """conftest's ``device_home`` made once for the checks that share one device."""
    require_service(os.path.exists(SOFTHSM_MODULE), f"SoftHSM2 ({SOFTHSM_MODULE})")
    with pytest.MonkeyPatch.context() as env:
        for var, value in {**TEST_PINS, **TEST_PASSWORDS}.items():
            env.setenv(var, value)
        home = Home.at(tmp_path_factory.mktemp("batch") / "home")
        home.device.mkdir(parents=True, mode=0o700)
        (home.device / "policy.toml").write_text(TEST_POLICY)
        provision.init_home(
            home, provision.InitOptions(device_serial=983973031309), meter_pins=TEST_METER_PINS
        )
        set_up(home)
        yield home


@pytest.fixture(scope="module")
def served(batch_home: Home) -> Iterator[Home]:
    with running_device(batch_home):
        yield batch_home


def customer(home: Home) -> DeviceClient:
    client = DeviceClient(home.socket)
    client.logon(*ROLE_USERS["customer"])
    return client


def status(home: Home) -> dict[str, Any]:
    with customer(home) as client:
        answer: dict[str, Any] = client.get("/v1/psd-status")
        return answer


def audit(home: Home) -> list[dict[str, Any]]:
    path = home.device / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"index"' in line]


def verifier_for(home: Home) -> Verifier:
    certs = home.certs
    trust = TrustStore.from_files(
        certs / "postal-root.pem", [certs / "meter.pem", certs / "provider.pem"]
    )
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
    return Verifier(trust, Revocations.empty(), MemoryReplayStore(), tomorrow)


# -- the device ------------------------------------------------------------------------


def test_a_batch_is_one_debit_with_consecutive_pieces_valid_and_reconciled(
    served: Home, tmp_path: Path
) -> None:
    before = status(served)
    batch = pieces(40)
    with customer(served) as client:
        single = client.issue(PIECE)  # a single piece before, to chain across
        result = client.issue_batch(batch)
        after_single = client.issue(PIECE)
    indicia = list(result.indicia)
    first = before["piece_count"] + 2
    assert [i.sequence for i in indicia] == list(range(first, first + 40))
    assert single.sequence == first - 1 and after_single.sequence == first + 40
    control_total = before["ascending"] + before["descending"]
    ascending = single.ascending
    for request, ind in zip(batch, indicia, strict=True):  # as if debited one by one
        ascending += request.postage
        assert (ind.postage, ind.ascending, ind.descending) == (
            request.postage,
            ascending,
            control_total - ascending,
        )
        assert ind.destination.startswith(request.destination_zip)
    total = sum(r.postage for r in batch)
    assert result.total_postage == total
    now = status(served)
    assert now["piece_count"] == first + 40
    assert now["ascending"] == before["ascending"] + total + 2 * PIECE.postage
    # One register generation for the whole batch: the audit says so, one record.
    (record,) = [r for r in audit(served) if r["service"] == "create-indicium-batch"]
    values = record["values"]
    assert record["outcome"] == "ok"
    assert (values["first_sequence"], values["last_sequence"]) == (first, first + 39)
    assert values["postages"] == [r.postage for r in batch] and values["postage"] == total
    # The post office: every piece VALID, and the register chain holds piece by piece.
    everything = [single.to_bytes(), *(i.to_bytes() for i in indicia), after_single.to_bytes()]
    results = verifier_for(served).verify_batch(everything)
    assert [r.verdict for r in results] == [Verdict.VALID] * len(everything)
    with RegisterLedger.open(tmp_path / "registers.sqlite") as ledger:
        ledger.record(results)
        report = reconcile(ledger)
    assert report.clean, report.findings


def test_a_bad_piece_is_refused_before_any_debit_naming_it(served: Home) -> None:
    before = status(served)
    batch = pieces(6)
    batch[3] = replace(batch[3], origin_zip="9404")
    with customer(served) as client:
        with pytest.raises(InvalidInput, match=r"piece 4 of the batch: origin ZIP '9404'"):
            client.issue_batch(batch)
        # A wrong JSON type is named by its piece too, before the firmware sees anything.
        body = {"pieces": [p.to_json() for p in pieces(3)]}
        body["pieces"][1]["postage"] = "550"
        with pytest.raises(InvalidInput, match=r"piece 2 of the batch: postage: "):
            client.post("/v1/indicia/batch", body)
        with pytest.raises(InvalidInput, match="correction is Create Correction Indicium"):
            client.issue_batch([PIECE, replace(PIECE, correction_of=1)])
        with pytest.raises(InvalidInput, match="at most 1000"):
            client.issue_batch([PIECE] * 1001)
        with pytest.raises(InvalidInput, match="1 to 1000 pieces, not 0"):
            client.issue_batch([])
    assert status(served) == before | {"time": status(served)["time"]}


def test_a_batch_larger_than_the_descending_register_is_refused(served: Home) -> None:
    before = status(served)
    too_much = before["descending"] // 2 + 1
    batch = [replace(PIECE, postage=too_much)] * 2
    refused = pytest.raises(InsufficientFunds, match="the batch of 2 pieces totals")
    with customer(served) as client, refused as caught:
        client.issue_batch(batch)
    assert f"descending register ({before['descending']} mills)" in str(caught.value)
    assert "nothing was debited" in str(caught.value)
    after = status(served)
    assert (after["piece_count"], after["ascending"]) == (
        before["piece_count"],
        before["ascending"],
    )
    failed = [r for r in audit(served) if r["service"] == "create-indicium-batch"][-1]
    assert failed["outcome"] == "failed" and failed["values"]["pieces"] == 2


def test_a_non_customer_is_denied_the_batch(served: Home) -> None:
    before = status(served)
    with DeviceClient(served.socket) as client:
        client.logon(*ROLE_USERS["provider"])
        with pytest.raises(AccessDenied, match="Create Indicium Batch is not allowed"):
            client.issue_batch(pieces(2))
    assert status(served)["piece_count"] == before["piece_count"]


# -- the command -----------------------------------------------------------------------


def run(home: Home, *args: str, exit_code: int = 0) -> dict[str, Any]:
    user_id, password = ROLE_USERS["customer"]
    result = CliRunner().invoke(
        cli,
        ["--home", str(home.path), "--json", "--user", user_id, *args],
        obj={},
        env={"METER_PASSWORD": password},
    )
    assert result.exit_code == exit_code, result.output
    answer: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return answer


def pdf_pages(path: Path) -> int:
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True)
    (pages,) = [line.split()[-1] for line in info.stdout.splitlines() if line.startswith("Pages:")]
    return int(pages)


def page_image(path: Path, page: int) -> Image.Image:
    """One page rasterized at 300 dpi, as a printer would."""
    png = subprocess.run(
        ["pdftoppm", "-r", "300", "-gray", "-png", "-f", str(page), "-l", str(page), str(path)],
        capture_output=True,
        check=True,
    ).stdout
    return Image.open(io.BytesIO(png))


def test_issue_batch_makes_one_pdf_of_every_label(served: Home, tmp_path: Path) -> None:
    csv = tmp_path / "mailing.csv"
    csv.write_text(CSV_HEADER + csv_rows(30))
    before = status(served)
    out = tmp_path / "labels.pdf"
    summary = run(served, "issue-batch", str(csv), "--out", str(out), "--layout", "letter-2x2")
    first = before["piece_count"] + 1
    assert (summary["pieces"], summary["first_sequence"], summary["last_sequence"]) == (
        30,
        first,
        first + 29,
    )
    assert summary["pages"] == 8 == pdf_pages(out)  # four a page
    assert summary["total_postage"] == sum(100 + i for i in range(30))
    text = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True).stdout
    assert text.count("PIECE SEQUENCE") == 30
    assert all(f"CUSTOMER {i}" in text.upper() for i in range(30))
    # The scaled barcodes read back: the top left label of page 2 is row 5's piece.
    page = page_image(out, 2)
    quarter = page.crop((0, 0, page.width // 2, page.height // 2))
    piece = decode(decode_image(quarter))
    assert (piece.sequence, piece.postage) == (first + 4, 104)

    # 4 x 6: a page a label; split in device batches of at most 1,000 pieces.
    out = tmp_path / "four-by-six.pdf"
    summary = run(served, "issue-batch", str(csv), "--out", str(out))
    assert summary["pages"] == 30 == pdf_pages(out)
    last = decode(decode_image(page_image(out, 30)))
    assert (last.sequence, last.postage) == (summary["last_sequence"], 129)


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (
            "first-class-letter,,,94043,62704,Jane,1 Main St",
            "postage",
            "give a postage, or a weight for the device to price from its rate table",
        ),
        ("first-class-letter,0.73,,94043,6270,Jane,1 Main St", "to_zip", "'6270' must be 5 digits"),
        ("letter,0.73,,94043,62704,Jane,1 Main St", "rate", "unknown rate category 'letter'"),
        (
            "first-class-letter,0.7301,,94043,62704,Jane,1 Main St",
            "postage",
            "more precision than a mill",
        ),
        (
            "first-class-letter,0.73,heavy,94043,62704,Jane,1 Main St",
            "weight",
            "not a weight (ounces, e.g. 3.5, or pounds, e.g. 2lb)",
        ),
        (
            "first-class-letter,0.73,,94043,62704,Jane \u2603,1 Main St",
            "address",
            "cannot be printed",
        ),
    ],
)
def test_a_bad_row_is_refused_before_any_debit(
    served: Home, tmp_path: Path, row: str, field: str, message: str
) -> None:
    csv = tmp_path / "mailing.csv"
    csv.write_text(CSV_HEADER + csv_rows(3) + row + "\n")
    before = status(served)
    out = tmp_path / "labels.pdf"
    answer = run(served, "issue-batch", str(csv), "--out", str(out), exit_code=1)
    assert answer["error"] == "InvalidInput"
    assert f"row 4 (line 5), field '{field}'" in answer["message"]
    assert message in answer["message"] and "nothing was issued" in answer["message"]
    assert not out.exists()
    after = status(served)
    assert (after["piece_count"], after["ascending"]) == (
        before["piece_count"],
        before["ascending"],
    )


def test_a_row_priced_by_weight_needs_a_rate_table_on_the_device(
    served: Home, tmp_path: Path
) -> None:
    """The CSV passes a weight-only row on; the device, with no signed rate table installed,
    refuses the whole batch before any debit (docs/rates.md prices it once one is)."""
    csv = tmp_path / "mailing.csv"
    csv.write_text(CSV_HEADER + csv_rows(2) + "first-class-letter,,3.5,94043,62704,Jane,1 Main\n")
    rows = read_batch_csv(csv)
    assert (rows[2].request.postage, rows[2].request.weight) == (None, "3.5oz")
    before = status(served)
    answer = run(served, "issue-batch", str(csv), "--out", str(tmp_path / "x.pdf"), exit_code=1)
    assert answer["error"] == "InvalidInput"
    assert "no rate table installed" in answer["message"]
    assert status(served)["piece_count"] == before["piece_count"]


def test_rows_beyond_the_descending_register_are_refused_whole(
    served: Home, tmp_path: Path
) -> None:
    before = status(served)
    csv = tmp_path / "mailing.csv"
    each = before["descending"] // 2 + 1
    dollars = f"{each // 1000}.{each % 1000:03d}"
    rows = "".join(f"priority,{dollars},94043,62704,Jane {i}\n" for i in range(2))
    csv.write_text("rate,postage,from_zip,to_zip,name\n" + rows)
    answer = run(served, "issue-batch", str(csv), "--out", str(tmp_path / "x.pdf"), exit_code=1)
    assert answer["error"] == "InsufficientFunds"
    assert "more than the descending register" in answer["message"]
    assert status(served)["piece_count"] == before["piece_count"]


def test_the_csv_format_is_checked_as_a_whole(tmp_path: Path) -> None:
    for header, message in [
        ("rate,postage,from_zip,to_zip,nmae", "unknown column 'nmae'"),
        ("rate,postage,from_zip,name", "lacks the column(s) to_zip"),
        ("rate,from_zip,to_zip,name", "neither a postage nor a weight column"),
        ("rate,postage,from_zip,to_zip,name,name", "column 'name' appears twice"),
    ]:
        path = tmp_path / "b.csv"
        path.write_text(header + "\n" + "first-class-letter,0.73,94043,62704,Jane\n")
        with pytest.raises(InvalidInput, match=re.escape(message)):
            read_batch_csv(path)
    path.write_text(
        "rate,postage,from_zip,to_zip,name\n\nfirst-class-letter,0.73,94043,62704,Jane\n"
    )
    (only,) = read_batch_csv(path)
    assert (only.row, only.line, only.request.address_lines()) == (1, 3, ["Jane"])
    # The example in docs/cli.md reads as documented.
    example = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    block = example.split("```csv\n", 1)[1].split("```", 1)[0]
    path.write_text(block)
    rows = read_batch_csv(path)
    assert len(rows) == 3 and rows[1].request.destination_plus4 == "1234"
    assert rows[2].weight_oz is not None


# -- a crash mid-batch -------------------------------------------------------------------

BATCH = 50
# (point, n): counted from the single piece that arms the device (tests/_crash_device.py),
# which makes one of each: its create, sync and audit are the 1st, the batch's the 2nd.
CRASH_POINTS = [
    ("before-sign", 1 + 7),  # signing the 7th piece: before the write
    ("after-sign", 1 + BATCH),  # every piece signed, nothing written yet
    ("after-create", 2),  # the batch's register record made, not synced
    ("after-audit", 2),  # its audit record written, not synced
    ("after-sync", 2),  # durable, killed before the release
    ("random", 0),
    ("random", 0),
]


def registers(home: Home) -> Registers:
    with open_meter_token(home) as token:
        r = Meter.open(token).registers
    r.check()
    return r


def test_a_sigkill_mid_batch_loses_at_most_the_batch_and_creates_nothing(
    device_home: Home,
) -> None:
    home = device_home
    # Cheap pieces, so that the credit lasts through the random kills' loops.
    batch = [replace(p, postage=10 + i) for i, p in enumerate(pieces(BATCH))]
    received: list[Indicium] = []
    start = registers(home)
    lost = 0  # batches debited whole and never released
    for point, nth in CRASH_POINTS:
        before = registers(home)
        in_flight = False
        with crashing_device(home, "none" if point == "random" else point, nth) as proc:
            with customer(home) as client:
                received.append(client.issue(PIECE))  # arms the kill points
                if point == "random":
                    threading.Timer(random.uniform(0.0, 0.3), proc.kill).start()
                for _ in range(200):
                    try:
                        in_flight = True
                        received += client.issue_batch(batch).indicia
                        in_flight = False
                    except TokenUnavailable:
                        break
                else:
                    pytest.fail(f"the device was not killed at {point}")
            killed(proc)
        after = registers(home)
        # Conservation: nothing created, nothing destroyed, whatever the moment.
        assert after.control_total == before.control_total == start.control_total
        assert after.ascending + after.descending == start.control_total
        # The batch in flight is debited whole or not at all: never in part.
        issued = [i for i in received if i.sequence > before.sequence]
        done = after.sequence - max((i.sequence for i in issued), default=before.sequence)
        assert in_flight and done in (0, BATCH), (point, done)
        expected_after = (issued[-1].ascending if issued else before.ascending) + (
            sum(p.postage for p in batch) if done else 0
        )
        assert after.ascending == expected_after, point
        if point in ("before-sign", "after-sign"):
            assert done == 0, f"{point}: a batch killed before its write was debited"
        if point in ("after-audit", "after-sync"):
            assert done == BATCH, f"{point}: the durable batch is gone"
            (record,) = [
                r
                for r in audit(home)
                if r["service"] == "create-indicium-batch"
                and r["values"].get("first_sequence") == after.sequence - BATCH + 1
            ]
            assert record["outcome"] == "ok"  # the lost batch shows in the audit log
        lost += done // BATCH
    # Every piece the client received has its debit, and no sequence was released twice.
    sequences = [i.sequence for i in received]
    assert len(sequences) == len(set(sequences))
    final = registers(home)
    assert max(sequences) <= final.sequence
    # What the registers debited is exactly what was released plus the batches lost whole.
    released = sum(i.postage for i in received)
    assert final.ascending - start.ascending == released + lost * sum(p.postage for p in batch)
    with crashing_device(home), customer(home) as client:
        after_all = client.issue_batch(batch[:2])
    assert after_all.first_sequence == final.sequence + 1
