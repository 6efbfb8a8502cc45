"""The post office attacked as a hostile client on the network would: who may cancel,
what a browser elsewhere can do, what an error looks like, what is public, and a
server that slow or greedy clients cannot hold."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _vectors
import httpx
import pytest
from _po_server import raw_exchange, read_until_closed, running_service
from _vectors import ECDSA_SERIAL, signed
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from test_service import config, label_png, write_cert_dir

from meter.cli.main import cli
from meter.indicium import Algorithm
from meter.postoffice.ledger import RegisterLedger
from meter.postoffice.service import create_app
from meter.postoffice.service_config import ServiceConfig, Timeouts
from meter.postoffice.stations import StationRegistry

VECTORS = _vectors.load()
ECDSA = Algorithm.ECDSA_P256


@pytest.fixture
def settings(tmp_path: Path) -> ServiceConfig:
    write_cert_dir(tmp_path / "certs")
    return config(tmp_path)


@pytest.fixture
def keys(settings: ServiceConfig) -> dict[str, str]:
    registry = StationRegistry(settings.stations_file)
    return {
        "counter": registry.add("counter-1"),
        "sorter": registry.add("sorter-7"),
        "auditor": registry.add("audit-office", role="auditor"),
    }


@pytest.fixture
def client(settings: ServiceConfig, keys: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def check(client: TestClient, data: bytes) -> dict[str, Any]:
    response = client.post("/v1/check", json={"hex": data.hex()})
    assert response.status_code == 200, response.text
    return dict(response.json())


def cancel(client: TestClient, data: bytes, key: str) -> httpx.Response:
    return client.post("/v1/cancel", json={"hex": data.hex()}, headers=bearer(key))


def assert_error_shape(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = dict(response.json())
    assert set(body) == {"error", "message", "next_step"}, body
    assert body["error"] == kind and body["message"] and body["next_step"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    return body


def test_checking_records_nothing_and_only_a_station_cancels(
    client: TestClient, keys: dict[str, str], settings: ServiceConfig
) -> None:
    piece = signed(VECTORS, ECDSA, sequence=101, postage=730)
    for _ in range(3):
        looked = check(client, piece)
        assert (looked["verdict"], looked["recorded"]) == ("VALID", False)
        assert "not accepted yet" in looked["reason"]
    # Anyone can look; nobody without a station key can cancel.
    for headers in ({}, bearer("pos1_00000000_" + "A" * 43), {"Authorization": "Basic eDp5"}):
        refused = client.post("/v1/cancel", json={"hex": piece.hex()}, headers=headers)
        assert_error_shape(refused, 401, "Unauthorized")
        assert refused.headers["www-authenticate"].startswith("Bearer")
    auditor = cancel(client, piece, keys["auditor"])
    assert "auditor role" in assert_error_shape(auditor, 403, "Forbidden")["message"]
    assert check(client, piece)["verdict"] == "VALID"  # none of that recorded it

    accepted = cancel(client, piece, keys["counter"])
    body = accepted.json()
    assert (body["verdict"], body["recorded"], body["station"]) == ("VALID", True, "counter-1")
    # The second station sees where and when the piece was first accepted.
    again = cancel(client, piece, keys["sorter"]).json()
    assert (again["verdict"], again["recorded"]) == ("DUPLICATE", False)
    assert again["first_accepted"] == {"station": "counter-1", "at": body["accepted_at"]}
    assert check(client, piece)["first_accepted"]["station"] == "counter-1"
    with RegisterLedger.open(settings.ledger) as ledger:
        assert [(p.sequence, p.station) for p in ledger.pieces()] == [(101, "counter-1")]


def test_a_revoked_key_fails_at_the_next_request(
    client: TestClient, keys: dict[str, str], settings: ServiceConfig
) -> None:
    piece = signed(VECTORS, ECDSA, sequence=102)
    assert client.get("/v1/station", headers=bearer(keys["sorter"])).json()["name"] == "sorter-7"
    StationRegistry(settings.stations_file).revoke("sorter-7")
    refused = cancel(client, piece, keys["sorter"])
    assert "revoked" in assert_error_shape(refused, 401, "Unauthorized")["message"]
    assert check(client, piece)["verdict"] == "VALID"
    assert cancel(client, piece, keys["counter"]).json()["recorded"] is True


def test_cancel_takes_json_only(client: TestClient, keys: dict[str, str]) -> None:
    piece = signed(VECTORS, ECDSA, sequence=103)
    headers = bearer(keys["counter"])
    attempts: list[dict[str, Any]] = [
        {"data": {"hex": piece.hex()}},  # what an HTML form posts
        {"files": {"file": ("label.png", label_png(piece), "image/png")}},
        {"content": piece, "headers": {"Content-Type": "application/octet-stream"}},
        {"content": json.dumps({"hex": piece.hex()}), "headers": {"Content-Type": "text/plain"}},
    ]
    for attempt in attempts:
        sent = {**attempt, "headers": {**headers, **attempt.get("headers", {})}}
        assert_error_shape(client.post("/v1/cancel", **sent), 415, "UnsupportedMediaType")
    assert check(client, piece)["verdict"] == "VALID"


def test_cross_origin_and_rebound_host_requests_are_refused(
    client: TestClient, keys: dict[str, str]
) -> None:
    piece = signed(VECTORS, ECDSA, sequence=104)
    hostile: list[dict[str, str]] = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a file: page
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port or subdomain of the same site
    ]
    for headers in hostile:
        for path in ("/v1/cancel", "/v1/check"):
            response = client.post(
                path, json={"hex": piece.hex()}, headers={**bearer(keys["counter"]), **headers}
            )
            assert_error_shape(response, 403, "CrossOrigin")
    rebound = client.get("/readyz", headers={"Host": "attacker.example:8417"})
    assert_error_shape(rebound, 421, "HostNotAllowed")
    rebound_post = client.post(
        "/v1/cancel",
        json={"hex": piece.hex()},
        headers={**bearer(keys["counter"]), "Host": "attacker.example"},
    )
    assert_error_shape(rebound_post, 421, "HostNotAllowed")
    assert check(client, piece)["verdict"] == "VALID"
    # The server's own page, as a browser sends it, is not cross-origin.
    own = cancel(client, piece, keys["counter"])
    assert own.json()["recorded"] is True
    same = client.post(
        "/v1/check",
        json={"hex": piece.hex()},
        headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
    )
    assert same.json()["verdict"] == "DUPLICATE"


def test_an_allowed_origin_may_post(tmp_path: Path, settings: ServiceConfig) -> None:
    import dataclasses

    key = StationRegistry(settings.stations_file).add("counter-app")
    allowed = dataclasses.replace(settings, allowed_origins=("https://counter.example",))
    with TestClient(create_app(allowed)) as client:
        piece = signed(VECTORS, ECDSA, sequence=105)
        headers = {
            **bearer(key),
            "Origin": "https://counter.example",
            "Sec-Fetch-Site": "cross-site",
        }
        response = client.post("/v1/cancel", json={"hex": piece.hex()}, headers=headers)
        assert response.json()["recorded"] is True


def test_every_error_has_one_shape(client: TestClient) -> None:
    assert_error_shape(client.get("/no/such/page"), 404, "NotFound")
    assert_error_shape(client.get("/v1/cancel"), 405, "MethodNotAllowed")
    assert_error_shape(client.put("/v1/check", json={}), 405, "MethodNotAllowed")
    deep = "[" * 100_000 + "]" * 100_000
    response = client.post("/v1/check", content=deep, headers={"Content-Type": "application/json"})
    assert "nested too deeply" in assert_error_shape(response, 400, "InvalidInput")["message"]
    deep_object = '{"a":' * 20_000 + "1" + "}" * 20_000
    response = client.post(
        "/v1/check-batch", content=deep_object, headers={"Content-Type": "application/json"}
    )
    assert_error_shape(response, 400, "InvalidInput")
    gif = io.BytesIO()
    Image.new("L", (40, 40), 255).save(gif, format="GIF")
    response = client.post(
        "/v1/check", content=gif.getvalue(), headers={"Content-Type": "image/gif"}
    )
    assert_error_shape(response, 415, "UnsupportedMediaType")
    # A GIF sent as a PNG is refused by what it is, not what it claims.
    response = client.post(
        "/v1/check", content=gif.getvalue(), headers={"Content-Type": "image/png"}
    )
    body = response.json()
    assert response.status_code == 400 and "PNG, JPEG" in body["message"], body


def test_what_is_public_and_what_needs_a_key(client: TestClient, keys: dict[str, str]) -> None:
    for path in ("/v1/reconciliation", "/metrics", "/v1/counters", "/v1/station"):
        assert_error_shape(client.get(path), 401, "Unauthorized")
        for role in ("counter", "auditor"):
            assert client.get(path, headers=bearer(keys[role])).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    for response in (ready, client.get("/healthz"), client.get("/")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert "/" not in json.dumps(ready.json()["certificates"])


def test_readiness_names_the_problem_without_paths(tmp_path: Path, settings: ServiceConfig) -> None:
    with TestClient(create_app(settings)) as client:
        (settings.cert_dir / "broken.pem").write_text(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        ready = client.get("/readyz")
    assert ready.status_code == 503
    text = json.dumps(ready.json())
    assert "broken.pem" in text
    assert str(tmp_path) not in text and "/certs" not in text, text


def test_station_commands_show_a_key_once_and_keep_only_its_hash(tmp_path: Path) -> None:
    registry = tmp_path / "stations.json"
    base = ["--json", "postoffice", "stations"]
    made = CliRunner().invoke(cli, [*base, "add", "counter-1", "--stations", str(registry)], obj={})
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)["key"]
    assert key.startswith("pos1_") and key not in registry.read_text()
    assert registry.stat().st_mode & 0o777 == 0o600
    again = CliRunner().invoke(
        cli, [*base, "add", "counter-1", "--stations", str(registry)], obj={}
    )
    assert again.exit_code == 1 and "already has a key" in again.output
    bad = CliRunner().invoke(cli, [*base, "add", "../x", "--stations", str(registry)], obj={})
    assert bad.exit_code == 1 and "station name" in bad.output
    listed = CliRunner().invoke(cli, [*base, "list", "--stations", str(registry)], obj={})
    [entry] = json.loads(listed.output)["stations"]
    assert entry["name"] == "counter-1" and "sha256" not in entry and entry["revoked"] is None
    gone = CliRunner().invoke(
        cli, [*base, "revoke", "counter-1", "--stations", str(registry)], obj={}
    )
    assert gone.exit_code == 0 and json.loads(gone.output)["revoked"]
    assert StationRegistry(registry).stations()[0].revoked is not None


def test_a_damaged_registry_lets_nobody_in(
    client: TestClient, keys: dict[str, str], settings: ServiceConfig
) -> None:
    settings.stations_file.write_text("{not json")
    response = client.get("/v1/station", headers=bearer(keys["counter"]))
    assert response.status_code == 500 and response.json()["error"] == "ConfigurationError"
    assert "damaged" in response.json()["message"]


# A real server: the connection-level limits.


def exposed(settings: ServiceConfig, **changes: Any) -> ServiceConfig:
    import dataclasses

    limits = {"header": 0.6, "body": 0.6, "idle": 2.0, "max_connections": 8}
    limits.update(changes.pop("limits", {}))
    return dataclasses.replace(
        settings, allowed_hosts=("127.0.0.1",), timeouts=Timeouts(**limits), **changes
    )


def test_slow_heads_and_bodies_are_cut_off(settings: ServiceConfig) -> None:
    with running_service(exposed(settings)) as (_, port):
        started = time.monotonic()
        answer = raw_exchange(port, b"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"Timeout"' in answer and time.monotonic() - started < 4
        silent = raw_exchange(port, b"")
        assert silent.startswith(b"HTTP/1.1 408")
        head = (
            b"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 400\r\n\r\n{"hex": "01'
        )
        slow_body = raw_exchange(port, head)
        assert slow_body.startswith(b"HTTP/1.1 408") and b"body" in slow_body, slow_body
        huge_head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 70_000
        assert raw_exchange(port, huge_head).startswith(b"HTTP/1.1 431")
        # Kept alive, the next request's head has the same deadline.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_until_first_response(conn).startswith(b"HTTP/1.1 200")
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert read_until_closed(conn).startswith(b"HTTP/1.1 408")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_connections_beyond_the_limit_are_answered_and_closed(settings: ServiceConfig) -> None:
    with running_service(exposed(settings, limits={"max_connections": 3, "header": 5})) as (
        _,
        port,
    ):
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)  # the server has seen them
            extra = raw_exchange(port, b"")  # answered as soon as it connects
            assert extra.startswith(b"HTTP/1.1 503") and b'"Busy"' in extra, extra
        finally:
            for conn in held:
                conn.close()
        time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_images_beyond_the_queue_are_refused_before_they_are_read(
    settings: ServiceConfig,
) -> None:
    piece = signed(VECTORS, ECDSA, sequence=106)
    png = label_png(piece)
    busy = exposed(settings, image_workers=1, image_queue=0, limits={"body": 10, "header": 10})
    with running_service(busy) as (_, port):
        # One upload holds the only place while its body trickles in.
        holder = socket.create_connection(("127.0.0.1", port), timeout=10)
        holder.sendall(
            b"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(png)}\r\n\r\n".encode()
            + png[:100]
        )
        time.sleep(0.3)
        refused = httpx.post(
            f"http://127.0.0.1:{port}/v1/check",
            content=png,
            headers={"Content-Type": "image/png"},
        )
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"] == "Busy"
        holder.sendall(png[100:])
        answer = read_until_first_response(holder)
        holder.close()
        assert b'"VALID"' in answer
        later = httpx.post(
            f"http://127.0.0.1:{port}/v1/check", content=png, headers={"Content-Type": "image/png"}
        )
        assert later.status_code == 200 and later.json()["verdict"] == "VALID"


def read_until_first_response(conn: socket.socket) -> bytes:
    received = b""
    deadline = time.monotonic() + 10
    while b"}" not in received and time.monotonic() < deadline:
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_many_hostile_uploads_at_once_leave_the_service_answering(
    settings: ServiceConfig,
) -> None:
    """A 12000 x 12000 PNG declared in 30 KB: refused from its header, 40 at a time."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    side = 12_000
    rows = zlib.compress((b"\x00" + b"\x00" * (side // 8)) * side, 9)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )
    assert len(bomb) < 100_000
    with running_service(exposed(settings, limits={"max_connections": 64})) as (_, port):
        answers: list[int] = []

        def send() -> None:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/check",
                content=bomb,
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            answers.append(response.status_code)

        threads = [threading.Thread(target=send) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(answers) == 40 and set(answers) <= {400, 503}, answers
        assert answers.count(400) >= 1
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_the_check_endpoint_serves_a_real_label(client: TestClient) -> None:
    piece = signed(VECTORS, ECDSA, sequence=107)
    response = client.post(
        "/v1/check", content=label_png(piece), headers={"Content-Type": "image/png"}
    )
    body = response.json()
    assert (body["verdict"], body["input"], body["fields"]["device_serial"]) == (
        "VALID",
        "image",
        ECDSA_SERIAL,
    )


def test_the_service_caps_pixels_where_the_decoder_does() -> None:
    from meter import label
    from meter.postoffice import service_config

    assert service_config.DEFAULT_MAX_PIXELS == label.DEFAULT_MAX_PIXELS
