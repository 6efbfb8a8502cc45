"""The postal authority's 44 vectors, in file order, through one verifier and one replay memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import _vectors
import pytest

from meter.errors import MalformedIndicium
from meter.indicium import address_digest, decode, normalize_address
from meter.postoffice import EmbeddedReplayStore, MemoryReplayStore, ReplayStore, Verdict, Verifier

VECTORS = _vectors.load()


def test_the_copy_is_the_authority_file() -> None:
    assert _vectors.sha256_of_vectors() == _vectors.VECTORS_SHA256
    assert VECTORS["spec"] == "PIM-1"
    assert len(VECTORS["vectors"]) == 44


@pytest.fixture(params=["memory", "embedded"])
def replay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplayStore]:
    store: ReplayStore
    if request.param == "memory":
        store = MemoryReplayStore()
    else:
        store = EmbeddedReplayStore.open(tmp_path / "replay.store")
    yield store
    store.close()


def verifier(replay: ReplayStore) -> Verifier:
    return Verifier(
        _vectors.trust_store(VECTORS),
        _vectors.revocations(VECTORS),
        replay,
        _vectors.verification_date(VECTORS),
    )


def test_verdicts_in_file_order(replay: ReplayStore) -> None:
    check = verifier(replay)
    for vector in VECTORS["vectors"]:
        result = check.verify(bytes.fromhex(vector["indicium_hex"]))
        assert (vector["name"], result.verdict) == (vector["name"], Verdict(vector["verdict"]))
        assert result.reason
        assert (result.indicium is None) == (result.verdict is Verdict.MALFORMED)


def test_batch_gives_the_sequential_verdicts(replay: ReplayStore) -> None:
    items = [bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"]]
    results = verifier(replay).verify_batch(items)
    assert [r.verdict.value for r in results] == [v["verdict"] for v in VECTORS["vectors"]]
    sequential = verifier(MemoryReplayStore())
    assert results == [sequential.verify(item) for item in items]


def test_embedded_store_remembers_the_vectors_across_reopen(tmp_path: Path) -> None:
    items = [bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"]]
    with EmbeddedReplayStore.open(tmp_path / "replay.store") as store:
        verifier(store).verify_batch(items)
    with EmbeddedReplayStore.open(tmp_path / "replay.store") as store:
        again = verifier(store).verify_batch(items)
    expected = [
        "DUPLICATE" if v["verdict"] == "VALID" else v["verdict"] for v in VECTORS["vectors"]
    ]
    assert [r.verdict.value for r in again] == expected


@pytest.mark.parametrize("vector", [v for v in VECTORS["vectors"] if "fields" in v], ids=str)
def test_fields(vector: dict[str, object]) -> None:
    assert isinstance(vector["indicium_hex"], str)
    assert decode(bytes.fromhex(vector["indicium_hex"])).fields() == vector["fields"]


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_round_trip_or_malformed(vector: dict[str, str]) -> None:
    data = bytes.fromhex(vector["indicium_hex"])
    if vector["verdict"] == "MALFORMED":
        with pytest.raises(MalformedIndicium):
            decode(data)
    else:
        assert decode(data).to_bytes() == data


def test_address_digests() -> None:
    for entry in VECTORS["address_digests"]:
        assert normalize_address(entry["address"]).hex() == entry["normalized_utf8_hex"]
        assert address_digest(entry["address"]).hex() == entry["digest_hex"]


def test_valid_vectors_carry_the_digest_of_an_authority_address() -> None:
    digests = {entry["digest_hex"] for entry in VECTORS["address_digests"]}
    for vector in VECTORS["vectors"]:
        if vector["verdict"] == "VALID":
            assert decode(bytes.fromhex(vector["indicium_hex"])).address_digest.hex() in digests
