"""The audit log: chain, seals, export/archive/delete, offline verification, crash recovery."""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.cli.home import Home
from meter.errors import ConfigurationError, InvalidInput
from meter.psd.audit import AuditLog, AuditRecord, audit_key_id
from meter.psd.audit_verify import verify_export
from meter.token import KeyAlgorithm, Token
from meter.token.softhsm import ensure_token

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class AuditKey:
    """A software ECDSA P-256 audit key that signs like Token.sign: raw r||s over SHA-256."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.key_id = audit_key_id(self.private.public_key())
        self.pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, message: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.fixture
def key() -> AuditKey:
    return AuditKey()


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog.open(tmp_path / "audit")


def add(log: AuditLog, count: int, service: str = "create-indicium") -> list[AuditRecord]:
    start = log.head[0]
    return [
        log.append(
            at=T0 + timedelta(seconds=start + i),
            user_id="carol",
            role="customer",
            service=service,
            outcome="ok",
            values={"postage": 730, "sequence": start + i + 1},
        )
        for i in range(count)
    ]


def export(log: AuditLog, key: AuditKey, path: Path) -> Path:
    log.export(path, key.sign, key.key_id, T0 + timedelta(hours=1))
    return path


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def save(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


def rechain(records: list[dict[str, Any]], prev: bytes) -> None:
    """What a careful forger does: recompute every digest after a change."""
    for item in records:
        item["prev"] = prev.hex()
        if item["kind"] == "seal":
            item["values"]["head"] = prev.hex()
        record = AuditRecord.from_json(item)
        item["digest"] = record.computed_digest().hex()
        prev = bytes.fromhex(item["digest"])


# -- the live log -----------------------------------------------------------------


def test_records_chain_across_appends_and_reopen(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "audit")
    assert log.head == (0, bytes(32))
    first = add(log, 3)
    assert [r.index for r in first] == [1, 2, 3]
    assert first[0].prev == bytes(32)
    assert all(b.prev == a.digest for a, b in itertools.pairwise(first))
    reopened = AuditLog.open(tmp_path / "audit")
    assert reopened.records() == first
    assert reopened.records(since=2) == first[1:]
    (fourth,) = add(reopened, 1)
    assert (fourth.index, fourth.prev) == (4, first[-1].digest)
    assert fourth.values == {"postage": 730, "sequence": 4}
    # The first object sees what the second appended (another process, in effect).
    assert log.head == (4, fourth.digest)


def test_failed_logon_is_recorded_without_user_and_without_any_key(log: AuditLog) -> None:
    record = log.append(
        at=T0,
        user_id=None,
        role="no-role",
        service="logon",
        outcome="failed",
        values={"reason": "wrong password", "claimed_user": "mallory"},
    )
    assert record.user_id is None and record.kind == "event"
    assert log.records() == [record]


def test_values_that_are_not_plain_json_are_refused_and_nothing_is_written(
    log: AuditLog,
) -> None:
    not_json: list[Any] = [{"when": T0}, {"x": float("nan")}, {1: "int key"}]
    for values in not_json:
        with pytest.raises(InvalidInput, match="audit values"):
            log.append(
                at=T0, user_id=None, role="no-role", service="x", outcome="ok", values=values
            )
    with pytest.raises(InvalidInput, match="time zone"):
        log.append(
            at=datetime(2024, 1, 1), user_id=None, role="r", service="s", outcome="ok", values={}
        )
    assert log.head[0] == 0


def test_two_processes_appending_at_once_make_one_chain(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    AuditLog.open(folder)
    script = textwrap.dedent(
        f"""
        import sys
        from datetime import UTC, datetime
        from pathlib import Path
        from meter.psd.audit import AuditLog
        log = AuditLog.open(Path({str(folder)!r}))
        for i in range(40):
            log.append(at=datetime.now(UTC), user_id=sys.argv[1], role="customer",
                       service="create-indicium", outcome="ok", values={{"i": i}})
        """
    )
    children = [subprocess.Popen([sys.executable, "-c", script, name]) for name in ("a", "b")]
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    records = AuditLog.open(folder).records()  # open re-checks the whole chain
    assert [r.index for r in records] == list(range(1, 81))
    assert sorted(r.user_id or "" for r in records) == ["a"] * 40 + ["b"] * 40


def test_torn_last_line_from_a_crash_is_dropped_on_open(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    records = add(AuditLog.open(folder), 3)
    live = folder / "audit.jsonl"
    data = live.read_bytes()
    live.write_bytes(data[: len(data) - 25])  # the third append was cut short by a crash
    log = AuditLog.open(folder)
    assert log.torn_lines_dropped == 1
    assert log.records() == records[:2]
    assert live.read_bytes() == data[: data.rfind(b"\n", 0, len(data) - 1) + 1]
    assert add(log, 1)[0].index == 3  # the unacknowledged index is taken anew


def test_corrupt_middle_line_is_a_clear_error_and_the_file_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    add(AuditLog.open(folder), 4)
    live = folder / "audit.jsonl"
    lines = live.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"postage":730', '"postage":1')
    live.write_text("".join(lines))
    before = live.read_bytes()
    with pytest.raises(ConfigurationError, match=r"audit\.jsonl: line 2 \(record 2\) was altered"):
        AuditLog.open(folder)
    lines[1] = "{not json\n"
    live.write_text("".join(lines))
    with pytest.raises(ConfigurationError, match=r"line 2 \(record 2\) is unreadable"):
        AuditLog.open(folder)
    assert len(live.read_bytes().splitlines()) == len(before.splitlines())


# -- seals, export, offline verification --------------------------------------------


def test_export_seals_the_head_and_verifies_with_the_public_key(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 5)
    path = export(log, key, tmp_path / "export.json")
    records = log.records()
    assert len(records) == 6 and records[-1].kind == "seal"
    assert records[-1].values["head"] == records[-2].digest.hex()
    assert log.seal(key.sign, key.key_id, T0) is None  # the head is sealed already
    report = verify_export([path], key.pem)
    assert (report.ok, report.records, report.first_bad, report.signed_through) == (
        True,
        6,
        None,
        6,
    )


def test_an_empty_log_exports_one_seal_that_verifies(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    assert log.export(tmp_path / "e.json", key.sign, key.key_id, T0) == 1
    assert verify_export([tmp_path / "e.json"], key.pem).ok


def test_an_altered_value_names_the_record(log: AuditLog, key: AuditKey, tmp_path: Path) -> None:
    add(log, 6)
    document = load(export(log, key, tmp_path / "export.json"))
    document["records"][2]["values"]["postage"] = 1
    report = verify_export([save(tmp_path / "bad.json", document)], key.pem)
    assert (report.ok, report.first_bad) == (False, 3)
    assert report.reason == "record 3 was altered"
    # A forger who recomputes the digests moves the break only to the next link.
    rechain(document["records"][2:3], bytes.fromhex(document["records"][1]["digest"]))
    report = verify_export([save(tmp_path / "bad.json", document)], key.pem)
    assert (report.first_bad, report.reason) == (
        3,
        "record 3 was altered (record 4 no longer chains to it)",
    )
    # ... and recomputing all of them is caught by the seal.
    rechain(document["records"][2:], bytes.fromhex(document["records"][1]["digest"]))
    report = verify_export([save(tmp_path / "bad.json", document)], key.pem)
    assert (report.ok, report.first_bad) == (False, 7)
    assert report.reason == "seal at record 7 has a bad signature"


def test_a_removed_record_names_the_gap(log: AuditLog, key: AuditKey, tmp_path: Path) -> None:
    add(log, 6)
    document = load(export(log, key, tmp_path / "export.json"))
    del document["records"][3]
    report = verify_export([save(tmp_path / "bad.json", document)], key.pem)
    assert (report.ok, report.first_bad) == (False, 4)
    assert report.reason == "record 4 is missing (index jumps from 3 to 5)"


def test_swapped_records_are_reported_out_of_order(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 6)
    document = load(export(log, key, tmp_path / "export.json"))
    items = document["records"]
    items[3], items[4] = items[4], items[3]
    report = verify_export([save(tmp_path / "bad.json", document)], key.pem)
    assert (report.ok, report.first_bad) == (False, 4)
    assert report.reason == "records out of order: record 5 comes before record 4"


def test_a_seal_forged_with_another_key_has_a_bad_signature(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 4)
    document = load(export(log, key, tmp_path / "export.json"))
    forger = AuditKey()
    seal = document["records"][-1]
    seal["values"]["signature"] = forger.sign(b"anything").hex()
    rechain([seal], bytes.fromhex(seal["prev"]))
    report = verify_export([save(tmp_path / "bad.json", document)], key.pem)
    assert (report.ok, report.first_bad) == (False, 5)
    assert report.reason == "seal at record 5 has a bad signature"


def test_verification_with_the_wrong_public_key_fails(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 2)
    path = export(log, key, tmp_path / "export.json")
    other = AuditKey()
    report = verify_export([path], other.pem)
    assert (report.ok, report.first_bad, report.signed_through) == (False, 3, 0)
    assert report.reason.startswith("seal at record 3 has a bad signature (it names audit key")
    with pytest.raises(InvalidInput, match="not a PEM public key"):
        verify_export([path], b"not a key")


def test_records_after_the_last_seal_are_reported_unsigned(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 2)
    log.seal(key.sign, key.key_id, T0)
    add(log, 2)
    document = load(export(log, key, tmp_path / "export.json"))
    document["records"].pop()  # the export's final seal
    report = verify_export([save(tmp_path / "cut.json", document)], key.pem)
    assert (report.ok, report.first_bad, report.signed_through) == (False, 4, 3)
    assert report.reason == "records 4 to 5 are not covered by a seal (unsigned)"


# -- archive and delete -------------------------------------------------------------


def test_archive_delete_and_export_verify_as_one_chain(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 5)
    assert log.archive(tmp_path / "a1.json", key.sign, key.key_id, T0) == 6
    assert log.archived_through == 6
    assert log.delete_archived() == 6
    assert log.records() == [] and log.head[0] == 6
    add(log, 3)
    assert log.archive(tmp_path / "a2.json", key.sign, key.key_id, T0) == 4
    add(log, 2)  # archived but not deleted: the export overlaps archive 2
    assert log.export(tmp_path / "e.json", key.sign, key.key_id, T0) == 7
    reopened = AuditLog.open(log.path.parent)  # the anchor line reads back
    assert [r.index for r in reopened.records()] == list(range(7, 14))
    files = [tmp_path / "a1.json", tmp_path / "a2.json", tmp_path / "e.json"]
    report = verify_export(files, key.pem)
    assert (report.ok, report.records, report.signed_through) == (True, 13, 13), report.reason
    assert "not in these files" not in report.reason
    # The export alone is checked from its anchor on, and says what it could not check.
    alone = verify_export([tmp_path / "e.json"], key.pem)
    assert (alone.ok, alone.records, alone.signed_through) == (True, 7, 13)
    assert "records 1 to 6 are not in these files" in alone.reason
    # The export continues archive 1 directly (it holds records 7 to 10 as well) ...
    assert verify_export([files[0], files[2]], key.pem).ok
    # ... until they are deleted: then a missing archive is a gap.
    assert log.delete_archived() == 4
    export(log, key, tmp_path / "e2.json")
    gap = verify_export([files[0], tmp_path / "e2.json"], key.pem)
    assert (gap.ok, gap.first_bad) == (False, 7)
    assert gap.reason.startswith("file 2 does not continue file 1")
    assert verify_export([*files[:2], tmp_path / "e2.json"], key.pem).ok
    assert not verify_export([files[1], files[0]], key.pem).ok


def test_an_altered_archive_is_caught_across_files(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 3)
    log.archive(tmp_path / "a1.json", key.sign, key.key_id, T0)
    log.delete_archived()
    add(log, 3)
    export(log, key, tmp_path / "e.json")
    document = load(tmp_path / "a1.json")
    document["records"][1]["user_id"] = "mallory"
    save(tmp_path / "a1.json", document)
    report = verify_export([tmp_path / "a1.json", tmp_path / "e.json"], key.pem)
    assert (report.ok, report.first_bad, report.reason) == (False, 2, "record 2 was altered")


def test_delete_without_archive_is_refused_and_changes_nothing(log: AuditLog) -> None:
    add(log, 3)
    before = log.path.read_bytes()
    with pytest.raises(InvalidInput, match="archive before deleting"):
        log.delete_archived()
    assert log.path.read_bytes() == before


def test_archive_never_overwrites_and_refuses_when_nothing_is_new(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 2)
    (tmp_path / "taken.json").write_text("an earlier archive")
    with pytest.raises(InvalidInput, match="exists already"):
        log.archive(tmp_path / "taken.json", key.sign, key.key_id, T0)
    assert log.head[0] == 2  # refused before sealing
    log.archive(tmp_path / "a1.json", key.sign, key.key_id, T0)
    with pytest.raises(InvalidInput, match="nothing to archive"):
        log.archive(tmp_path / "a2.json", key.sign, key.key_id, T0)
    assert not (tmp_path / "a2.json").exists()


def test_a_missing_live_log_after_archiving_is_not_restarted_at_record_one(
    log: AuditLog, key: AuditKey, tmp_path: Path
) -> None:
    add(log, 2)
    log.archive(tmp_path / "a1.json", key.sign, key.key_id, T0)
    log.path.unlink()
    with pytest.raises(ConfigurationError, match="is missing but records through 3"):
        AuditLog.open(log.path.parent)


# -- a token's signature, and the CLI -------------------------------------------------


def test_a_seal_signed_in_softhsm_verifies_offline(home: Home, tmp_path: Path) -> None:
    """The firmware's signer: Token.sign hashes outside and returns raw r||s."""
    log = AuditLog.open(tmp_path / "audit")
    add(log, 2)
    pin = secrets.token_urlsafe(12)  # a throwaway test token's PIN, never written down
    ensure_token(home.profile, home.path, "audit-test", pin, pin)
    with Token.open(home.module(), "audit-test", pin, lock_dir=home.path / "locks") as token:
        spki = token.generate_signing_keypair("audit-signing", KeyAlgorithm.ECDSA_P256)
        public = serialization.load_der_public_key(spki)

        def signer(message: bytes) -> bytes:
            return token.sign("audit-signing", KeyAlgorithm.ECDSA_P256, message)

        log.export(tmp_path / "e.json", signer, audit_key_id(public), T0)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    report = verify_export([tmp_path / "e.json"], pem)
    assert (report.ok, report.signed_through) == (True, 3), report.reason
    assert not verify_export([tmp_path / "e.json"], AuditKey().pem).ok


def test_cli_audit_verify_ok_broken_and_json(log: AuditLog, key: AuditKey, tmp_path: Path) -> None:
    from meter.cli.main import cli  # here, so the library tests run even if another command breaks

    add(log, 3)
    path = export(log, key, tmp_path / "export.json")
    key_file = tmp_path / "audit-key.pem"
    key_file.write_bytes(key.pem)
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "verify", str(path), "--key", str(key_file)], obj={})
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("OK: 4 records, signed through record 4")
    document = load(path)
    document["records"][1]["outcome"] = "denied"
    bad = save(tmp_path / "bad.json", document)
    broken = runner.invoke(cli, ["audit", "verify", str(bad), "--key", str(key_file)], obj={})
    assert broken.exit_code == 2
    assert broken.output.strip() == "BROKEN at record 2: record 2 was altered"
    as_json = runner.invoke(
        cli, ["--json", "audit", "verify", str(bad), "--key", str(key_file)], obj={}
    )
    assert as_json.exit_code == 2
    assert json.loads(as_json.output)["first_bad"] == 2
    missing = runner.invoke(
        cli, ["audit", "verify", str(tmp_path / "nope.json"), "--key", str(key_file)], obj={}
    )
    assert missing.exit_code == 1 and "no such audit export file" in missing.output
