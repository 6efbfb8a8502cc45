"""The postal authority's vectors, in file order, through the verifier on every replay store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time
from pathlib import Path

import _redis
import _vectors
import pytest

from meter.postoffice import EmbeddedReplayStore, MemoryReplayStore, ReplayStore, Verdict, Verifier

VECTORS = _vectors.load()
TODAY = _vectors.verification_date(VECTORS)
ITEMS = [bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"]]
EXPECTED = [Verdict(v["verdict"]) for v in VECTORS["vectors"]]
STORES = [
    "memory",
    "embedded",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", marks=pytest.mark.redis),
]


def fixed_clock() -> datetime:
    """Noon of the vectors' verification day: Redis keys live as on that day."""
    return datetime.combine(TODAY, time(12), UTC)


def stores(kind: str, folder: Path) -> Iterator[ReplayStore]:
    if kind == "memory":
        yield MemoryReplayStore()
    elif kind == "embedded":
        with EmbeddedReplayStore.open(folder) as store:
            yield store
    else:
        yield from _redis.open_store(kind, clock=fixed_clock)


@pytest.fixture(params=STORES)
def replay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplayStore]:
    yield from stores(request.param, tmp_path / "replay")


def verifier(replay: ReplayStore) -> Verifier:
    return Verifier(_vectors.trust_store(VECTORS), _vectors.revocations(VECTORS), replay, TODAY)


def test_one_at_a_time_in_file_order(replay: ReplayStore) -> None:
    check = verifier(replay)
    verdicts = [
        (v["name"], check.verify(item).verdict)
        for v, item in zip(VECTORS["vectors"], ITEMS, strict=True)
    ]
    assert verdicts == [(v["name"], e) for v, e in zip(VECTORS["vectors"], EXPECTED, strict=True)]


def test_one_batch_gives_the_same_verdicts(replay: ReplayStore) -> None:
    results = verifier(replay).verify_batch(ITEMS)
    assert [r.verdict for r in results] == EXPECTED
    assert results == verifier(MemoryReplayStore()).verify_batch(ITEMS)


def test_a_second_pass_finds_every_valid_piece_again(replay: ReplayStore) -> None:
    check = verifier(replay)
    check.verify_batch(ITEMS)
    again = [r.verdict for r in check.verify_batch(ITEMS)]
    assert again == [Verdict.DUPLICATE if e is Verdict.VALID else e for e in EXPECTED]
    assert Verdict.VALID not in again
