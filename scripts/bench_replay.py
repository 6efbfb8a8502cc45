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
The trays figure times the same store on a sorting centre's batches: 100,000
pieces in trays of about 200 consecutive sequences of one meter (meters drawn
by volume, a couple of hundred meters a batch), 3% of each tray's run missing.
Beside each embedded figure, the raw rate of the disk underneath: appends of a
journal record of the same size, an fdatasync each.
Redis figures time the same kind of batches from an empty prefix, which is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
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
TRAY_BATCH = 100_000  # a sorting centre's batch
TRAY = 200  # pieces of one meter that travel together, in sequence order
TRAY_HOLES = 0.03  # sequences of a tray's run that are not in the tray
TODAY = date(2026, 11, 22)
FIRST_SERIAL = 100_000_000_000


class Office:
    """The home meters of one office: volumes, and where each meter's counter stands."""

    def __init__(self, meters: int = METERS, live: int = LIVE_STAMPS, seed: int = 1992) -> None:
        self.rng = random.Random(seed)
        self.meters = meters
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

    def trays(
        self, size: int = TRAY_BATCH, tray: int = TRAY, holes: float = TRAY_HOLES
    ) -> list[Piece]:
        """Fresh pieces as a sorting centre sees them: trays of about ``tray`` consecutive
        sequences of one meter (meters drawn by volume, so the big mailers fill several
        trays of a batch), one tray after another, with ``holes`` of each run's
        sequences missing at random (pieces sorted elsewhere, or spoiled)."""
        rng, nxt = self.rng, self.next
        pieces: list[Piece] = []
        while len(pieces) < size:
            (serial,) = rng.choices(self.serials, self.volumes)
            wanted = min(size - len(pieces), rng.randint(tray * 3 // 4, tray * 5 // 4))
            sequence, end = nxt[serial], len(pieces) + wanted
            while len(pieces) < end:
                if rng.random() >= holes:
                    pieces.append(Piece(serial, sequence, TODAY))
                sequence += 1
            nxt[serial] = sequence
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
    check_and_set: Callable[[list[Piece]], list[bool]],
    office: Office,
    seconds: float,
    make_batch: Callable[[], list[Piece]] | None = None,
) -> tuple[float, float]:
    """Pieces per second inside check_and_set, over batches built outside the timing
    (``office.batch`` unless told): by the wall clock (fdatasync waits included), and by
    this process's CPU time (what one core does when the machine is shared)."""
    next_batch = make_batch or office.batch
    done, spent, cpu = 0, 0.0, 0.0
    while spent < seconds:
        pieces = next_batch()
        start, start_cpu = time.perf_counter(), time.process_time()
        seen = check_and_set(pieces)
        spent += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if any(seen):
            raise AssertionError("a fresh piece was reported seen")
        done += len(pieces)
    return done / spent, done / cpu


def bench_replay_embedded(seconds: float, meters: int = METERS) -> dict[str, Any]:
    """Pieces one by one from meters drawn by volume, batches of 65,536."""
    office = Office(meters)
    return _bench_embedded(seconds, office, office.batch) | {"batch": BATCH}


def bench_replay_embedded_trays(seconds: float, meters: int = METERS) -> dict[str, Any]:
    """A sorting centre's mix: batches of 100,000 pieces in trays of about 200 consecutive
    sequences of one meter (meters drawn by volume), 3% of each tray's run missing."""
    office = Office(meters)
    return _bench_embedded(seconds, office, office.trays) | {
        "batch": TRAY_BATCH,
        "tray": TRAY,
        "tray_holes": TRAY_HOLES,
        "target_check_and_set_per_s": 1e6,
    }


def _bench_embedded(
    seconds: float, office: Office, make_batch: Callable[[], list[Piece]]
) -> dict[str, Any]:
    """The office's state as a snapshot, reopened; check_and_set timed on make_batch's batches.

    ``bytes`` is the bitmaps' portable serialization at the live load (what the store holds
    in memory, give or take the containers' slack); ``snapshot_bytes`` the file on disk. The
    raw rate beside the figure is the file system's: appends of the journal's average record
    with an fdatasync each, in the same folder, which bounds batches per second."""
    started = time.perf_counter()
    devices, live = office.state()
    build_s = time.perf_counter() - started
    bitmap_bytes = sum(len(d.bitmap.serialize()) for d in devices.values())
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
            batches: list[int] = []
            meters_per_batch: list[int] = []

            def counted() -> list[Piece]:
                pieces = make_batch()
                batches.append(len(pieces))
                meters_per_batch.append(len({piece.device_serial for piece in pieces}))
                return pieces

            rate, cpu_rate = timed_rate(store.check_and_set, office, seconds, counted)
            rss_after = _rss_mb()
            per_batch = sum(batches) / len(batches)
            meters_seen = sum(meters_per_batch) / len(meters_per_batch)
            # A batch of fresh pieces: a record header, then 12 bytes a meter and 4 a piece.
            record = round(fmt.BATCH_HEADER_SIZE + 4 + 12 * meters_seen + 4 * per_batch)
            appends = raw_append_rate(Path(tmp) / "raw.bin", record, min(seconds, 2.0))
            store.compact()
            snapshot_after = (folder / replay_module.SNAPSHOT_NAME).stat().st_size
            live_after = len(store)
    return {
        "live_stamps": live,
        "meters": office.meters,
        "bytes": bitmap_bytes,
        "bytes_are": "bitmaps' portable serialization at the live load (~ memory)",
        "bits_per_stamp": round(8 * bitmap_bytes / live, 3),
        "bytes_as_one_bit_per_stamp": live // 8,
        "snapshot_bytes": len(snapshot),
        "snapshot_bytes_after_run": snapshot_after,
        "live_stamps_after_run": live_after,
        "check_and_set_per_s": round(rate, 1),
        "check_and_set_per_cpu_s": round(cpu_rate, 1),
        "raw_journal_appends_per_s": round(appends, 1),
        "raw_ceiling_pieces_per_s": round(appends * per_batch, 1),
        "ratio_to_raw_ceiling": round(rate / (appends * per_batch), 3),
        "batches_timed": len(batches),
        "meters_per_batch": round(meters_seen, 1),
        "journal_record_bytes": record,
        "durable": "journal write + fdatasync per batch",
        "reopen_s": round(reopen_s, 3),
        "build_s": round(build_s, 1),
        "max_rss_mb_before_open": rss_before,
        "max_rss_mb_after": rss_after,
    }


def raw_append_rate(path: Path, record: int, seconds: float) -> float:
    """Appends per second of ``record`` bytes, each followed by an fdatasync: the disk's part
    of one batch, without the store."""
    data = os.urandom(record)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done, offset, start = 0, 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or done == 0:
            os.pwrite(fd, data, offset)
            os.fdatasync(fd)
            offset += record
            done += 1
        return done / elapsed
    finally:
        os.close(fd)
        path.unlink()


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


RUNS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "embedded": lambda args: bench_replay_embedded(args.seconds, args.meters),
    "embedded_trays": lambda args: bench_replay_embedded_trays(args.seconds, args.meters),
    "redis": lambda args: _bench_redis(args.seconds, args.redis, args.meters),
    "redis_cluster": lambda args: _bench_redis(args.seconds, args.cluster, args.meters),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--redis", default="redis://127.0.0.1:6390/0")
    parser.add_argument("--cluster", default="redis://127.0.0.1:7000")
    parser.add_argument("--meters", type=int, default=METERS, help="home meters of the office")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(RUNS),
        help="run only this measurement (repeatable); all of them by default",
    )
    args = parser.parse_args()
    report = {name: RUNS[name](args) for name in RUNS if args.only is None or name in args.only}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
