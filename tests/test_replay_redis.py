"""The Redis replay store against a real redis-server and a real 3-master Redis Cluster."""

from __future__ import annotations

import random
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import _redis
import _vectors
import pytest
import redis
from conftest import require_service
from redis.cluster import RedisCluster
from redis.crc import key_slot

from meter.errors import InvalidInput, ReplayStoreError
from meter.indicium import decode
from meter.postoffice import Piece, RedisReplayStore, Verdict, Verifier, open_replay_store
from meter.postoffice.replay_redis import wait_command

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


# -- seen: looking records nothing -----------------------------------------------------------------


def test_seen_reads_and_records_nothing(store: RedisReplayStore) -> None:
    pieces = [p(8, 1), p(8, 70_000), p(9, 2**32 - 1), p(2**64 - 1, 0), p(8, 1)]
    assert store.seen([]) == []
    assert store.seen(pieces) == [False] * 5
    prefix = store.key(0, 0).split(":")[0]
    assert not any(_redis.keys_by_node(url_of(store), f"{prefix}:*").values())
    assert store.check_and_set(pieces[:2]) == [False, False]
    assert store.seen(pieces) == [True, True, False, False, True]
    assert store.check_and_set(pieces) == [True, True, False, False, True]
    assert store.seen(pieces[2:4]) == [True, True]


@pytest.mark.parametrize(
    "bad",
    [(-1, 1, DAY), (1, 2**32, DAY), (1, 1.5, DAY), (2**64, 1, DAY), (1, 1, None), (1, 1), "x"],
    ids=repr,
)
def test_seen_refuses_bad_input_as_check_and_set_does(store: RedisReplayStore, bad: Any) -> None:
    with pytest.raises(InvalidInput, match=r"piece 1 .*no piece of the batch was recorded") as seen:
        store.seen([p(5, 5), bad])
    with pytest.raises(InvalidInput) as recorded:
        store.check_and_set([p(5, 5), bad])
    assert str(seen.value) == str(recorded.value)
    prefix = store.key(5, 5).split(":")[0]
    assert not any(_redis.keys_by_node(url_of(store), f"{prefix}:*").values())


# -- replicas: WAIT after the writes, on their connection -----------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"replicas": -1},
        {"replicas": True},
        {"replicas": 1.0},
        {"replicas": "1"},
        {"replicas": 1, "replica_timeout_ms": 0},
        {"replicas": 1, "replica_timeout_ms": -5},
        {"replicas": 1, "replica_timeout_ms": 10**9},
        {"replicas": 1, "replica_timeout_ms": 0.5},
    ],
    ids=repr,
)
def test_bad_replica_options_are_refused_before_connecting(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match=r"replicas must be|replica_timeout_ms must be"):
        RedisReplayStore.from_url("redis://127.0.0.1:1/0", **options)


@pytest.mark.parametrize(
    ("version", "aof", "expected"),
    [
        ("7.0.15", True, ("WAIT", 2, 500)),
        ("6.2.14", True, ("WAIT", 2, 500)),
        ("7.2.0", False, ("WAIT", 2, 500)),  # WAITAOF 1 needs the master's AOF
        ("7.2.0", True, ("WAITAOF", 1, 2, 500)),
        ("7.2.4-rc1", True, ("WAITAOF", 1, 2, 500)),
        ("7.10.1", True, ("WAITAOF", 1, 2, 500)),
        ("8.0.0", True, ("WAITAOF", 1, 2, 500)),
        ("garbage", True, ("WAIT", 2, 500)),
    ],
)
def test_waitaof_where_the_server_has_it(
    version: str, aof: bool, expected: tuple[str | int, ...]
) -> None:
    assert wait_command(version, aof, 2, 500) == expected


@pytest.mark.parametrize("replicas", [0, 1])
def test_wait_follows_the_writes_on_their_connection_on_each_master_that_took_some(
    kind: str, replicas: int
) -> None:
    """The shared servers have no replicas: replicas=1 must fail, and say so, after one WAIT
    per master that took writes, sent on the connection that made them."""
    url = _redis.URLS[kind]
    require_service(_redis.reachable(url), f"Redis at {url} (scripts/redis-services start)")
    name = f"test-{uuid.uuid4().hex[:12]}"  # the prefix, and the store's connections' name
    opened = f"{url}{'&' if '?' in url else '?'}client_name={name}"
    store = RedisReplayStore.from_url(opened, prefix=name, replicas=replicas, replica_timeout_ms=50)
    homes = _redis.masters_of(url)
    try:
        pieces = pieces_on_some_masters(store, homes)
        with _redis.monitored(homes) as commands:
            if replicas:
                with pytest.raises(ReplayStoreError, match=r"only 0 of 1 replicas received"):
                    store.check_and_set(pieces)
            else:
                assert store.check_and_set(pieces) == [False] * len(pieces)
            ours = _redis.ports_named(homes, name)  # other tests may share these servers
    finally:
        store.close()
        _redis.delete_keys(url, f"{name}:*")
    wrote = 0
    for home, seen in commands.items():
        mine = [c["command"] for c in seen if c["client_port"] in ours[home]]
        writes = [n for n, command in enumerate(mine) if command.startswith("EVALSHA")]
        waits = [n for n, command in enumerate(mine) if command.startswith("WAIT")]
        if not writes:
            assert not waits, home  # a master without writes gets no WAIT
            continue
        wrote += 1
        assert len(ours[home]) == 1, ours  # one connection for the writes and the WAIT
        if replicas:
            assert waits == [len(mine) - 1]  # one, after the writes
            assert mine[-1] == "WAIT 1 50"
        else:
            assert not waits
    assert wrote == (1 if kind == "redis" else 2)


@pytest.fixture(params=["redis", "redis-cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pieces_on_some_masters(store: RedisReplayStore, homes: list[str]) -> list[Piece]:
    """Pieces of devices on the first two masters only (on one server: on it)."""
    serials = range(1, 200)
    found = _redis.homes_of(url_of(store), [store.key(serial, 0) for serial in serials])
    wanted = set(homes[:2])
    return [
        p(s, q) for s, home in zip(serials, found, strict=True) if home in wanted for q in (1, 2)
    ]


# -- redirections: a slot moving between masters -------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[_redis.OwnServers]:
    own = _redis.OwnServers(tmp_path)
    try:
        yield own
    finally:
        own.close()


def test_a_slot_moving_to_another_master_sends_its_calls_on(servers: _redis.OwnServers) -> None:
    nodes = servers.cluster(masters=3, replicas=0, node_timeout_ms=5000)
    by_name = {node.name: node for node in nodes}
    store = RedisReplayStore.from_url(nodes[0].url)  # its slot table: from before the move
    try:
        first, second = store.key(42, 1), store.key(42, 70_000)
        slot = key_slot(first.encode())
        source = by_name[_redis.homes_of(nodes[0].url, [first])[0]]
        target = next(node for node in nodes if node is not source)
        source_id, target_id = (n.call("CLUSTER", "MYID").decode() for n in (source, target))
        assert store.check_and_set([p(42, 1)]) == [False]
        # Half way: the key with a piece has moved, the other does not exist yet; the source
        # answers ASK for both and the store asks the target.
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        assert source.call("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", first)
        assert store.check_and_set([p(42, 1), p(42, 70_000), p(42, 2)]) == [True, False, False]
        assert store.seen([p(42, 1), p(42, 70_000), p(42, 2), p(42, 3)]) == [True] * 3 + [False]
        with target.client() as client:  # the target serves the slot only when asked
            asked = client.pipeline(transaction=False)
            asked.execute_command("ASKING")
            asked.execute_command("EXISTS", first, second)
            assert asked.execute()[1] == 2
        assert source.call("DBSIZE") == 0
        # Moved for good: the source answers MOVED, the store learns the new slot table.
        for node in [target, source, *(n for n in nodes if n not in (source, target))]:
            node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        assert store.check_and_set([p(42, 1), p(42, 70_000), p(42, 3)]) == [True, True, False]
        assert store.seen([p(42, 3)]) == [True]
        assert _redis.homes_of(nodes[0].url, [first]) == [target.name]
    finally:
        store.close()


# -- unreachable ----------------------------------------------------------------------------------


def verifier_on(store: RedisReplayStore) -> tuple[Verifier, list[bytes]]:
    """A verifier over the test vectors' trust, on this store; and the VALID indicia."""
    vectors = _vectors.load()
    today = _vectors.verification_date(vectors)
    valid = [
        bytes.fromhex(v["indicium_hex"]) for v in vectors["vectors"] if v["verdict"] == "VALID"
    ]
    trust, revocations = _vectors.trust_store(vectors), _vectors.revocations(vectors)
    return Verifier(trust, revocations, store, today), valid


def test_an_unreachable_server_is_an_error_never_valid(servers: _redis.OwnServers) -> None:
    server = servers.start()
    store = RedisReplayStore.from_url(f"{server.url}/0", timeout=0.5)
    verifier, valid = verifier_on(store)
    assert verifier.verify(valid[0]).verdict is Verdict.VALID
    server.signal(signal.SIGTERM)
    with pytest.raises(ReplayStoreError, match=r"redis://127\.0\.0\.1:\d+/0: Redis failed"):
        store.check_and_set([p(1, 1)])
    results = verifier.verify_batch(valid)
    assert [r.verdict for r in results] == [Verdict.ERROR] * len(valid)
    assert all("replay store failed" in r.reason for r in results)
    store.close()


def test_replicas_that_do_not_acknowledge_make_an_error_never_valid(
    servers: _redis.OwnServers,
) -> None:
    server = servers.start()  # no replica at all
    with RedisReplayStore.from_url(server.url, replicas=1, replica_timeout_ms=50) as store:
        verifier, valid = verifier_on(store)
        results = verifier.verify_batch(valid)
        assert [r.verdict for r in results] == [Verdict.ERROR] * len(valid)
        assert all("only 0 of 1 replicas received" in r.reason for r in results)
        # Written all the same: verified again they are DUPLICATE, the safe direction.
        assert store.seen(store_pieces(valid)) == [True] * len(valid)


def store_pieces(indicia: list[bytes]) -> list[Piece]:
    decoded = [decode(data) for data in indicia]
    return [Piece(i.device_serial, i.sequence, i.date_of_mailing) for i in decoded]


def test_opening_an_unreachable_server_fails_without_leaking_the_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{_redis.free_port()}/0"
    with pytest.raises(ReplayStoreError, match="Redis failed") as caught:
        RedisReplayStore.from_url(url, timeout=0.5)
    assert "s3cret" not in str(caught.value)
    assert "redis://127.0.0.1:" in str(caught.value)
