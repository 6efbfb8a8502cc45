"""``meter verify-batch`` on several processes gives exactly the single-process verdicts, in order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import _redis
import _vectors
import pytest
from _vectors import signed
from click.testing import CliRunner, Result
from conftest import require_service
from PIL import Image

from meter.cli.home import Home
from meter.cli.main import cli
from meter.indicium import Algorithm
from meter.label import encode_pdf417
from meter.postoffice import EmbeddedReplayStore, MemoryReplayStore, Verdict, Verifier
from meter.postoffice.parallel import BatchEngine, LabelImage
from meter.postoffice.reconcile import RegisterLedger
from meter.postoffice.replay_redis import CHUNK_BITS

VECTORS = _vectors.load()
TODAY = _vectors.verification_date(VECTORS)
TRUST = _vectors.trust_store(VECTORS)
REVOKED = _vectors.revocations(VECTORS)


@pytest.fixture
def certs(tmp_path: Path) -> list[str]:
    pem = VECTORS["certificates"]
    (tmp_path / "root.pem").write_text(pem["postal_root"])
    (tmp_path / "certs.pem").write_text("".join(pem["providers"] + pem["meters"]))
    (tmp_path / "revoked.json").write_text(json.dumps(VECTORS["revoked"]))
    return [
        "--root",
        str(tmp_path / "root.pem"),
        "--certs",
        str(tmp_path / "certs.pem"),
        "--revoked",
        str(tmp_path / "revoked.json"),
        "--date",
        VECTORS["verification_date"],
    ]


def mixed_input(tmp_path: Path) -> tuple[list[str], list[bytes | None]]:
    """Lines of every kind, and the bytes each stands for (None: not an indicium)."""
    fresh = [
        signed(VECTORS, algorithm, sequence=5000 + i, ascending=100_000 + i)
        for i in range(1200)
        for algorithm in (Algorithm.ECDSA_P256, Algorithm.ED25519)
    ]
    vectors = [bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"] if v["indicium_hex"]]
    lines: list[str] = []
    meaning: list[bytes | None] = []
    for i, data in enumerate(fresh + vectors + fresh[:300]):  # the repeats are duplicates
        if i % 400 == 7:  # now and then a label image instead of hex
            png = tmp_path / f"label-{i}.png"
            encode_pdf417(data).save(png)
            lines.append(str(png))
        else:
            lines.append(data.hex())
        meaning.append(data)
        if i % 500 == 3:
            lines += ["zz not hex at all", "abc", ""]
            meaning += [None, None]
    return lines, meaning


def verify_batch(
    tmp_path: Path, certs: list[str], name: str, lines: list[str], *more: str
) -> Result:
    listing = tmp_path / f"{name}.txt"
    listing.write_text("".join(line + "\n" for line in lines))
    return CliRunner().invoke(
        cli,
        ["--home", str(tmp_path / name), "verify-batch", *certs, *more, str(listing)],
        obj={},
    )


def test_two_workers_give_the_single_process_verdicts_in_order(
    tmp_path: Path, certs: list[str]
) -> None:
    lines, meaning = mixed_input(tmp_path)
    outputs = {}
    for workers in ("1", "2"):
        result = verify_batch(tmp_path, certs, f"w{workers}", lines, "--workers", workers)
        assert result.exit_code == 0, result.output
        outputs[workers] = [json.loads(line) for line in result.stdout.splitlines()]
    assert outputs["1"] == outputs["2"]
    got = outputs["2"]
    assert [o["input"] for o in got] == [line for line in lines if line]
    # The reference: one Verifier, one piece at a time.
    reference = Verifier(TRUST, REVOKED, MemoryReplayStore(), TODAY)
    expected = [
        reference.verify(data).verdict.value if data is not None else "MALFORMED"
        for data in meaning
    ]
    assert [o["verdict"] for o in got] == expected
    assert expected.count("DUPLICATE") >= 300 and expected.count("VALID") >= 2400
    # The genuine pieces are in the register ledger, each signed part once.
    genuine = {
        data[:84]
        for data, verdict in zip(meaning, expected, strict=True)
        if data is not None and verdict in ("VALID", "SPECIMEN", "DUPLICATE")
    }
    with RegisterLedger.open(tmp_path / "w2" / "postoffice" / "registers.sqlite") as ledger:
        assert len(ledger) == len(genuine) > 2400


def test_bad_input_is_reported_and_changes_no_store(tmp_path: Path, certs: list[str]) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (300, 200), 255).save(blank)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    lines = [str(blank), "00" * 148, "not a line of hex", str(not_image), "0"]
    result = verify_batch(tmp_path, certs, "bad", lines, "--workers", "2")
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["verdict"] for o in got] == ["ERROR", "MALFORMED", "MALFORMED", "ERROR", "MALFORMED"]
    assert "no PDF417 or Data Matrix" in got[0]["reason"] or "barcode" in got[0]["reason"]
    assert str(blank) in got[0]["reason"]
    assert "neither hexadecimal nor the path" in got[2]["reason"]
    store = Home.at(tmp_path / "bad").replay_store
    with EmbeddedReplayStore.open(store) as replay:
        assert len(replay) == 0
    with RegisterLedger.open(tmp_path / "bad" / "postoffice" / "registers.sqlite") as ledger:
        assert len(ledger) == 0


def test_verify_of_an_image_without_a_barcode_is_an_error(tmp_path: Path, certs: list[str]) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (300, 200), 255).save(blank)
    result = CliRunner().invoke(
        cli, ["--home", str(tmp_path / "h"), "verify", *certs, "--image", str(blank)], obj={}
    )
    assert result.exit_code == 1 and str(blank) in result.output
    store = Home.at(tmp_path / "h").replay_store
    if store.exists():
        with EmbeddedReplayStore.open(store) as replay:
            assert len(replay) == 0


def test_progress_bar_on_request_only(tmp_path: Path, certs: list[str]) -> None:
    lines = [signed(VECTORS, Algorithm.ED25519, sequence=10 + i).hex() for i in range(5)]
    shown = verify_batch(tmp_path, certs, "p1", lines, "--progress", "--workers", "1")
    assert shown.exit_code == 0 and "verifying" in shown.stderr
    assert len(shown.stdout.splitlines()) == 5
    quiet = verify_batch(tmp_path, certs, "p2", lines, "--workers", "1")
    assert quiet.exit_code == 0 and "verifying" not in quiet.stderr


def test_engine_small_windows_and_every_kind_of_item(tmp_path: Path) -> None:
    data = [signed(VECTORS, Algorithm.ECDSA_P256, sequence=100 + i) for i in range(50)]
    png = tmp_path / "label.png"
    encode_pdf417(data[0]).save(png)
    buffer = png.read_bytes()
    items = [*data, data[1].hex(), png, LabelImage(buffer), LabelImage(b"junk"), "", "  "]
    engine = BatchEngine(TRUST, REVOKED, TODAY, workers=2, window=7)
    with engine, RegisterLedger.open(tmp_path / "r.sqlite") as ledger:
        done = list(engine.verify(items, MemoryReplayStore(), ledger, progress=lambda n: None))
        assert len(ledger) == 50
    verdicts = [d.result.verdict for d in done]
    assert verdicts == [Verdict.VALID] * 50 + [Verdict.DUPLICATE] * 3 + [Verdict.ERROR]
    assert [d.item for d in done] == items[:-2]  # blank lines are skipped


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_a_redis_store_gives_the_embedded_stores_verdicts(
    tmp_path: Path, certs: list[str], kind: str
) -> None:
    url = _redis.URLS[kind]
    require_service(_redis.reachable(url), f"Redis at {url} (scripts/redis-services start)")
    # The command uses the store's default key prefix: sequences of this run only.
    base = random.randrange(10**6, 2**31)
    pieces = [signed(VECTORS, Algorithm.ECDSA_P256, sequence=base + i) for i in range(300)]
    lines = [p.hex() for p in pieces + pieces[:50]]
    try:
        embedded = verify_batch(tmp_path, certs, "embedded", lines, "--workers", "2")
        shared = verify_batch(tmp_path, certs, kind, lines, "--workers", "2", "--store", url)
    finally:
        for chunk in {(base + i) >> CHUNK_BITS for i in range(300)}:
            _redis.delete_keys(url, f"pim:{{{_vectors.ECDSA_SERIAL}}}:{chunk}")
    assert embedded.exit_code == 0 and shared.exit_code == 0, shared.output
    verdicts = [json.loads(line)["verdict"] for line in shared.stdout.splitlines()]
    assert verdicts == ["VALID"] * 300 + ["DUPLICATE"] * 50
    assert shared.stdout == embedded.stdout
