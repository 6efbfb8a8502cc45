"""Replay-store benchmarks at the technical note's load: 1.3e8 live stamps in one regional office.

The load. An office's home meters (2,000 by default, the note's figure) with heavy-tailed volumes
(Pareto, alpha 1.16: a few big mailers, many small ones) that add up to 1.3e8
pieces mailed over the last 184 days. Each meter's sequences are one run from
where its counter stood six months ago, with holes where pieces did not reach
this office: 5% of the pieces went out in jobs (40 pieces on average) mailed
elsewhere, 0.2% were spoiled one by one. Every chunk of 65,536 sequences gets
the date of mailing of its last piece.

The embedded figure writes that state as the store's snapshot (the same bytes a
compaction writes), reopens it, then times check_and_set on batches of fresh
pieces continuing the meters' counters (meters drawn by volume), journal
write and fdatasync included; building each batch is outside the timing.
Redis figures time the same kind of batches from an empty prefix, which is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import redis
from pyroaring import BitMap

from meter.errors import ReplayStoreError
from meter.postoffice import EmbeddedReplayStore, Piece, RedisReplayStore
from meter.postoffice import replay as replay_module
from meter.postoffice import replay_format as fmt

LIVE_STAMPS = 130_000_000
METERS = 2_000  # the note: "two thousand public keys per regional office"
WINDOW_DAYS = 184
BATCH = 65_536
TODAY = date(2026, 11, 22)
FIRST_SERIAL = 100_000_000_000


class Office:
    """The home meters of one office: volumes, and where each meter's counter stands."""

    def __init__(self, meters: int = METERS, live: int = LIVE_STAMPS, seed: int = 1992) -> None:
        self.rng = random.Random(seed)
        weights = [self.rng.paretovariate(1.16) for _ in range(meters)]
        scale = live / sum(weights) / (1 - 0.05 - 0.002)  # what reaches the office: 1.3e8
        self.serials = [FIRST_SERIAL + 7919 * n for n in range(meters)]
        self.volumes = [max(1, round(w * scale)) for w in weights]
        self.starts = [self.rng.randrange(1, 2**31 - 2 * v) for v in self.volumes]
        self.next = {
            s: st + v for s, st, v in zip(self.serials, self.starts, self.volumes, strict=True)
        }

    def state(self) -> tuple[dict[int, fmt.DeviceState], int]:
        """Every meter's bitmap and chunk dates as the store keeps them; and the stamp count."""
        devices: dict[int, fmt.DeviceState] = {}
        rng, total = self.rng, 0
        first_day = TODAY.toordinal() - WINDOW_DAYS + 1
        for serial, start, volume in zip(self.serials, self.starts, self.volumes, strict=True):
            end = start + volume
            bitmap = BitMap()
            bitmap.add_range(start, end)
            elsewhere = volume * 0.05 / 40
            for _ in range(_poisson(rng, elsewhere)):
                hole = rng.randrange(start, end)
                bitmap.remove_range(hole, min(end, hole + 1 + int(rng.expovariate(1 / 39))))
            for _ in range(_poisson(rng, volume * 0.002)):
                bitmap.discard(rng.randrange(start, end))
            bitmap.run_optimize()
            latest: dict[int, int] = {}
            for chunk in range(start >> fmt.CHUNK_BITS, ((end - 1) >> fmt.CHUNK_BITS) + 1):
                last = min(end - 1, ((chunk + 1) << fmt.CHUNK_BITS) - 1)
                # Dates run evenly over the window along the meter's sequences.
                latest[chunk] = first_day + (last - start) * (WINDOW_DAYS - 1) // max(1, volume - 1)
            devices[serial] = fmt.DeviceState(bitmap, latest)
            total += len(bitmap)
        return devices, total

    def batch(self, size: int = BATCH) -> list[Piece]:
        """Fresh pieces: meters drawn by volume, each continuing its counter."""
        pieces = []
        nxt = self.next
        for serial in self.rng.choices(self.serials, self.volumes, k=size):
            sequence = nxt[serial]
            nxt[serial] = sequence + 1
            pieces.append(Piece(serial, sequence, TODAY))
        return pieces


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 50:
        return max(0, round(rng.gauss(mean, mean**0.5)))
    count, threshold, product = 0, 2.718281828459045**-mean, rng.random()
    while product > threshold:
        count += 1
        product *= rng.random()
    return count


def timed_rate(
    check_and_set: Callable[[list[Piece]], list[bool]], office: Office, seconds: float
) -> tuple[float, float]:
    """Pieces per second inside check_and_set, over batches built outside the timing: by the
    wall clock (fdatasync waits included), and by this process's CPU time (what one core
    does when the machine is shared)."""
    done, spent, cpu = 0, 0.0, 0.0
    while spent < seconds:
        pieces = office.batch()
        start, start_cpu = time.perf_counter(), time.process_time()
        seen = check_and_set(pieces)
        spent += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if any(seen):
            raise AssertionError("a fresh piece was reported seen")
        done += len(pieces)
    return done / spent, done / cpu


def bench_replay_embedded(seconds: float, meters: int = METERS) -> dict[str, Any]:
    office = Office(meters)
    started = time.perf_counter()
    devices, live = office.state()
    build_s = time.perf_counter() - started
    bitmap_bytes = sum(len(d.bitmap.serialize()) for d in devices.values())
    runs_bytes_if_bitsets = live // 8
    with tempfile.TemporaryDirectory(prefix="meter-bench-replay-") as tmp:
        folder = Path(tmp) / "replay"
        folder.mkdir()
        snapshot = fmt.encode_snapshot(devices, 1)
        (folder / replay_module.SNAPSHOT_NAME).write_bytes(snapshot)
        (folder / replay_module.JOURNAL_NAME).write_bytes(fmt.journal_header(1))
        del devices
        rss_before = _rss_mb()
        started = time.perf_counter()
        store = EmbeddedReplayStore.open(folder)
        reopen_s = time.perf_counter() - started
        with store:
            assert len(store) == live
            rate, cpu_rate = timed_rate(store.check_and_set, office, seconds)
            rss_after = _rss_mb()
    return {
        "live_stamps": live,
        "meters": meters,
        "bytes": bitmap_bytes,
        "bits_per_stamp": round(8 * bitmap_bytes / live, 3),
        "bytes_as_one_bit_per_stamp": runs_bytes_if_bitsets,
        "snapshot_bytes": len(snapshot),
        "check_and_set_per_s": round(rate, 1),
        "check_and_set_per_cpu_s": round(cpu_rate, 1),
        "batch": BATCH,
        "durable": "journal write + fdatasync per batch",
        "reopen_s": round(reopen_s, 3),
        "build_s": round(build_s, 1),
        "max_rss_mb_before_open": rss_before,
        "max_rss_mb_after": rss_after,
    }


def _rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _bench_redis(seconds: float, url: str, meters: int = METERS) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        store = RedisReplayStore.from_url(url, prefix=prefix)
    except ReplayStoreError as exc:
        return {"skipped": str(exc)}
    office = Office(meters)
    try:
        rate, cpu_rate = timed_rate(store.check_and_set, office, seconds)
    finally:
        store.close()
        _delete(url, prefix)
    return {
        "check_and_set_per_s": round(rate, 1),
        "client_cpu_per_s": round(cpu_rate, 1),
        "nodes": store.nodes,
        "batch": BATCH,
        "meters": meters,
    }


def _delete(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        if client.info("cluster").get("cluster_enabled") != 1:
            for key in list(client.scan_iter(f"{prefix}:*", count=10_000)):
                client.unlink(key)
            return
    finally:
        client.close()
    from redis.cluster import RedisCluster

    cluster = RedisCluster.from_url(url)
    try:
        for node in cluster.get_primaries():  # type: ignore[no-untyped-call]
            for key in list(cluster.scan_iter(f"{prefix}:*", count=10_000, target_nodes=node)):
                cluster.unlink(key)
    finally:
        cluster.close()


def bench_replay_redis(seconds: float, url: str = "redis://127.0.0.1:6390/0") -> dict[str, Any]:
    return _bench_redis(seconds, url)


def bench_replay_redis_cluster(
    seconds: float, url: str = "redis://127.0.0.1:7000"
) -> dict[str, Any]:
    return _bench_redis(seconds, url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--redis", default="redis://127.0.0.1:6390/0")
    parser.add_argument("--cluster", default="redis://127.0.0.1:7000")
    parser.add_argument("--meters", type=int, default=METERS, help="home meters of the office")
    args = parser.parse_args()
    report = {
        "embedded": bench_replay_embedded(args.seconds, args.meters),
        "redis": _bench_redis(args.seconds, args.redis, args.meters),
        "redis_cluster": _bench_redis(args.seconds, args.cluster, args.meters),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
