"""Real Redis for tests: the URLs of scripts/redis-services, unique key prefixes, cleanup."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

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
    kind: str, clock: Callable[[], datetime] | None = None
) -> Iterator[RedisReplayStore]:
    """A store under a prefix of its own; its keys are deleted afterwards."""
    url = URLS[kind]
    require_service(reachable(url), f"Redis at {url} (scripts/redis-services start)")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store = (
        RedisReplayStore.from_url(url, prefix=prefix)
        if clock is None
        else RedisReplayStore.from_url(url, prefix=prefix, clock=clock)
    )
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
