"""Real Redis for tests: the URLs of scripts/redis-services, unique key prefixes, cleanup;
and redis-server processes of a test's own (OwnServers), which it may kill."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from conftest import require_service
from redis.cluster import RedisCluster

from meter.postoffice import RedisReplayStore

STANDALONE_URL = os.environ.get("METER_TEST_REDIS_URL", "redis://127.0.0.1:6390/0")
CLUSTER_URL = os.environ.get("METER_TEST_REDIS_CLUSTER_URL", "redis://127.0.0.1:7000")
URLS = {"redis": STANDALONE_URL, "redis-cluster": CLUSTER_URL}


def reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def open_store(
    kind: str, clock: Callable[[], datetime] | None = None, **options: Any
) -> Generator[RedisReplayStore]:
    """A store under a prefix of its own; its keys are deleted afterwards."""
    url = URLS[kind]
    require_service(reachable(url), f"Redis at {url} (scripts/redis-services start)")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    if clock is not None:
        options["clock"] = clock
    store = RedisReplayStore.from_url(url, prefix=prefix, **options)
    try:
        yield store
    finally:
        store.close()
        delete_keys(url, f"{prefix}:*")


def keys_by_node(url: str, pattern: str) -> dict[str, list[str]]:
    """Every key matching pattern, per master ("host:port"), decoded."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        cluster = client.info("cluster").get("cluster_enabled") == 1
        if not cluster:
            return {"single": sorted(k.decode() for k in client.scan_iter(pattern, count=1000))}
    finally:
        client.close()
    cluster_client = RedisCluster.from_url(url, socket_timeout=2)
    try:
        found = {}
        for node in cluster_client.get_primaries():  # type: ignore[no-untyped-call]
            keys = cluster_client.scan_iter(pattern, count=1000, target_nodes=node)
            found[node.name] = sorted(k.decode() for k in keys)
        return found
    finally:
        cluster_client.close()


def delete_keys(url: str, pattern: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        cluster = client.info("cluster").get("cluster_enabled") == 1
        if not cluster:
            for key in list(client.scan_iter(pattern, count=1000)):
                client.delete(key)
            return
    finally:
        client.close()
    cluster_client = RedisCluster.from_url(url, socket_timeout=2)
    try:
        for node in cluster_client.get_primaries():  # type: ignore[no-untyped-call]
            for key in list(cluster_client.scan_iter(pattern, count=1000, target_nodes=node)):
                cluster_client.delete(key)
    finally:
        cluster_client.close()


def masters_of(url: str) -> list[str]:
    """The masters ("host:port"): the server itself, or the cluster's."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        if client.info("cluster").get("cluster_enabled") != 1:
            kwargs = client.get_connection_kwargs()
            return [f"{kwargs['host']}:{kwargs['port']}"]
    finally:
        client.close()
    cluster = RedisCluster.from_url(url, socket_timeout=2)
    try:
        return sorted(node.name for node in cluster.get_primaries())  # type: ignore[no-untyped-call]
    finally:
        cluster.close()


def homes_of(url: str, keys: Sequence[str]) -> list[str]:
    """The master ("host:port") of each key."""
    masters = masters_of(url)
    if len(masters) == 1:
        return masters * len(keys)
    cluster = RedisCluster.from_url(url, socket_timeout=2)
    try:
        return [str(cluster.get_node_from_key(key).name) for key in keys]  # type: ignore[no-untyped-call]
    finally:
        cluster.close()


@contextlib.contextmanager
def monitored(masters: Sequence[str]) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Every command each master ran inside the block, as MONITOR reports it (with the
    client's port), filled in when the block ends."""
    token = f"monitor-end-{uuid.uuid4().hex}"
    commands: dict[str, list[dict[str, Any]]] = {name: [] for name in masters}
    monitors = []
    for name in masters:
        client = redis.Redis.from_url(f"redis://{name}", socket_timeout=10)
        monitor = client.monitor()  # type: ignore[no-untyped-call]
        monitor.__enter__()  # MONITOR answered: from here on every command is reported
        monitors.append((name, client, monitor))

    def listen(name: str, monitor: Any) -> None:
        while True:
            command = monitor.next_command()
            if command["command"] == f"ECHO {token}":
                return
            commands[name].append(command)

    threads = [threading.Thread(target=listen, args=(n, m)) for n, _, m in monitors]
    for thread in threads:
        thread.start()
    try:
        yield commands
    finally:
        for name, _, _ in monitors:
            other = redis.Redis.from_url(f"redis://{name}", socket_timeout=2)
            try:
                other.echo(token)
            finally:
                other.close()
        for thread in threads:
            thread.join(10)
        for _, client, monitor in monitors:
            monitor.__exit__()
            client.close()


def ports_named(masters: Sequence[str], name: str) -> dict[str, set[str]]:
    """Per master, the client ports of the connections named so (CLIENT SETNAME)."""
    found: dict[str, set[str]] = {}
    for master in masters:
        client = redis.Redis.from_url(f"redis://{master}", socket_timeout=2)
        try:
            listed = client.client_list()
        finally:
            client.close()
        found[master] = {c["addr"].rsplit(":", 1)[1] for c in listed if c.get("name") == name}
    return found


# -- redis-server processes of a test's own ------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
# What scripts/redis-services runs: AOF fsynced before each reply. A full sync to a new
# replica starts at once (Redis waits 5 s by default for more replicas to share it).
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--repl-diskless-sync-delay", "0")


def free_port(bus: bool = False) -> int:
    """A loopback port nobody listens on (and, with bus, port + 10000 too, for a cluster)."""
    for _ in range(200):
        port = random.randrange(20_000, 45_000)
        wanted = (port, port + 10_000) if bus else (port,)
        try:
            for each in wanted:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", each))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port")


class OwnRedis:
    """One redis-server process: started, killed, paused and started again on its folder."""

    def __init__(self, folder: Path, args: Sequence[str], bus: bool = False) -> None:
        assert REDIS_SERVER is not None
        self.folder = folder
        self.port = free_port(bus)
        self.args = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port)]
        self.args += ["--dir", str(folder), "--save", "", "--logfile", str(folder / "log")]
        self.args += args
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OwnRedis:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not reachable(self.url):  # PING answers LOADING until the AOF is read
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server {self.name} did not start: {self.log()}")
            time.sleep(0.02)
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def call(self, *args: str | int) -> Any:
        client = self.client()
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def close(self) -> None:
        """Gone, whatever state it is in (SIGKILL ends a stopped process too)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


class OwnServers:
    """The servers one test started, all ended when it finishes."""

    def __init__(self, folder: Path) -> None:
        require_service(REDIS_SERVER is not None and REDIS_CLI is not None, "redis-server")
        self.folder = folder
        self.servers: list[OwnRedis] = []

    def start(self, *args: str, bus: bool = False) -> OwnRedis:
        server = OwnRedis(self.folder / f"server-{len(self.servers)}", args, bus)
        self.servers.append(server)
        return server.start()

    def replica_of(self, master: OwnRedis, *args: str) -> OwnRedis:
        replica = self.start(*DURABLE, "--replicaof", "127.0.0.1", str(master.port), *args)
        wait_until(lambda: online_replicas(master) >= 1, f"{replica.name} in sync")
        return replica

    def cluster(self, masters: int, replicas: int, node_timeout_ms: int) -> list[OwnRedis]:
        """A Redis Cluster, every master with its replicas in sync."""
        config = ("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms))
        nodes = []
        for _ in range(masters * (1 + replicas)):
            nodes.append(self.start(*DURABLE, *config, bus=True))  # nodes.conf in its --dir
        assert REDIS_CLI is not None
        create = ["--cluster", "create", *(n.name for n in nodes), "--cluster-yes"]
        subprocess.run(
            [REDIS_CLI, *create, "--cluster-replicas", str(replicas)],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        wait_until(lambda: all(cluster_ok(n) for n in nodes), "cluster_state:ok")
        wait_until(
            lambda: all(online_replicas(n) >= replicas for n in nodes if role(n) == "master"),
            "every master's replicas in sync",
        )
        return nodes

    def close(self) -> None:
        for server in self.servers:
            server.close()


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # a node still starting, failing over, loading
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        time.sleep(0.05)


def role(server: OwnRedis) -> str:
    return str(server.call("ROLE")[0].decode())


def online_replicas(master: OwnRedis) -> int:
    client = master.client()
    try:
        replication = client.info("replication")
    finally:
        client.close()
    return sum(
        1
        for name, value in replication.items()
        if name.startswith("slave") and isinstance(value, dict) and value["state"] == "online"
    )


def caught_up(master: OwnRedis) -> bool:
    """Every replica online and acknowledged everything the master has written."""
    client = master.client()
    try:
        replication = client.info("replication")
    finally:
        client.close()
    replicas = [v for k, v in replication.items() if k.startswith("slave") and isinstance(v, dict)]
    end = replication["master_repl_offset"]
    return bool(replicas) and all(r["state"] == "online" and r["offset"] >= end for r in replicas)


def cluster_ok(node: OwnRedis) -> bool:
    return b"cluster_state:ok" in node.call("CLUSTER", "INFO")
