"""The verdict table with indicia signed here by the test meters' keys."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import _vectors
import pytest
from _vectors import days, signed
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
)

from meter.indicium import Algorithm, decode, key_id
from meter.pki.revocation import Revocations
from meter.postoffice import (
    EmbeddedReplayStore,
    MemoryReplayStore,
    ReplayStore,
    Verdict,
    VerificationResult,
    Verifier,
    verify_hex_lines,
)

VECTORS = _vectors.load()
TODAY = _vectors.verification_date(VECTORS)
TRUST = _vectors.trust_store(VECTORS)
ECDSA, EDDSA, RSA = Algorithm.ECDSA_P256, Algorithm.ED25519, Algorithm.RSA_PSS_2048
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class CountingStore:
    """A memory store that counts its check_and_set calls."""

    def __init__(self) -> None:
        self.inner = MemoryReplayStore()
        self.calls: list[int] = []

    def check_and_set(self, pieces: Sequence[tuple[int, int]]) -> list[bool]:
        self.calls.append(len(pieces))
        return self.inner.check_and_set(pieces)

    def close(self) -> None:
        self.inner.close()


def make(
    replay: ReplayStore | None = None,
    today: date = TODAY,
    revocations: Revocations | None = None,
) -> Verifier:
    return Verifier(
        TRUST,
        revocations if revocations is not None else _vectors.revocations(VECTORS),
        replay if replay is not None else MemoryReplayStore(),
        today,
    )


def at(day: date, hour: int = 8, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize("algorithm", [ECDSA, EDDSA, RSA], ids=lambda a: a.name)
def test_fresh_indicia_are_valid_then_duplicate(algorithm: Algorithm) -> None:
    verifier = make()
    data = signed(VECTORS, algorithm)
    first = verifier.verify(data)
    assert first.verdict is Verdict.VALID, first.reason
    assert first.indicium == decode(data)
    second = verifier.verify(data)
    assert second.verdict is Verdict.DUPLICATE
    # A re-signed indicium of the same piece is the same piece.
    assert verifier.verify(signed(VECTORS, algorithm, postage=1)).verdict is Verdict.DUPLICATE


@pytest.mark.parametrize("algorithm", [ECDSA, EDDSA, RSA], ids=lambda a: a.name)
def test_every_single_bit_alteration_of_the_signed_part_is_caught(algorithm: Algorithm) -> None:
    verifier = make()
    data = signed(VECTORS, algorithm)
    seen: set[Verdict] = set()
    for index in range(84):
        for bit in range(8):
            altered = bytearray(data)
            altered[index] ^= 1 << bit
            result = verifier.verify(bytes(altered))
            assert result.verdict in {Verdict.FORGED, Verdict.MALFORMED, Verdict.UNKNOWN_DEVICE}, (
                index,
                bit,
                result,
            )
            seen.add(result.verdict)
    assert seen == {Verdict.FORGED, Verdict.MALFORMED, Verdict.UNKNOWN_DEVICE}
    # None of them was recorded as a piece: the genuine one is still new.
    assert verifier.verify(data).verdict is Verdict.VALID


@pytest.mark.parametrize("algorithm", [ECDSA, EDDSA, RSA], ids=lambda a: a.name)
def test_altered_signature_bits_are_forged(algorithm: Algorithm) -> None:
    verifier = make()
    data = signed(VECTORS, algorithm)
    for index in range(84, len(data), 7):
        altered = bytearray(data)
        altered[index] ^= 0x10
        assert verifier.verify(bytes(altered)).verdict is Verdict.FORGED


def test_ecdsa_high_s_is_the_same_piece() -> None:
    verifier = make()
    data = signed(VECTORS, ECDSA)
    s = int.from_bytes(data[116:148])
    malleated = data[:116] + (P256_ORDER - s).to_bytes(32)
    assert verifier.verify(malleated).verdict is Verdict.VALID
    assert verifier.verify(data).verdict is Verdict.DUPLICATE
    zero_s = data[:116] + bytes(32)
    assert make().verify(zero_s).verdict is Verdict.FORGED


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"device_serial": _vectors.ED25519_SERIAL}, "certified for device 983973031309"),
        ({"authorization_id": 60670}, "authorized by 60669, not 60670"),
        ({"time_of_issue": datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC)}, "outside the validity"),
        ({"time_of_issue": datetime(2036, 1, 1, 0, 0, 1, tzinfo=UTC)}, "outside the validity"),
    ],
)
def test_forged(changes: dict[str, object], reason: str) -> None:
    result = make().verify(signed(VECTORS, ECDSA, **changes))
    assert result.verdict is Verdict.FORGED
    assert reason in result.reason


def test_key_type_that_does_not_fit_the_algorithm_byte_is_forged() -> None:
    # The ECDSA meter's key id and serial, but the algorithm byte says Ed25519.
    indicium = dataclasses.replace(_vectors.template(VECTORS, ECDSA), algorithm=EDDSA)
    key = _vectors.private_key(VECTORS, _vectors.ECDSA_SERIAL)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(key.sign(indicium.signed_part(), ec.ECDSA(hashes.SHA256())))
    data = indicium.with_signature(r.to_bytes(32) + s.to_bytes(32)).to_bytes()
    result = make().verify(data)
    assert result.verdict is Verdict.FORGED
    assert (
        result.reason
        == "signature does not verify under the meter certificate of device 983973031309"
    )


def test_unknown_device() -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    indicium = dataclasses.replace(
        _vectors.template(VECTORS, ECDSA), key_id=key_id(stranger.public_key())
    )
    result = make().verify(_vectors.sign(indicium, stranger))
    assert result.verdict is Verdict.UNKNOWN_DEVICE
    assert key_id(stranger.public_key()).hex() in result.reason


def test_certificate_bounds_are_inclusive() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    verifier = make(today=start.date())
    result = verifier.verify(
        signed(VECTORS, ECDSA, time_of_issue=start, date_of_mailing=start.date())
    )
    assert result.verdict is Verdict.VALID, result.reason
    early = start - timedelta(seconds=1)
    result = verifier.verify(
        signed(VECTORS, ECDSA, time_of_issue=early, date_of_mailing=start.date(), sequence=2)
    )
    assert result.verdict is Verdict.FORGED


def test_revocation_is_strictly_before_the_time_of_issue() -> None:
    issued = at(TODAY)
    for revoked_at, verdict in (
        (issued - timedelta(seconds=1), Verdict.REVOKED),
        (issued, Verdict.VALID),
        (issued + timedelta(days=1), Verdict.VALID),
    ):
        revocations = Revocations({_vectors.ED25519_SERIAL: revoked_at})
        result = make(revocations=revocations).verify(signed(VECTORS, EDDSA))
        assert result.verdict is verdict, result.reason
    # A revoked device's stale date is still REVOKED: that row comes first.
    revocations = Revocations({_vectors.ED25519_SERIAL: issued - timedelta(days=400)})
    old = signed(VECTORS, EDDSA, date_of_mailing=TODAY - days(300))
    assert make(revocations=revocations).verify(old).verdict is Verdict.REVOKED
    # ... but a forgery of a revoked device is FORGED.
    forged = bytearray(signed(VECTORS, EDDSA))
    forged[-1] ^= 1
    assert make(revocations=revocations).verify(bytes(forged)).verdict is Verdict.FORGED


@pytest.mark.parametrize(
    ("mailing", "issued", "verdict"),
    [
        (TODAY + days(1), TODAY, Verdict.VALID),  # D - V = 1
        (TODAY + days(2), TODAY, Verdict.NOT_YET_VALID),  # D - V = 2
        (TODAY, TODAY - days(10), Verdict.VALID),  # D - T = 10
        (TODAY, TODAY - days(11), Verdict.NOT_YET_VALID),  # advance dated 11 days
        (TODAY - days(1), TODAY, Verdict.NOT_YET_VALID),  # D < T
        (TODAY - days(183), TODAY - days(183), Verdict.VALID),  # V - D = 183
        (TODAY - days(184), TODAY - days(184), Verdict.EXPIRED),
        (TODAY - days(184), TODAY - days(190), Verdict.EXPIRED),
    ],
)
def test_dates(mailing: date, issued: date, verdict: Verdict) -> None:
    result = make().verify(
        signed(VECTORS, ECDSA, date_of_mailing=mailing, time_of_issue=at(issued))
    )
    assert result.verdict is verdict, result.reason


def test_time_of_issue_is_read_as_a_utc_date() -> None:
    verifier = make()
    late = signed(
        VECTORS, RSA, date_of_mailing=TODAY - days(1), time_of_issue=at(TODAY - days(1), 23, 59, 59)
    )
    assert verifier.verify(late).verdict is Verdict.VALID
    midnight = signed(
        VECTORS, RSA, date_of_mailing=TODAY - days(1), time_of_issue=at(TODAY, 0), sequence=2
    )
    assert verifier.verify(midnight).verdict is Verdict.NOT_YET_VALID


def test_specimens_never_enter_the_replay_store() -> None:
    verifier = make()
    specimen = signed(VECTORS, EDDSA, flags=2, postage=0, sequence=700)
    assert verifier.verify(specimen).verdict is Verdict.SPECIMEN
    assert verifier.verify(specimen).verdict is Verdict.SPECIMEN
    assert verifier.verify(signed(VECTORS, EDDSA, sequence=700)).verdict is Verdict.VALID


def test_a_forgery_never_burns_the_genuine_piece() -> None:
    verifier = make()
    genuine = signed(VECTORS, ECDSA)
    forged = genuine[:84] + bytes(64)
    assert verifier.verify(forged).verdict is Verdict.FORGED
    assert verifier.verify(genuine).verdict is Verdict.VALID


def test_correction_is_valid() -> None:
    correction = signed(VECTORS, ECDSA, flags=1, reference_sequence=999)
    result = make().verify(correction)
    assert result.verdict is Verdict.VALID
    assert result.indicium is not None and result.indicium.is_correction


def test_batch_is_one_replay_call_and_sees_its_own_duplicates() -> None:
    store = CountingStore()
    verifier = make(store)
    a, b = signed(VECTORS, ECDSA, sequence=1), signed(VECTORS, ECDSA, sequence=2)
    batch = [a, b"", a, b, signed(VECTORS, ECDSA, flags=2, postage=0, sequence=3), b]
    verdicts = [r.verdict for r in verifier.verify_batch(batch)]
    assert verdicts == [
        Verdict.VALID,
        Verdict.MALFORMED,
        Verdict.DUPLICATE,
        Verdict.VALID,
        Verdict.SPECIMEN,
        Verdict.DUPLICATE,
    ]
    assert store.calls == [4]
    assert verifier.verify_batch([b"", b"\x01"]) == [
        VerificationResult(Verdict.MALFORMED, "malformed: empty: no version byte", None),
        VerificationResult(Verdict.MALFORMED, "malformed: length 1: no algorithm byte", None),
    ]
    assert store.calls == [4]  # nothing reached the replay row
    assert verifier.verify_batch([]) == []


def test_batch_equals_sequential_on_mixed_input() -> None:
    items = [bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"]]
    items += [signed(VECTORS, alg, sequence=n) for n in (1, 2) for alg in (ECDSA, EDDSA, RSA)]
    items += items[-3:]
    sequential = make()
    assert make().verify_batch(items) == [sequential.verify(item) for item in items]


def test_a_failing_replay_store_gives_error_never_valid(tmp_path: Path) -> None:
    store = EmbeddedReplayStore.open(tmp_path / "replay.store")
    verifier = make(store)
    store.close()
    good = signed(VECTORS, ECDSA)
    results = verifier.verify_batch([good, b"", signed(VECTORS, ECDSA, flags=2, postage=0)])
    assert [r.verdict for r in results] == [Verdict.ERROR, Verdict.MALFORMED, Verdict.SPECIMEN]
    assert "replay store" in results[0].reason and "closed" in results[0].reason
    assert results[0].indicium == decode(good)
    with EmbeddedReplayStore.open(tmp_path / "replay.store") as reopened:
        assert make(reopened).verify(good).verdict is Verdict.VALID


def test_verify_hex_lines() -> None:
    store = CountingStore()
    verifier = make(store)
    a, b, c = (signed(VECTORS, EDDSA, sequence=n).hex() for n in (1, 2, 3))
    lines = [a + "\n", "\n", "  ", "zz\n", b.upper(), "abc", a, c + "\r\n", ""]
    results = list(verify_hex_lines(lines, verifier, batch_size=2))
    assert [r.verdict for r in results] == [
        Verdict.VALID,
        Verdict.MALFORMED,
        Verdict.VALID,
        Verdict.MALFORMED,
        Verdict.DUPLICATE,
        Verdict.VALID,
    ]
    assert results[1].reason == "malformed: line 4 is not hexadecimal"
    assert results[3].reason == "malformed: line 6 is not hexadecimal"
    assert store.calls == [1, 1, 2]
    with pytest.raises(ValueError, match="batch_size"):
        list(verify_hex_lines([a], verifier, batch_size=0))


def test_verify_hex_lines_over_the_vectors_in_big_batches() -> None:
    store = CountingStore()
    lines = [v["indicium_hex"] for v in VECTORS["vectors"]]
    results = list(verify_hex_lines(lines, make(store)))
    expected = [v["verdict"] for v in VECTORS["vectors"] if v["indicium_hex"]]
    assert [r.verdict.value for r in results] == expected
    assert len(store.calls) == 1


def test_to_json() -> None:
    verifier = make()
    valid = verifier.verify(signed(VECTORS, ECDSA)).to_json()
    assert valid["verdict"] == "VALID" and isinstance(valid["reason"], str)
    assert valid["fields"] == decode(signed(VECTORS, ECDSA)).fields()
    json.dumps(valid)
    malformed = verifier.verify(b"\x02").to_json()
    assert malformed == {"verdict": "MALFORMED", "reason": "malformed: version 0x02 is not 0x01"}
    assert [v.value for v in Verdict] == [
        "MALFORMED",
        "UNKNOWN_DEVICE",
        "FORGED",
        "REVOKED",
        "NOT_YET_VALID",
        "EXPIRED",
        "SPECIMEN",
        "DUPLICATE",
        "VALID",
        "ERROR",
    ]


def test_bytes_like_input() -> None:
    data = signed(VECTORS, ECDSA)
    assert make().verify(bytearray(data)).verdict is Verdict.VALID  # type: ignore[arg-type]


def test_looking_at_pieces_records_nothing() -> None:
    """verify_batch(record=False) asks the store (seen) and never writes it."""
    store = MemoryReplayStore()
    verifier = make(store)
    a, b = (signed(VECTORS, ECDSA, sequence=n) for n in (501, 502))
    for _ in range(2):
        looked = verifier.verify_batch([a, b, a], record=False)
        assert [r.verdict for r in looked] == [Verdict.VALID] * 3
        assert "not accepted yet" in looked[0].reason
    assert len(store) == 0
    assert [r.verdict for r in verifier.verify_batch([a])] == [Verdict.VALID]
    looked = verifier.verify_batch([a, b, forged_copy(a)], record=False)
    assert [r.verdict for r in looked] == [Verdict.DUPLICATE, Verdict.VALID, Verdict.FORGED]
    assert len(store) == 1


def forged_copy(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[70] ^= 0x5A  # inside the signed part
    return bytes(changed)


# --- the fast path: same verdicts and reasons as the rules read one by one -------------


def test_ecdsa_der_built_from_bytes_equals_cryptography_s() -> None:
    """p256_der gives encode_dss_signature's bytes, and refuses r or s outside [1, n-1]."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from meter.indicium.signature import p256_der

    rng = random.Random(20261202)
    n = P256_ORDER
    # Short values (leading zero bytes), top bits set and clear, the ends of the range.
    values = [
        1,
        0x7F,
        0x80,
        0xFF,
        2**255 - 1,
        2**255,
        n - 1,
        *(rng.randrange(1, n) for _ in range(300)),
    ]
    values += [rng.randrange(1, 2 ** rng.randrange(1, 256)) for _ in range(300)]
    for r in values:
        s = values[rng.randrange(len(values))]
        assert p256_der(r.to_bytes(32) + s.to_bytes(32)) == encode_dss_signature(r, s), (r, s)
    for r, s in [(0, 1), (1, 0), (n, 1), (1, n), (2**256 - 1, 1), (1, n + 1)]:
        with pytest.raises(InvalidSignature):
            p256_der(r.to_bytes(32) + s.to_bytes(32))


def test_every_byte_value_at_every_offset_gives_the_rules_verdict() -> None:
    """decode's quick test accepts exactly what the field rules accept: at every offset of
    the signed part, every byte value decodes or is MALFORMED with the rules' own reason."""
    from meter.errors import MalformedIndicium
    from meter.indicium.codec import LAYOUT, _malformation

    data = signed(VECTORS, ECDSA)
    rule_fields = {
        "vendor_model",
        "origin_zip",
        "destination",
        "date_of_mailing",
        "rate_category",
        "flags",
        "sequence",
        "reference_sequence",
        "postage",
    }
    by_offset = {o: f for f in LAYOUT for o in range(f.offset, f.offset + f.length)}
    malformed = 0
    for offset in range(2, 84):  # the version and algorithm bytes have their own tests
        for value in range(256):
            altered = bytearray(data)
            altered[offset] = value
            wire = {
                f.name: (
                    int.from_bytes(altered[f.offset : f.offset + f.length])
                    if f.kind.name == "UINT"
                    else bytes(altered[f.offset : f.offset + f.length])
                )
                for f in LAYOUT
                if f.name in rule_fields
            }
            expected = _malformation(**wire)
            try:
                decoded = decode(bytes(altered))
            except MalformedIndicium as exc:
                malformed += 1
                assert str(exc) == expected, (by_offset[offset].name, value)
            else:
                assert expected is None, (by_offset[offset].name, value, expected)
                assert decoded.signed_part() == bytes(altered[:84])
    assert malformed > 1000  # the rules did refuse many of them
