"""The post office's HTTP service under load, and under hostile images.

Both run the service in a process of its own (uvicorn with the exposed-server
protocol, embedded replay store, the spec's test certificates) on loopback,
and load it from this process with a bounded number of client threads, each
on its own kept-alive connection.

- ``postoffice_http``: cancels of fresh genuine pieces, one per request
  (each one fsync of the replay journal and one ledger commit), then the same
  pieces' checks, then cancel-batch of 100: requests per second and latency
  percentiles. Beside it, the raw rate of the same work without HTTP (the
  verifier with the same stores, in this process), measured in the same run.
- ``postoffice_hostile_images``: 40 uploads at once of images built to cost
  memory (a 12000 x 12000 PNG of 32 KB, a 13000 x 13000 RGBA PNG, and images
  just under the pixel cap in RGBA and grey), repeated for the measured time;
  the server's peak RSS (VmHWM) against the limit we state.
"""

from __future__ import annotations

import http.client
import io
import json
import json as _json
import multiprocessing
import statistics
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from PIL import Image

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "pim1-vectors-v1.json"
CLIENTS = 4
BATCH = 100
HOSTILE_IN_FLIGHT = 40
HOSTILE_LIMIT_MB = 1024


def _serve(settings: Any, port: int, ready: Any) -> None:
    """The child process: the service on 127.0.0.1:port."""
    import uvicorn

    from meter.postoffice.service import create_app
    from meter.postoffice.service_server import uvicorn_config

    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", port, settings.timeouts, log_level="warning")
    )
    threading.Thread(target=lambda: (_wait_started(server), ready.set()), daemon=True).start()
    server.run()


def _wait_started(server: Any) -> None:
    while not server.started:
        time.sleep(0.01)


class _Server:
    """The service in a child process; its pid for reading its memory."""

    def __init__(self, settings: Any) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        self.process = context.Process(target=_serve, args=(settings, self.port, ready))
        self.process.start()
        if not ready.wait(60):
            self.process.kill()
            raise RuntimeError("the post office service did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def memory_mb(self, field: str) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith(field + ":"))
        return round(int(line.split()[1]) / 1024, 1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def _settings(folder: Path, today: date, **changes: Any) -> Any:
    from meter.postoffice.service_config import ServiceConfig, Timeouts

    certs = folder / "certs"
    certs.mkdir(parents=True)
    vectors = json.loads(VECTORS.read_text())["certificates"]
    (certs / "postal-root.pem").write_text(vectors["postal_root"])
    (certs / "providers.pem").write_text("".join(vectors["providers"]))
    (certs / "meters.pem").write_text("".join(vectors["meters"]))
    return ServiceConfig(
        cert_dir=certs,
        store=folder / "replay",
        ledger=folder / "registers.sqlite",
        stations=folder / "stations.json",
        allowed_hosts=("127.0.0.1",),
        today=today,
        timeouts=Timeouts(max_connections=256),
        **changes,
    )


class _Answer:
    """What the load client keeps of a response."""

    def __init__(self, status: int) -> None:
        self.status_code = status


class _Client:
    """A kept-alive HTTP/1.1 connection through the standard library's http.client.

    httpx costs about 4 ms of client CPU a request here, against 0.8 ms for the
    server's whole answer: with it the benchmark would measure the client.
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(
        self,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        body = content if content is not None else _json.dumps(json).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        try:
            self._connection.request("POST", path, body=body, headers=sent)
            response = self._connection.getresponse()
            response.read()
        except (ConnectionError, http.client.HTTPException):
            self._connection.close()  # answered and closed (e.g. 503): reconnect next time
            return _Answer(0)
        if response.getheader("connection", "").lower() == "close":
            self._connection.close()
        return _Answer(response.status)

    def close(self) -> None:
        self._connection.close()


def _load(
    url: str, bodies: list[Any], clients: int, seconds: float, call: Callable[..., _Answer]
) -> dict[str, Any]:
    """Send bodies (each once, in order) from `clients` threads for at most `seconds`."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    position = [0]
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        client = _Client(url)
        try:
            while time.monotonic() < stop_at:
                with lock:
                    if position[0] >= len(bodies):
                        return
                    body = bodies[position[0]]
                    position[0] += 1
                started = time.perf_counter()
                response = call(client, body)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    statuses[response.status_code] += 1
        finally:
            client.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def bench_postoffice_http(seconds: float) -> dict[str, Any]:
    from bench import sample_indicia

    from meter.pki.revocation import Revocations
    from meter.postoffice import EmbeddedReplayStore, Verifier
    from meter.postoffice.ledger import RegisterLedger
    from meter.postoffice.stations import StationRegistry

    pieces, trust, issued = sample_indicia(max(4000, int(seconds * 3000)))
    today = (issued + timedelta(days=1)).date()
    with tempfile.TemporaryDirectory(prefix="meter-bench-po-") as tmp:
        folder = Path(tmp)
        # The raw rate: the same per-piece work (verify, journal fsync, ledger commit), no HTTP.
        raw_folder = folder / "raw"
        raw_folder.mkdir()
        with (
            EmbeddedReplayStore.open(raw_folder / "replay") as store,
            RegisterLedger.open(raw_folder / "ledger.sqlite") as ledger,
        ):
            verifier = Verifier(trust, Revocations.empty(), store, today)
            done, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds and done < len(pieces):
                ledger.record(verifier.verify_batch([pieces[done]]), station="raw")
                done += 1
            raw_rate = done / (time.perf_counter() - began)

        settings = _settings(folder / "service", today)
        key = StationRegistry(settings.stations_file).add("bench")
        auth = {"Authorization": f"Bearer {key}"}
        server = _Server(settings)
        try:
            hexes = [p.hex() for p in pieces]

            def cancel(client: _Client, body: str) -> _Answer:
                return client.post("/v1/cancel", json={"hex": body}, headers=auth)

            def check(client: _Client, body: str) -> _Answer:
                return client.post("/v1/check", json={"hex": body})

            def cancel_batch(client: _Client, body: list[str]) -> _Answer:
                return client.post("/v1/cancel-batch", json={"items": body}, headers=auth)

            single = _load(server.url, hexes, CLIENTS, seconds, cancel)
            used = single["requests"]
            looked = _load(server.url, hexes[:used], CLIENTS, seconds, check)
            rest = hexes[used:]
            batches = [rest[i : i + BATCH] for i in range(0, len(rest) - BATCH + 1, BATCH)]
            batched = _load(server.url, batches, CLIENTS, seconds, cancel_batch)
            batched["pieces_per_s"] = round(batched["per_s"] * BATCH, 1)
            batched["items"] = BATCH
        finally:
            server.stop()
    return {
        **single,
        "clients": CLIENTS,
        "raw_cancel_per_s": round(raw_rate, 1),
        "ratio_to_raw": round(single["per_s"] / raw_rate, 3),
        "check": looked,
        "batch": batched,
        "note": "one cancel per request: replay journal fsync and ledger commit each",
    }


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _declared_png(side: int, colour_type: int, depth: int, channels_bits: int) -> bytes:
    """A valid PNG of side x side pixels, all zero: megapixels in kilobytes."""
    row = b"\x00" + b"\x00" * ((side * channels_bits + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def hostile_images() -> dict[str, bytes]:
    just_under = 6300  # 39.7 Mpx, under the default cap of 40 Mpx
    grey = io.BytesIO()
    Image.new("L", (just_under, just_under), 255).save(grey, format="PNG", optimize=True)
    return {
        "1-bit 12000x12000": _declared_png(12_000, 0, 1, 1),
        "RGBA 13000x13000": _declared_png(13_000, 6, 8, 32),
        "RGBA 6300x6300 (under the cap)": _declared_png(just_under, 6, 8, 32),
        "grey 6300x6300 (under the cap)": grey.getvalue(),
    }


def bench_postoffice_hostile_images(seconds: float) -> dict[str, Any]:
    images = hostile_images()
    with tempfile.TemporaryDirectory(prefix="meter-bench-po-") as tmp:
        settings = _settings(Path(tmp), date(2026, 12, 1))
        server = _Server(settings)
        try:
            baseline = server.memory_mb("VmRSS")
            names = list(images)
            bodies = [names[i % len(names)] for i in range(100_000)]

            def upload(client: _Client, name: str) -> _Answer:
                return client.post(
                    "/v1/check", content=images[name], headers={"Content-Type": "image/png"}
                )

            load = _load(server.url, bodies, HOSTILE_IN_FLIGHT, max(seconds, 5.0), upload)
            peak = server.memory_mb("VmHWM")
            time.sleep(1.0)
            after = server.memory_mb("VmRSS")
        finally:
            server.stop()
    return {
        "in_flight": HOSTILE_IN_FLIGHT,
        "peak_rss_mb": peak,
        "limit_mb": HOSTILE_LIMIT_MB,
        "within_limit": peak <= HOSTILE_LIMIT_MB,
        "baseline_rss_mb": baseline,
        "rss_after_mb": after,
        "requests": load["requests"],
        "per_s": load["per_s"],
        "statuses": load["statuses"],
        "p99_ms": load["p99_ms"],
        "images": {name: len(data) for name, data in images.items()},
        "image_workers": settings.image_workers,
        "image_queue": settings.image_queue,
        "max_pixels": settings.max_pixels,
    }


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    report = {
        "postoffice_http": bench_postoffice_http(args.seconds),
        "postoffice_hostile_images": bench_postoffice_hostile_images(args.seconds),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
