"""What the Redis replay store answered new survives: SIGKILL with AOF, failover to a replica.

Every test starts redis-server processes of its own (killed at the end whatever happened),
so it may kill, pause and restart them.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from datetime import date
from functools import partial
from pathlib import Path

import _redis
import pytest
from _redis import DURABLE, OwnRedis, OwnServers
from redis.cluster import RedisCluster

from meter.errors import InvalidInput, ReplayStoreError
from meter.postoffice import Piece, RedisReplayStore

pytestmark = pytest.mark.redis

DAY = date(2026, 11, 22)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[OwnServers]:
    own = OwnServers(tmp_path)
    try:
        yield own
    finally:
        own.close()


def batch(seed: int, size: int, devices: int, first_serial: int | None = None) -> list[Piece]:
    """Distinct pieces over many devices, each device's sequences in one or two keys, in a
    shuffled order; batches of different seeds share no device unless told."""
    rng = random.Random(seed)
    if first_serial is None:
        first_serial = 10**9 + seed * 10**6
    start = rng.randrange(50_000)
    pieces = [Piece(first_serial + n % devices, start + n // devices * 3, DAY) for n in range(size)]
    rng.shuffle(pieces)
    return pieces


def test_aof_always_keeps_every_piece_answered_new_across_sigkill(servers: OwnServers) -> None:
    server = servers.start(*DURABLE)
    pieces = batch(1, 3000, 50)
    with RedisReplayStore.from_url(server.url) as store:
        assert store.check_and_set(pieces) == [False] * len(pieces)
        assert store.durability()["appendfsync"] == "always"
    server.signal(signal.SIGKILL)  # no shutdown, no save: only what the AOF has
    server.start()
    with RedisReplayStore.from_url(server.url) as store:
        assert store.seen(pieces) == [True] * len(pieces)
        assert store.check_and_set(pieces) == [True] * len(pieces)  # DUPLICATE


def test_a_promoted_replica_has_every_piece_of_an_acknowledged_batch(
    servers: OwnServers,
) -> None:
    master = servers.start(*DURABLE)
    replica = servers.replica_of(master)
    pieces = batch(2, 5000, 200)
    with RedisReplayStore.from_url(master.url, replicas=1) as store:
        assert store.durability() == {
            "appendonly": "yes",
            "appendfsync": "always",
            "maxmemory_policy": "noeviction",
            "replicas_wanted": 1,
            "replicas_connected": 1,
            "replica_timeout_ms": 1000,
            "masters": 1,
        }
        assert store.check_and_set(pieces) == [False] * len(pieces)
        # One WAIT for the batch, after its writes.
        assert master.call("INFO", "commandstats").get("cmdstat_wait", {}).get("calls") == 1
        master.signal(signal.SIGKILL)
    assert replica.call("REPLICAOF", "NO", "ONE") == b"OK"
    with RedisReplayStore.from_url(replica.url) as promoted:
        assert promoted.seen(pieces) == [True] * len(pieces)
        assert promoted.check_and_set(pieces) == [True] * len(pieces)


def test_a_missing_replica_is_an_error_never_new(servers: OwnServers) -> None:
    master = servers.start(*DURABLE)
    replica = servers.replica_of(master)
    first, second, third = batch(3, 300, 20), batch(4, 300, 20), batch(5, 300, 20)
    replica.signal(signal.SIGSTOP)  # connected as far as the master knows; answers nothing
    with RedisReplayStore.from_url(master.url, replicas=1, replica_timeout_ms=300) as store:
        started = time.monotonic()
        with pytest.raises(ReplayStoreError, match=r"only 0 of 1 replicas received .* 300 ms"):
            store.check_and_set(first)
        assert 0.25 <= time.monotonic() - started < 5  # WAIT waited, and no longer than that
    # WAIT longer than the socket timeout: the socket waits for it (the error is about the
    # replicas, not a timeout), and the batch is not sent again.
    slow = RedisReplayStore.from_url(master.url, timeout=0.4, replicas=1, replica_timeout_ms=900)
    master.call("CONFIG", "RESETSTAT")
    with slow, pytest.raises(ReplayStoreError, match=r"only 0 of 1 replicas"):
        slow.check_and_set(second)
    stats = master.call("INFO", "commandstats")
    keys = {slow.key(piece.device_serial, piece.sequence) for piece in second}
    assert stats["cmdstat_evalsha"]["calls"] == len(keys) == 20  # one script call per key
    assert stats["cmdstat_wait"]["calls"] == 1
    with RedisReplayStore.from_url(master.url, replicas=2, replica_timeout_ms=500) as store:
        replica.signal(signal.SIGCONT)
        _redis.wait_until(lambda: _redis.caught_up(master), "the replica caught up")
        with pytest.raises(ReplayStoreError, match=r"only 1 of 2 replicas"):
            store.check_and_set(third)
    # The pieces of the refused batches reached the master: they now come back DUPLICATE.
    with RedisReplayStore.from_url(master.url, replicas=1) as store:
        assert store.seen(first + second + third) == [True] * 900
        assert store.check_and_set(batch(6, 10, 5)) == [False] * 10  # in sync again: accepted


def test_no_replicas_wanted_sends_no_wait(servers: OwnServers) -> None:
    server = servers.start(*DURABLE)
    with RedisReplayStore.from_url(server.url) as store:
        assert store.check_and_set(batch(7, 100, 10)) == [False] * 100
        assert store.durability()["replicas_connected"] == 0
    assert "cmdstat_wait" not in server.call("INFO", "commandstats")


def test_a_kill_in_the_middle_of_a_batch_never_forgets_a_piece_answered_new(
    servers: OwnServers,
) -> None:
    server = servers.start(*DURABLE)
    devices, outcomes = 3000, []
    # SIGKILL once the server has run this many of the batch's script calls (one per key,
    # about one per device): after the first, about half way, near the end.
    for run, calls in enumerate((1, devices // 2, devices - 100)):
        pieces = batch(100 + run, 200_000, devices, first_serial=10**6 * (run + 1))
        server.call("CONFIG", "RESETSTAT")
        thread, answered = verify_in_thread(server.url, pieces)
        _redis.wait_until(partial(under_way, server, thread, calls), "the batch under way")
        server.signal(signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        server.start()  # from its AOF
        with RedisReplayStore.from_url(server.url, timeout=10) as store:
            recorded = store.seen(pieces)
        (outcome,) = answered
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, ReplayStoreError), outcome  # the batch is ERROR
            outcomes.append(f"ERROR with {sum(recorded)} pieces recorded")
        else:
            assert outcome == [False] * len(pieces)
            forgotten = [p for p, kept in zip(pieces, recorded, strict=True) if not kept]
            assert not forgotten, f"answered new, then forgotten: {forgotten[:5]}"
            outcomes.append("answered, all recorded")
    assert outcomes[0].startswith("ERROR"), outcomes  # killed mid-batch at least once


def verify_in_thread(
    url: str, pieces: list[Piece]
) -> tuple[threading.Thread, list[list[bool] | BaseException]]:
    """check_and_set in a thread of its own; its answer, or what it raised, in the list."""
    answered: list[list[bool] | BaseException] = []

    def verify() -> None:
        try:
            with RedisReplayStore.from_url(url, timeout=10) as store:
                answered.append(store.check_and_set(pieces))
        except BaseException as exc:  # the test looks at it
            answered.append(exc)

    thread = threading.Thread(target=verify)
    thread.start()
    return thread, answered


def under_way(server: OwnRedis, thread: threading.Thread, calls: int) -> bool:
    """The server has run this many script calls since its statistics were reset (or the
    batch is over)."""
    stats = server.call("INFO", "commandstats").get("cmdstat_evalsha", {})
    return not thread.is_alive() or int(stats.get("calls", 0)) >= calls


def test_seen_records_nothing(servers: OwnServers) -> None:
    server = servers.start(*DURABLE)
    pieces = batch(9, 500, 30)
    with RedisReplayStore.from_url(server.url) as store:
        assert store.seen(pieces) == [False] * 500
        assert store.seen(pieces) == [False] * 500
        assert server.call("DBSIZE") == 0
        assert store.check_and_set(pieces[:200]) == [False] * 200
        assert store.seen(pieces) == [True] * 200 + [False] * 300
        assert store.seen(pieces[:1] * 3) == [True] * 3
        assert store.check_and_set(pieces) == [True] * 200 + [False] * 300
        keys = server.call("DBSIZE")
        for bad in [(-1, 1, DAY), (1, 2**32, DAY), (1, 1, "2026-11-22"), "piece"]:
            with pytest.raises(InvalidInput, match=r"piece 1 .*no piece of the batch") as seen:
                store.seen([pieces[0], bad])  # type: ignore[list-item]
            with pytest.raises(InvalidInput) as set_:
                store.check_and_set([pieces[0], bad])  # type: ignore[list-item]
            assert str(seen.value) == str(set_.value)
        assert server.call("DBSIZE") == keys


def test_durability_where_config_is_refused(servers: OwnServers) -> None:
    server = servers.start(*DURABLE, "--rename-command", "CONFIG", "")
    with RedisReplayStore.from_url(server.url, replicas=0) as store:
        assert store.durability() == {
            "appendonly": "yes",  # INFO says so
            "appendfsync": "unknown",
            "maxmemory_policy": "unknown",
            "replicas_wanted": 0,
            "replicas_connected": 0,
            "replica_timeout_ms": 1000,
            "masters": 1,
        }


def test_durability_names_what_can_forget_pieces(servers: OwnServers) -> None:
    """No AOF, or an eviction policy that may drop keys with a lifetime (all of ours)."""
    server = servers.start("--appendonly", "no", "--maxmemory-policy", "volatile-lru")
    with RedisReplayStore.from_url(server.url) as store:
        report = store.durability()
        assert (report["appendonly"], report["maxmemory_policy"]) == ("no", "volatile-lru")
        server.call("CONFIG", "SET", "appendonly", "yes")
        server.call("CONFIG", "SET", "appendfsync", "everysec")
        assert (store.durability()["appendonly"], store.durability()["appendfsync"]) == (
            "yes",
            "everysec",
        )


def test_a_cluster_failover_keeps_an_acknowledged_batch(servers: OwnServers) -> None:
    nodes = servers.cluster(masters=3, replicas=1, node_timeout_ms=1000)
    by_name = {node.name: node for node in nodes}
    pieces = batch(10, 6000, 300)
    store = RedisReplayStore.from_url(nodes[0].url, replicas=1)
    try:
        assert store.nodes == 3
        assert store.durability()["replicas_connected"] == 1
        assert store.check_and_set(pieces) == [False] * len(pieces)
        masters = [n for n in nodes if _redis.role(n) == "master"]
        waits = [m.call("INFO", "commandstats").get("cmdstat_wait", {}) for m in masters]
        assert [w.get("calls") for w in waits] == [1, 1, 1]  # one per master, each got writes
        victim = by_name[home_of(nodes[0], store.key(pieces[0].device_serial, 0))]
        victim.signal(signal.SIGKILL)
        survivor = next(n for n in masters if n is not victim)
        _redis.wait_until(
            lambda: (
                _redis.cluster_ok(survivor)
                and len(now := live_masters(survivor)) == 3
                and victim.name not in now
            ),
            "the cluster failed over",
        )
        with RedisReplayStore.from_url(survivor.url) as fresh:
            assert fresh.seen(pieces) == [True] * len(pieces)
            assert fresh.check_and_set(pieces) == [True] * len(pieces)
        # Back, the old master is a replica of the new one; the store opened before the
        # failover is sent on (MOVED) to the new master, which has its replica again.
        victim.start()
        _redis.wait_until(
            lambda: (
                _redis.role(victim) == "slave"
                and all(_redis.online_replicas(by_name[m]) == 1 for m in live_masters(survivor))
            ),
            "the old master in sync as a replica",
        )
        fresh_pieces = batch(11, 600, 100, first_serial=10**8)
        assert store.check_and_set(fresh_pieces) == [False] * 600
        assert store.seen(fresh_pieces) == [True] * 600
    finally:
        store.close()


def home_of(node: OwnRedis, key: str) -> str:
    client = RedisCluster.from_url(node.url)
    try:
        return str(client.get_node_from_key(key).name)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def live_masters(node: OwnRedis) -> list[str]:
    masters = []
    for line in node.call("CLUSTER", "NODES").decode().splitlines():
        address, flags = line.split()[1:3]
        if "master" in flags.split(",") and "fail" not in flags:
            masters.append(address.split("@")[0])
    return masters
