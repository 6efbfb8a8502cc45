"""Normalized destination address and its digest (spec: "Normalized destination address")."""

from __future__ import annotations

import hashlib
from typing import Any

import _vectors
import pytest

from meter.errors import InvalidInput
from meter.indicium import address_digest, normalize_address
from meter.indicium.address import WHITE_SPACE

DIGESTS = _vectors.load()["address_digests"]


@pytest.mark.parametrize("entry", DIGESTS, ids=range(len(DIGESTS)))
def test_authority_digests(entry: dict[str, Any]) -> None:
    normalized = normalize_address(entry["address"])
    assert normalized.hex() == entry["normalized_utf8_hex"]
    assert address_digest(entry["address"]).hex() == entry["digest_hex"]
    assert hashlib.sha256(normalized).digest()[:8] == address_digest(entry["address"])


def test_white_space_is_the_unicode_property_not_isspace() -> None:
    assert len(WHITE_SPACE) == len(set(WHITE_SPACE)) == 25
    isspace = {chr(c) for c in range(0x110000) if chr(c).isspace()}
    # Python also calls the information separators U+001C..U+001F space; Unicode does not.
    assert isspace - set(WHITE_SPACE) == {"\x1c", "\x1d", "\x1e", "\x1f"}
    assert set(WHITE_SPACE) <= isspace


def test_text_breaks_at_lf_crlf_and_cr_only() -> None:
    assert normalize_address("a\nb\r\nc\rd") == b"A\nB\nC\nD"
    # U+0085, U+2028, U+2029, VT and FF inside a text are white space, not line breaks.
    assert normalize_address("a\x85b\u2028c\u2029d\x0be\x0cf") == b"A B C D E F"
    assert normalize_address("a\r\rb\n\n") == b"A\nB"


def test_a_list_element_is_one_line() -> None:
    assert normalize_address(["PO\nBox 7", "x\r\ny"]) == b"PO BOX 7\nX Y"
    assert normalize_address(("a", "b")) == b"A\nB"


def test_nfkc_then_full_upper_case() -> None:
    assert normalize_address("stra\u00dfe") == b"STRASSE"
    assert normalize_address("\ufb03") == b"FFI"  # ffi ligature: NFKC, then upper
    assert normalize_address("\u2168") == b"IX"  # Roman numeral nine
    assert normalize_address("e\u0301") == "\u00c9".encode()  # composed by NFKC


def test_empty_lines_and_edges() -> None:
    assert normalize_address("") == b""
    assert normalize_address([]) == b""
    assert normalize_address(["\u3000", " \t ", ""]) == b""
    assert address_digest([]) == hashlib.sha256(b"").digest()[:8]
    assert normalize_address(" \x1c ") == b"\x1c"  # not white space: kept


def test_bytes_are_refused() -> None:
    with pytest.raises(InvalidInput):
        normalize_address(b"1234 Main St")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        normalize_address([b"1234 Main St"])  # type: ignore[list-item]
