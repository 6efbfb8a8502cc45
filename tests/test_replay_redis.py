"""The Redis replay store against a real redis-server and a real 3-master Redis Cluster."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import _redis
import _vectors
import pytest
import redis
from conftest import require_service
from redis.cluster import RedisCluster, key_slot

from meter.errors import InvalidInput, ReplayStoreError
from meter.postoffice import Piece, RedisReplayStore, Verdict, Verifier, open_replay_store

pytestmark = pytest.mark.redis

DAY = date(2026, 11, 22)
NOON = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def p(serial: int, sequence: int, mailed: date = DAY) -> Piece:
    return Piece(serial, sequence, mailed)


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[RedisReplayStore]:
    yield from _redis.open_store(request.param, clock=lambda: NOON)


def url_of(store: RedisReplayStore) -> str:
    return _redis.URLS["redis-cluster" if store.nodes > 1 else "redis"]


def test_the_url_decides_standalone_or_cluster(store: RedisReplayStore) -> None:
    opened = open_replay_store(url_of(store))
    try:
        assert isinstance(opened, RedisReplayStore)
        assert opened.nodes == store.nodes
        assert opened.expire(DAY) == 0
    finally:
        opened.close()
    assert store.nodes in (1, 3)
    assert (store.nodes == 3) == isinstance(store._client, RedisCluster)


def test_check_and_set(store: RedisReplayStore) -> None:
    assert store.check_and_set([]) == []
    assert store.check_and_set([p(1, 1), p(1, 2), p(2, 1), p(1, 1)]) == [False, False, False, True]
    assert store.check_and_set([p(2, 1), p(2, 2), p(2**64 - 1, 2**32 - 1)]) == [True, False, False]
    assert store.check_and_set([p(2**64 - 1, 2**32 - 1), p(0, 0)]) == [True, False]
    assert store.check_and_set([p(1, 2, DAY - timedelta(days=90)), p(1, 70_000)]) == [True, False]


def test_repeats_inside_one_batch_and_many_devices(store: RedisReplayStore) -> None:
    rng = random.Random(11)
    pieces = [p(rng.randrange(40), rng.randrange(200_000)) for _ in range(5000)]
    pieces += pieces[:100]
    accepted: set[tuple[int, int]] = set()
    expected = []
    for piece in pieces:
        expected.append((piece.device_serial, piece.sequence) in accepted)
        accepted.add((piece.device_serial, piece.sequence))
    assert store.check_and_set(pieces) == expected
    assert store.check_and_set(pieces[::-1]) == [True] * len(pieces)


@pytest.mark.parametrize(
    "bad",
    [(-1, 1, DAY), (1, 2**32, DAY), (1, 1.5, DAY), (2**64, 1, DAY), (1, 1, None), (1, 1)],
    ids=repr,
)
def test_bad_input_changes_nothing(store: RedisReplayStore, bad: Any) -> None:
    with pytest.raises(InvalidInput, match=r"piece 1 .*no piece of the batch was recorded"):
        store.check_and_set([p(5, 5), bad])
    prefix = store.key(5, 5).split(":")[0]
    assert not any(_redis.keys_by_node(url_of(store), f"{prefix}:*").values())
    assert store.check_and_set([p(5, 5)]) == [False]


def test_a_device_lives_in_one_slot_on_one_node(store: RedisReplayStore) -> None:
    serials = [983973031309, 444377552072, 1, 2**64 - 1, 7, 8, 9, 10]
    store.check_and_set([p(s, q) for s in serials for q in (1, 70_000, 2**31, 2**32 - 1)])
    prefix = store.key(0, 0).split(":")[0]
    found = _redis.keys_by_node(url_of(store), f"{prefix}:*")
    for serial in serials:
        keys = [store.key(serial, q) for q in (1, 70_000, 2**31, 2**32 - 1)]
        assert len(set(keys)) == 4
        assert len({key_slot(k.encode()) for k in keys}) == 1
        homes = [node for node, held in found.items() if set(keys) <= set(held)]
        assert len(homes) == 1, (serial, found)
        assert not any(set(keys) & set(held) for node, held in found.items() if node != homes[0])
    if store.nodes > 1:
        assert sum(1 for held in found.values() if held) > 1  # the devices spread over masters


def raw_client(store: RedisReplayStore) -> redis.Redis | RedisCluster:
    url = url_of(store)
    if store.nodes > 1:
        return RedisCluster.from_url(url, socket_timeout=2)
    return redis.Redis.from_url(url, socket_timeout=2)


def test_keys_carry_a_lifetime_that_only_grows(store: RedisReplayStore) -> None:
    client = raw_client(store)
    try:
        store.check_and_set([p(3, 1, DAY - timedelta(days=10))])
        key = store.key(3, 1)
        # The start of the day 185 days after the date of mailing, measured from NOON.
        expected = (datetime(2027, 5, 16, tzinfo=UTC) - NOON).total_seconds()
        assert abs(client.ttl(key) - expected) <= 5
        store.check_and_set([p(3, 2, DAY)])
        assert abs(client.ttl(key) - (expected + 10 * 86400)) <= 5
        store.check_and_set([p(3, 3, DAY - timedelta(days=100))])  # never shortened
        assert abs(client.ttl(key) - (expected + 10 * 86400)) <= 5
    finally:
        client.close()


def test_pieces_that_can_no_longer_verify_are_forgotten(store: RedisReplayStore) -> None:
    client = raw_client(store)
    try:
        old = DAY - timedelta(days=185)  # its key's lifetime ended at midnight
        assert store.check_and_set([p(4, 1, old), p(4, 1, old)]) == [False, True]
        assert client.exists(store.key(4, 1)) == 0
        assert store.check_and_set([p(4, 1, old)]) == [False]
        last = DAY - timedelta(days=183)  # still verifiable today: kept
        assert store.check_and_set([p(4, 70_000, last)]) == [False]
        assert client.ttl(store.key(4, 70_000)) > 86400
        assert store.check_and_set([p(4, 70_000, last)]) == [True]
    finally:
        client.close()


def test_a_server_that_lost_its_scripts(store: RedisReplayStore) -> None:
    store.check_and_set([p(6, 1)])
    client = raw_client(store)
    try:
        client.script_flush()  # on a cluster: on every master
    finally:
        client.close()
    assert store.check_and_set([p(6, 1), p(6, 2), p(6, 2)]) == [True, False, True]


# -- unreachable ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, which the test may stop."""
    binary = shutil.which("redis-server")
    require_service(binary is not None, "redis-server")
    assert binary is not None
    port = free_port()
    server = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _redis.reachable(url):
            break
        server.poll()
        assert server.returncode is None
        time.sleep(0.05)
    try:
        yield url, server
    finally:
        server.terminate()
        server.wait()


def test_an_unreachable_server_is_an_error_never_valid(
    own_server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, server = own_server
    vectors = _vectors.load()
    today = _vectors.verification_date(vectors)
    valid = [
        bytes.fromhex(v["indicium_hex"]) for v in vectors["vectors"] if v["verdict"] == "VALID"
    ]
    store = RedisReplayStore.from_url(url, timeout=0.5)
    verifier = Verifier(_vectors.trust_store(vectors), _vectors.revocations(vectors), store, today)
    assert verifier.verify(valid[0]).verdict is Verdict.VALID
    server.terminate()
    server.wait()
    with pytest.raises(ReplayStoreError, match=r"redis://127\.0\.0\.1:\d+/0: Redis failed"):
        store.check_and_set([p(1, 1)])
    results = verifier.verify_batch(valid)
    assert [r.verdict for r in results] == [Verdict.ERROR] * len(valid)
    assert all("replay store failed" in r.reason for r in results)
    store.close()


def test_opening_an_unreachable_server_fails_without_leaking_the_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(ReplayStoreError, match="Redis failed") as caught:
        RedisReplayStore.from_url(url, timeout=0.5)
    assert "s3cret" not in str(caught.value)
    assert "redis://127.0.0.1:" in str(caught.value)
