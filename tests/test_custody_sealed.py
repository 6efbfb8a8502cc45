"""Shares without cards: passphrase-sealed files (scrypt + AES-256-GCM) and paper sheets."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meter.custody.paper import from_paper, to_paper
from meter.custody.sealed import SCRYPT_LOG2_N, open_sealed, seal, unseal
from meter.custody.shares import CustodyShare, Group, Policy, combine, split
from meter.errors import CustodyError

PASSPHRASE = "correct horse battery staple"
FAST = 14  # scrypt's accepted floor keeps the tests quick; the default is SCRYPT_LOG2_N


@pytest.fixture(scope="module")
def shares() -> list[CustodyShare]:
    policy = Policy([Group("officers", 2, 3), Group("auditors", 1, 2)], group_threshold=2)
    return split(os.urandom(32), policy, "export-2024-05")


def test_seal_and_unseal_at_the_default_cost(shares: list[CustodyShare], tmp_path: Path) -> None:
    path = tmp_path / "officer-1.share"
    seal(shares[0], path, PASSPHRASE)
    assert (path.stat().st_mode & 0o777) == 0o600
    document = json.loads(path.read_text())
    assert document["kdf"]["log2_n"] == SCRYPT_LOG2_N == 17
    assert unseal(path, PASSPHRASE) == shares[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_file_shows_metadata_but_never_the_words(
    shares: list[CustodyShare], tmp_path: Path
) -> None:
    path = tmp_path / "s"
    seal(shares[3], path, PASSPHRASE, log2_n=FAST)
    text = path.read_text()
    assert not any(f" {word} " in f" {text} " for word in shares[3].words)
    assert shares[3].mnemonic not in text
    meta = open_sealed(path)
    assert meta["group"] == "auditors" and meta["fingerprint"] == shares[3].fingerprint


def test_sealed_shares_combine(shares: list[CustodyShare], tmp_path: Path) -> None:
    for i in (0, 2, 4):
        seal(shares[i], tmp_path / f"{i}", f"{PASSPHRASE} {i}", log2_n=FAST)
    back = [unseal(tmp_path / f"{i}", f"{PASSPHRASE} {i}") for i in (0, 2, 4)]
    assert combine(back).secret == combine(shares).secret


def test_wrong_passphrase_is_refused(shares: list[CustodyShare], tmp_path: Path) -> None:
    path = tmp_path / "s"
    seal(shares[0], path, PASSPHRASE, log2_n=FAST)
    with pytest.raises(CustodyError, match="wrong passphrase, or the file was altered"):
        unseal(path, PASSPHRASE + "!")


@pytest.mark.parametrize(
    "alter",
    [
        lambda d: d["share"].__setitem__("group", "auditors"),
        lambda d: d["share"].__setitem__("member", 3),
        lambda d: d["kdf"].__setitem__("salt", "AAAAAAAAAAAAAAAAAAAAAA=="),
        lambda d: d.__setitem__("nonce", "AAAAAAAAAAAAAAAA"),
        lambda d: d.__setitem__("ciphertext", "A" + d["ciphertext"][1:]),
    ],
    ids=["group", "member", "salt", "nonce", "ciphertext"],
)
def test_tampered_file_is_refused(
    shares: list[CustodyShare], tmp_path: Path, alter: Callable[[dict[str, Any]], None]
) -> None:
    path = tmp_path / "s"
    seal(shares[0], path, PASSPHRASE, log2_n=FAST)
    document = json.loads(path.read_text())
    alter(document)
    path.write_text(json.dumps(document))
    with pytest.raises(CustodyError, match="wrong passphrase, or the file was altered"):
        unseal(path, PASSPHRASE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"log2_n": 10}, "is refused: only scrypt"),
        ({"log2_n": 30}, "is refused: only scrypt"),
        ({"name": "pbkdf2"}, "is refused: only scrypt"),
        ({"r": 1}, "is refused: only scrypt"),
    ],
)
def test_weakened_or_exhausting_kdf_is_refused(
    shares: list[CustodyShare], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = tmp_path / "s"
    seal(shares[0], path, PASSPHRASE, log2_n=FAST)
    document = json.loads(path.read_text())
    document["kdf"].update(change)
    path.write_text(json.dumps(document))
    with pytest.raises(CustodyError, match=message):
        unseal(path, PASSPHRASE)


def test_truncated_and_foreign_files_are_refused(
    shares: list[CustodyShare], tmp_path: Path
) -> None:
    path = tmp_path / "s"
    seal(shares[0], path, PASSPHRASE, log2_n=FAST)
    data = path.read_bytes()
    for length in (0, 10, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:length])
        with pytest.raises(CustodyError, match="truncated or not a sealed share"):
            unseal(path, PASSPHRASE)
    path.write_text(json.dumps({"format": "something-else/1"}))
    with pytest.raises(CustodyError, match="not a sealed share file of format"):
        unseal(path, PASSPHRASE)
    document = json.loads(data)
    del document["ciphertext"]
    path.write_text(json.dumps(document))
    with pytest.raises(CustodyError, match=r"truncated or damaged: it lacks \['ciphertext'\]"):
        unseal(path, PASSPHRASE)
    with pytest.raises(CustodyError, match="no sealed share at"):
        unseal(tmp_path / "absent", PASSPHRASE)


def test_bad_input_changes_nothing(shares: list[CustodyShare], tmp_path: Path) -> None:
    path = tmp_path / "s"
    with pytest.raises(CustodyError, match="at least 12 characters"):
        seal(shares[0], path, "short")
    with pytest.raises(CustodyError, match="log2_n 8"):
        seal(shares[0], path, PASSPHRASE, log2_n=8)
    assert list(tmp_path.iterdir()) == []
    seal(shares[0], path, PASSPHRASE, log2_n=FAST)
    before = path.read_bytes()
    with pytest.raises(CustodyError, match="already exists"):
        seal(shares[1], path, PASSPHRASE, log2_n=FAST)
    assert path.read_bytes() == before


def test_paper_round_trip(shares: list[CustodyShare]) -> None:
    for share in shares:
        sheet = to_paper(share)
        assert share.fingerprint in sheet and share.ceremony in sheet
        assert from_paper(sheet) == share
    sheet = to_paper(shares[0])
    assert "2 of this group's shares, 2 of 2 groups" in sheet
    # Typed back in by hand: one word per line, upper case, no numbers.
    head, _, _ = sheet.partition("\n\n")
    typed = head + "\n\n" + "\n".join(word.upper() for word in shares[0].words) + "\n"
    assert from_paper(typed) == shares[0]


def test_paper_typing_mistakes_are_named(shares: list[CustodyShare]) -> None:
    sheet = to_paper(shares[1])
    words = shares[1].words
    wrong = "academic" if words[7] != "academic" else "acid"
    with pytest.raises(CustodyError, match="RS1024 checksum"):
        from_paper(sheet.replace(f" 8 {words[7]}", f" 8 {wrong}", 1))
    with pytest.raises(CustodyError, match="fingerprint does not match"):
        from_paper(sheet.replace("member 2 of 3", "member 3 of 3"))
    with pytest.raises(CustodyError, match="says 33 words but 32"):
        from_paper(sheet.replace(f" {words[-1]}", "", 1))
    with pytest.raises(CustodyError, match="lacks the field"):
        from_paper("\n".join(line for line in sheet.splitlines() if "ceremony" not in line))
    with pytest.raises(CustodyError, match="not a word"):
        from_paper(sheet + "\nword42\n")
