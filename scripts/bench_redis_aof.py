"""What durable Redis costs the replay store: check_and_set with AOF fsynced before each reply.

The run starts its own redis-servers on loopback, each in a temporary folder on the
disk that holds the system's temporary files (stopped and deleted afterwards):

- ``--appendonly no``: the raw rate, what the store did before (a restart forgets all);
- ``--appendonly yes --appendfsync always``: what scripts/redis-services runs, and what
  the post office should (a piece answered new is on disk before the answer);
- ``--appendfsync everysec``: up to about a second of answered pieces lost to a power cut;
- ``always`` with one replica (also ``always``) and a store with ``replicas=1`` (WAIT after
  each master's share of a batch).

The same batches of scripts/bench_replay.py's Office (65,536 fresh pieces from 2,000
meters drawn by volume) go to every server in turn, batch by batch, so a busy neighbour
slows all of them alike; building a batch is outside the timing. Beside them, the raw
rate of fdatasync'ed 4 KiB appends in the same folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from bench_replay import BATCH, METERS, Office

from meter.postoffice import RedisReplayStore

NO_AOF = ("--appendonly", "no")
ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
EVERYSEC = ("--appendonly", "yes", "--appendfsync", "everysec")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _redis_server(folder: Path, *args: str) -> Iterator[str]:
    """A redis-server on a free loopback port with its data in folder; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/bootstrap installs it)")
    folder.mkdir()
    port = _free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder)]
    command += ["--save", "", "--repl-diskless-sync-delay", "0", *args]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _ping(url), f"redis-server on {port}")
        yield url
    finally:
        server.kill()
        server.wait()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(redis.RedisError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.02)


def _ping(url: str) -> bool:
    with redis.Redis.from_url(url) as client:
        return bool(client.ping())


def _in_sync(url: str) -> bool:
    with redis.Redis.from_url(url) as client:
        replication = client.info("replication")
    return any(
        isinstance(value, dict) and value.get("state") == "online"
        for name, value in replication.items()
        if name.startswith("slave")
    )


def bench_replay_redis_aof(seconds: float, meters: int = METERS) -> dict[str, Any]:
    """Pieces per second through check_and_set on each server, seconds of batches each."""
    with (
        tempfile.TemporaryDirectory(prefix="meter-bench-aof-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        off = stack.enter_context(_redis_server(root / "off", *NO_AOF))
        always = stack.enter_context(_redis_server(root / "always", *ALWAYS))
        everysec = stack.enter_context(_redis_server(root / "everysec", *EVERYSEC))
        master = stack.enter_context(_redis_server(root / "master", *ALWAYS))
        port = master.rsplit(":", 1)[1]
        stack.enter_context(
            _redis_server(root / "replica", *ALWAYS, "--replicaof", "127.0.0.1", port)
        )
        _wait_for(lambda: _in_sync(master), "the replica")
        stores = {
            "aof_off": RedisReplayStore.from_url(off, timeout=30),
            "always": RedisReplayStore.from_url(always, timeout=30),
            "everysec": RedisReplayStore.from_url(everysec, timeout=30),
            "always_replicas_1": RedisReplayStore.from_url(master, timeout=30, replicas=1),
        }
        for store in stores.values():
            stack.enter_context(store)
        office = Office(meters)
        spent = dict.fromkeys(stores, 0.0)
        done = 0
        while min(spent.values()) < seconds:
            pieces = office.batch()
            for name, store in stores.items():
                started = time.perf_counter()
                seen = store.check_and_set(pieces)
                spent[name] += time.perf_counter() - started
                if any(seen):
                    raise AssertionError(f"{name}: a fresh piece was reported seen")
            done += len(pieces)
        fsyncs = _fsync_rate(root)
    rates = {name: done / spent[name] for name in stores}
    return {
        "check_and_set_per_s": round(rates["always"], 1),
        "appendfsync": "always",
        "aof_off_per_s": round(rates["aof_off"], 1),
        "ratio_to_aof_off": round(rates["always"] / rates["aof_off"], 3),
        "everysec_per_s": round(rates["everysec"], 1),
        "always_replicas_1_per_s": round(rates["always_replicas_1"], 1),
        "ratio_replicas_1_to_aof_off": round(rates["always_replicas_1"] / rates["aof_off"], 3),
        "batch": BATCH,
        "batches": done // BATCH,
        "meters": meters,
        "redis_version": _version(),
        "data_folder": tempfile.gettempdir(),
        "disk_fdatasyncs_per_s": round(fsyncs, 1),
    }


def _fsync_rate(folder: Path, seconds: float = 0.5) -> float:
    """Appends of 4 KiB per second, each followed by an fdatasync, in folder: what the disk
    under the AOF does alone."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        done, start, data = 0, time.perf_counter(), os.urandom(4096)
        while (elapsed := time.perf_counter() - start) < seconds or done == 0:
            os.write(fd, data)
            os.fdatasync(fd)
            done += 1
        return done / elapsed
    finally:
        os.close(fd)
        path.unlink()


def _version() -> str:
    binary = shutil.which("redis-server") or "redis-server"
    words = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()
    return next((w[2:] for w in words if w.startswith("v=")), "unknown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per server")
    parser.add_argument("--meters", type=int, default=METERS, help="home meters of the office")
    args = parser.parse_args()
    print(json.dumps(bench_replay_redis_aof(args.seconds, args.meters), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
