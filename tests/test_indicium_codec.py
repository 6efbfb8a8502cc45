"""PIM-1 encoding and decoding: the layout, the MALFORMED rules and the encoder's refusals."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import _vectors
import pytest

from meter.errors import InvalidInput, MalformedIndicium
from meter.indicium import (
    EPOCH,
    MAX_POSTAGE,
    MAX_REGISTER,
    SIGNED_LENGTH,
    Algorithm,
    Indicium,
    RateCategory,
    decode,
)
from meter.indicium.codec import LAYOUT

VECTORS = _vectors.load()
BY_NAME = {v["name"]: v for v in VECTORS["vectors"]}
# The spec's byte layout table: field, offset, length.
SPEC_LAYOUT = [
    ("version", 0, 1),
    ("algorithm", 1, 1),
    ("authorization_id", 2, 4),
    ("vendor_model", 6, 4),
    ("device_serial", 10, 8),
    ("key_id", 18, 8),
    ("sequence", 26, 4),
    ("ascending", 30, 5),
    ("descending", 35, 5),
    ("postage", 40, 3),
    ("rate_category", 43, 2),
    ("date_of_mailing", 45, 4),
    ("time_of_issue", 49, 4),
    ("origin_zip", 53, 5),
    ("destination", 58, 11),
    ("address_digest", 69, 8),
    ("software_id", 77, 2),
    ("flags", 79, 1),
    ("reference_sequence", 80, 4),
]


def sample(**changes: Any) -> Indicium:
    indicium = decode(bytes.fromhex(BY_NAME["ecdsa-valid"]["indicium_hex"]))
    return dataclasses.replace(indicium, **changes)


def test_layout_is_the_spec_table() -> None:
    assert [(f.name, f.offset, f.length) for f in LAYOUT] == SPEC_LAYOUT
    assert LAYOUT[-1].offset + LAYOUT[-1].length == SIGNED_LENGTH == 84
    # Indicium's fields follow the table (after the version byte), then the signature.
    names = [f.name for f in dataclasses.fields(Indicium)]
    assert names == [f.name for f in LAYOUT[1:]] + ["signature"]


def test_algorithm_lengths() -> None:
    assert [a.signature_length for a in Algorithm] == [64, 64, 256]
    assert datetime(2020, 1, 1, tzinfo=UTC) == EPOCH
    assert MAX_POSTAGE == 2**24 - 1
    assert MAX_REGISTER == 2**40 - 1


def test_each_field_lands_at_its_offset() -> None:
    indicium = sample(
        authorization_id=0x01020304,
        vendor_model="AZ09",
        device_serial=0x1112131415161718,
        key_id=bytes(range(0x20, 0x28)),
        sequence=0x21222324,
        ascending=0x3132333435,
        descending=0x4142434445,
        postage=0x515253,
        rate_category=RateCategory.OTHER,
        date_of_mailing=date(2155, 12, 31),
        time_of_issue=EPOCH + timedelta(seconds=0x61626364),
        origin_zip="01234",
        destination="56789012345",
        address_digest=bytes(range(0x70, 0x78)),
        software_id=0x8182,
        flags=0x01,
        reference_sequence=0x21222323,
    )
    data = indicium.signed_part()
    expected = {
        "version": b"\x01",
        "algorithm": b"\x01",
        "authorization_id": bytes.fromhex("01020304"),
        "vendor_model": b"AZ09",
        "device_serial": bytes.fromhex("1112131415161718"),
        "key_id": bytes(range(0x20, 0x28)),
        "sequence": bytes.fromhex("21222324"),
        "ascending": bytes.fromhex("3132333435"),
        "descending": bytes.fromhex("4142434445"),
        "postage": bytes.fromhex("515253"),
        "rate_category": bytes.fromhex("00ff"),
        "date_of_mailing": (21551231).to_bytes(4),
        "time_of_issue": bytes.fromhex("61626364"),
        "origin_zip": b"01234",
        "destination": b"56789012345",
        "address_digest": bytes(range(0x70, 0x78)),
        "software_id": bytes.fromhex("8182"),
        "flags": b"\x01",
        "reference_sequence": bytes.fromhex("21222323"),
    }
    for name, offset, length in SPEC_LAYOUT:
        assert data[offset : offset + length] == expected[name], name
    signature = bytes(range(64))
    assert decode(data + signature) == indicium.with_signature(signature)


@pytest.mark.parametrize("vector", [v for v in VECTORS["vectors"] if "fields" in v], ids=str)
def test_vector_fields(vector: dict[str, Any]) -> None:
    indicium = decode(bytes.fromhex(vector["indicium_hex"]))
    assert indicium.fields() == vector["fields"]
    assert list(indicium.fields()) == list(vector["fields"])
    json.dumps(indicium.fields())


def test_every_decodable_vector_round_trips() -> None:
    decodable = 0
    for vector in VECTORS["vectors"]:
        data = bytes.fromhex(vector["indicium_hex"])
        if vector["verdict"] == "MALFORMED":
            with pytest.raises(MalformedIndicium):
                decode(data)
            continue
        assert decode(data).to_bytes() == data
        decodable += 1
    assert decodable == 29


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("truncated", "length 147"),
        ("extra-byte", "length 149"),
        ("bad-version", "version 0x02"),
        ("bad-algorithm", "algorithm 0x09"),
        ("bad-date", "date of mailing 20261131"),
        ("date-before-2020", "date of mailing 20191231"),
        ("bad-rate-category", "rate category 0x0042"),
        ("bad-origin-zip", "origin ZIP '94X43'"),
        ("bad-vendor-lowercase", "vendor and model 'pm01'"),
        ("bad-flags", "flags 0x80"),
        ("sequence-zero", "piece sequence is 0"),
        ("reference-without-correction", "correction flag is clear"),
        ("correction-without-reference", "reference sequence 0"),
        ("specimen-with-postage", "specimen carries postage 730"),
        ("empty", "empty"),
    ],
)
def test_malformed_vectors_name_the_rule(name: str, rule: str) -> None:
    with pytest.raises(MalformedIndicium, match=rule):
        decode(bytes.fromhex(BY_NAME[name]["indicium_hex"]))


def patched(offset: int, raw: bytes) -> bytes:
    data = bytearray(sample().to_bytes())
    data[offset : offset + len(raw)] = raw
    return bytes(data)


@pytest.mark.parametrize(
    ("offset", "raw"),
    [
        (45, (20200101).to_bytes(4)),
        (45, (21551231).to_bytes(4)),
        (45, (20240229).to_bytes(4)),
        (49, (0).to_bytes(4)),
        (49, (2**32 - 1).to_bytes(4)),
        (79, b"\x03"),  # correction and specimen together: postage must then be 0
        (6, b"ZZ99"),
        (58, b"00000000000"),
        (43, b"\x00\xff"),
    ],
)
def test_boundaries_that_are_not_malformed(offset: int, raw: bytes) -> None:
    data = patched(offset, raw)
    if raw == b"\x03":
        data = data[:40] + b"\x00\x00\x00" + data[43:80] + (5).to_bytes(4) + data[84:]
    assert decode(data).to_bytes() == data


@pytest.mark.parametrize(
    ("offset", "raw"),
    [
        (45, (21560101).to_bytes(4)),
        (45, (20250229).to_bytes(4)),
        (45, (20261300).to_bytes(4)),
        (45, (20261100).to_bytes(4)),
        (45, (0xFFFFFFFF).to_bytes(4)),
        (43, b"\x00\x00"),
        (43, b"\x00\x08"),
        (43, b"\x01\x01"),
        (79, b"\x04"),
        (6, b"PM0 "),
        (6, b"PM\xc301"),
        (53, b"9404 "),
        (58, b"6270412342-"),
        (1, b"\x00"),
        (0, b"\x00"),
    ],
)
def test_field_values_that_are_malformed(offset: int, raw: bytes) -> None:
    with pytest.raises(MalformedIndicium):
        decode(patched(offset, raw))


def test_correction_reference_bounds() -> None:
    ok = sample(flags=1, sequence=10, reference_sequence=9)
    assert decode(ok.to_bytes()).is_correction
    for reference in (0, 10, 11):
        data = bytearray(ok.to_bytes())
        data[80:84] = reference.to_bytes(4)
        with pytest.raises(MalformedIndicium, match="reference sequence"):
            decode(bytes(data))


def test_every_length_but_the_right_one_is_malformed() -> None:
    for algorithm, total in ((1, 148), (2, 148), (3, 340)):
        for length in range(0, 400):
            data = bytes([1, algorithm]) + bytes(max(0, length - 2))
            if length == total:
                continue
            with pytest.raises(MalformedIndicium):
                decode(data[:length])


def test_random_mutations_decode_or_raise_malformed_only() -> None:
    """Anything that decodes must encode back to the same bytes: the encoder accepts
    every indicium that is not malformed, and the decoder invents no other rule."""
    rng = random.Random(20261122)
    originals = [bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"][:3]]
    decoded = 0
    for _ in range(3000):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(2, SIGNED_LENGTH)] = rng.randrange(256)
        try:
            indicium = decode(bytes(data))
        except MalformedIndicium:
            continue
        assert indicium.to_bytes() == bytes(data)
        decoded += 1
    assert decoded > 500


def test_accepts_any_bytes_like() -> None:
    data = sample().to_bytes()
    assert decode(bytearray(data)) == decode(data) == decode(memoryview(data))  # type: ignore[arg-type]


def test_flags_properties() -> None:
    assert not sample().is_correction and not sample().is_specimen
    assert sample(flags=1, reference_sequence=3).is_correction
    assert sample(flags=2, postage=0).is_specimen


def test_fields_shape_and_time_in_utc() -> None:
    eastern = timezone(timedelta(hours=-5))
    indicium = sample(time_of_issue=datetime(2026, 11, 18, 3, 2, 5, tzinfo=eastern))
    fields = indicium.fields()
    assert fields["time_of_issue"] == "2026-11-18T08:02:05+00:00"
    assert fields["date_of_mailing"] == "2026-11-18"
    assert fields["key_id"] == "b92085f7c787ac61"
    assert fields["rate_category"] == 1 and type(fields["rate_category"]) is int
    assert "signature" not in fields
    assert decode(indicium.to_bytes()).time_of_issue == indicium.time_of_issue


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vendor_model": "pm01"}, "vendor and model"),
        ({"vendor_model": "PM-1"}, "vendor and model"),
        ({"vendor_model": "PM1"}, "vendor_model must be exactly 4"),
        ({"vendor_model": "PM\u00d81"}, "not ASCII"),
        ({"origin_zip": "9404"}, "origin_zip must be exactly 5"),
        ({"origin_zip": "9404X"}, "origin ZIP"),
        ({"origin_zip": "\uff19\uff14\uff10\uff14\uff13"}, "not ASCII"),
        ({"destination": "6270412342"}, "destination must be exactly 11"),
        ({"destination": "62704 23423"}, "destination"),
        ({"flags": 4}, "reserved bit"),
        ({"flags": 0x80}, "reserved bit"),
        ({"flags": 256}, "flags 256 does not fit 1 bytes"),
        ({"flags": 1, "reference_sequence": 0}, "reference sequence 0"),
        ({"flags": 1, "reference_sequence": 73}, "reference sequence 73"),
        ({"flags": 0, "reference_sequence": 5}, "correction flag is clear"),
        ({"flags": 2}, "specimen carries postage 730"),
        ({"sequence": 0}, "piece sequence is 0"),
        ({"sequence": 2**32}, "sequence .* does not fit 4 bytes"),
        ({"sequence": -1}, "sequence -1 does not fit"),
        ({"postage": MAX_POSTAGE + 1}, "postage 16777216 does not fit 3 bytes"),
        ({"ascending": MAX_REGISTER + 1}, "ascending .* does not fit 5 bytes"),
        ({"descending": -1}, "descending -1"),
        ({"authorization_id": 2**32}, "authorization_id"),
        ({"device_serial": 2**64}, "device_serial"),
        ({"software_id": 2**16}, "software_id"),
        ({"reference_sequence": 2**32, "flags": 1}, "reference_sequence"),
        ({"rate_category": 0x42}, "rate category 0x0042"),
        ({"algorithm": 4}, "algorithm 4"),
        ({"key_id": b"\x00" * 7}, "key_id must be exactly 8"),
        ({"address_digest": "9c64da88a2ecf8d3"}, "address_digest must be exactly 8"),
        ({"date_of_mailing": date(2019, 12, 31)}, "date of mailing 20191231"),
        ({"date_of_mailing": date(2156, 1, 1)}, "date of mailing 21560101"),
        ({"date_of_mailing": "2026-11-18"}, "is not a date"),
        ({"time_of_issue": datetime(2026, 11, 18, 8, 2, 5)}, "no time zone"),
        ({"time_of_issue": datetime(2026, 11, 18, 8, 2, 5, 1, tzinfo=UTC)}, "whole seconds"),
        ({"time_of_issue": datetime(2019, 12, 31, 23, 59, 59, tzinfo=UTC)}, "time_of_issue -1"),
        ({"time_of_issue": EPOCH + timedelta(seconds=2**32)}, "time_of_issue 4294967296"),
        ({"device_serial": True}, "device_serial True"),
    ],
)
def test_encoder_refuses_what_would_be_malformed(changes: dict[str, Any], message: str) -> None:
    indicium = sample(**changes)
    with pytest.raises(InvalidInput, match=message):
        indicium.signed_part()
    with pytest.raises(InvalidInput):
        indicium.to_bytes()


def test_encoder_refuses_a_signature_of_the_wrong_length() -> None:
    for length in (0, 63, 65, 256):
        with pytest.raises(InvalidInput, match=f"signature is {length} bytes"):
            sample(signature=bytes(length)).to_bytes()
    rsa = sample(algorithm=Algorithm.RSA_PSS_2048, signature=bytes(64))
    with pytest.raises(InvalidInput, match="needs exactly 256"):
        rsa.to_bytes()
    assert len(rsa.with_signature(bytes(256)).to_bytes()) == 340


def test_rate_categories() -> None:
    assert [int(c) for c in RateCategory] == [1, 2, 3, 4, 5, 6, 7, 0xFF]
    assert RateCategory.FIRST_CLASS_LETTER.title == "First-Class Mail letter"
    assert RateCategory.FIRST_CLASS_FLAT.title == "First-Class Mail large envelope (flat)"
    assert RateCategory.OTHER.title == "other"
    slugs = [c.slug for c in RateCategory]
    assert slugs == [
        "first-class-letter",
        "first-class-flat",
        "ground-advantage",
        "priority",
        "priority-express",
        "media",
        "marketing",
        "other",
    ]
    for category in RateCategory:
        assert RateCategory.parse(category.slug) is category
        assert RateCategory.parse(str(int(category))) is category
        assert RateCategory.parse(f"0x{int(category):04x}") is category
    assert RateCategory.parse(" Priority ") is RateCategory.PRIORITY


@pytest.mark.parametrize("text", ["first-class", "0x42", "8", "", "priority mail"])
def test_rate_category_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        RateCategory.parse(text)
    assert repr(text) in str(caught.value)
    assert "first-class-letter" in str(caught.value) and "priority-express" in str(caught.value)
