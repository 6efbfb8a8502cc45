"""The post office's HTTP verification service, through FastAPI's TestClient and a real server."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import _vectors
import httpx
import pytest
from _vectors import ECDSA_SERIAL, ED25519_SERIAL, signed
from click.testing import CliRunner
from conftest import require_service
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from PIL import Image

from meter.cli.home import Home
from meter.cli.main import cli
from meter.cli.workflows import label_info
from meter.errors import CertificateError, ConfigurationError, ReplayStoreError
from meter.indicium import Algorithm, RateCategory, decode
from meter.label import render_label
from meter.postoffice import EmbeddedReplayStore
from meter.postoffice.service import ServiceConfig, create_app
from meter.postoffice.stations import StationRegistry
from meter.psd import IssueRequest
from tests import _direct as direct

VECTORS = _vectors.load()
TODAY = _vectors.verification_date(VECTORS)
ECDSA, EDDSA = Algorithm.ECDSA_P256, Algorithm.ED25519
ADDRESS = ("Jane Q. Public", "1234 Main St.", "Springfield, IL 62704")


def write_cert_dir(folder: Path, *, without: tuple[int, ...] = (ED25519_SERIAL,)) -> Path:
    """The vectors' postal root, providers, meters (minus `without`) and revocations."""
    folder.mkdir(parents=True, exist_ok=True)
    certs = VECTORS["certificates"]
    (folder / "postal-root.pem").write_text(certs["postal_root"])
    (folder / "providers.pem").write_text("".join(certs["providers"]))
    meters = [
        pem
        for pem in certs["meters"]
        if not any(f"={serial}," in _subject(pem) for serial in without)
    ]
    (folder / "meters.pem").write_text("".join(meters))
    (folder / "revocations.json").write_text(json.dumps(VECTORS["revoked"]))
    return folder


def _subject(pem: str) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()


def meter_pem(serial: int) -> bytes:
    return _vectors.meter_certificate(VECTORS, serial).public_bytes(serialization.Encoding.PEM)


def config(tmp_path: Path, **changes: Any) -> ServiceConfig:
    values: dict[str, Any] = {
        "cert_dir": tmp_path / "certs",
        "store": tmp_path / "postoffice" / "replay",
        "ledger": tmp_path / "postoffice" / "registers.sqlite",
        "today": TODAY,
        "max_upload": 256 * 1024,
        "allowed_hosts": ("testserver", "127.0.0.1"),
        "stations": tmp_path / "stations.json",
    }
    values.update(changes)
    return ServiceConfig(**values)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return write_cert_dir(tmp_path / "certs")


def station_client(settings: ServiceConfig) -> TestClient:
    """A client of the service that presents a new station key with every request."""
    key = StationRegistry(settings.stations_file).add(f"counter-{secrets.token_hex(3)}")
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def client(tmp_path: Path, certs: Path) -> Iterator[TestClient]:
    with station_client(config(tmp_path)) as test_client:
        yield test_client


def label_png(data: bytes) -> bytes:
    """A printed label carrying `data`, its texts taken from the decoded indicium."""
    return render_label(data, label_info(decode(data), ADDRESS)).png


def forged(data: bytes, offset: int = 70) -> bytes:
    """The indicium with one byte of its signed part (the address digest) changed."""
    changed = bytearray(data)
    changed[offset] ^= 0x5A
    return bytes(changed)


def verify_hex(client: TestClient, data: bytes) -> httpx.Response:
    """Cancel the piece: verify it and record it as used by the client's station."""
    return client.post("/v1/cancel", json={"hex": data.hex()})


def test_hex_is_valid_then_duplicate_with_fields_in_plain_words(client: TestClient) -> None:
    data = signed(VECTORS, ECDSA, sequence=7, postage=730)
    first = verify_hex(client, data)
    assert first.status_code == 200
    body = first.json()
    assert body["verdict"] == "VALID", body["reason"]
    assert body["input"] == "hex" and body["indicium_hex"] == data.hex()
    assert body["fields"]["device_serial"] == ECDSA_SERIAL
    assert body["plain"] == {
        "postage": "$0.730",
        "date_of_mailing": TODAY.isoformat(),
        "origin": "94043",
        "destination": "62704-1234, delivery point 23",
        "device": f"{ECDSA_SERIAL} (PM01, authorization 60669)",
        "sequence": "7",
        "rate": "First-Class Mail letter",
        "time_of_issue": f"{TODAY.isoformat()} 08:00:00 UTC",
        "registers": "ascending $100.000, descending $400.000",
        "flags": "none",
    }
    again = verify_hex(client, data)
    assert again.status_code == 200 and again.json()["verdict"] == "DUPLICATE"


def test_raw_bytes_image_body_and_multipart_upload(client: TestClient) -> None:
    raw = signed(VECTORS, ECDSA, sequence=1)
    response = client.post(
        "/v1/check", content=raw, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.json()["verdict"] == "VALID" and response.json()["input"] == "bytes"

    image = signed(VECTORS, ECDSA, sequence=2)
    response = client.post(
        "/v1/check", content=label_png(image), headers={"Content-Type": "image/png"}
    )
    assert response.json()["verdict"] == "VALID" and response.json()["input"] == "image"
    assert response.json()["indicium_hex"] == image.hex()

    upload = signed(VECTORS, ECDSA, sequence=3)
    files = {"file": ("label.png", label_png(upload), "image/png")}
    response = client.post("/v1/check", files=files)
    assert response.status_code == 200 and response.json()["verdict"] == "VALID"
    assert client.post("/v1/check", files=files).json()["verdict"] == "VALID"  # only looked at
    assert verify_hex(client, upload).json()["recorded"] is True
    response = client.post("/v1/check", files=files)
    assert response.json()["verdict"] == "DUPLICATE"
    # A hex field in a form works too.
    response = client.post("/v1/check", data={"hex": upload.hex()})
    assert response.json()["verdict"] == "DUPLICATE"


def test_forged_indicium_and_forged_label(client: TestClient) -> None:
    data = signed(VECTORS, ECDSA, sequence=11)
    response = verify_hex(client, forged(data))
    assert response.status_code == 200
    assert response.json()["verdict"] == "FORGED"
    assert "signature does not verify" in response.json()["reason"]
    files = {"file": ("forged.png", label_png(forged(data, 40)), "image/png")}
    assert client.post("/v1/check", files=files).json()["verdict"] == "FORGED"
    # Neither forgery touched the replay store: the genuine piece is still new.
    assert verify_hex(client, data).json()["verdict"] == "VALID"


def test_batch_gives_verdicts_in_order(client: TestClient) -> None:
    a, b = (signed(VECTORS, ECDSA, sequence=n) for n in (21, 22))
    eddsa = signed(VECTORS, EDDSA, sequence=5)  # its meter is not in the directory
    items = [a.hex(), b.hex(), a.hex(), forged(b).hex(), eddsa.hex(), "0100"]
    response = client.post("/v1/cancel-batch", json={"items": items})
    assert response.status_code == 200
    body = response.json()
    verdicts = [r["verdict"] for r in body["results"]]
    assert verdicts == ["VALID", "VALID", "DUPLICATE", "FORGED", "UNKNOWN_DEVICE", "MALFORMED"]
    assert body["counts"] == {
        "VALID": 2,
        "DUPLICATE": 1,
        "FORGED": 1,
        "UNKNOWN_DEVICE": 1,
        "MALFORMED": 1,
    }
    assert body["results"][1]["plain"]["sequence"] == "22"


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({"content": b"\x07garbage", "headers": {"Content-Type": "application/octet-stream"}},
         400, "malformed: version 0x07"),
        ({"json": {"hex": "not hex at all"}}, 400, "not hexadecimal"),
        ({"json": {"hex": "abc"}}, 400, "odd number of hex digits"),
        ({"json": {"hex": "  "}}, 400, "empty"),
        ({"json": {"indicium": "01"}}, 400, '{"hex"'),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}},
         400, "not JSON"),
        ({"content": b"", "headers": {"Content-Type": "application/octet-stream"}}, 400, "empty"),
        ({"content": b"\x89PNG garbage", "headers": {"Content-Type": "image/png"}},
         400, "not an image file"),
        ({"content": b"01", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
        ({"files": {"other": ("x.png", b"x", "image/png")}}, 400, '"file"'),
    ],
)  # fmt: skip
def test_bad_input_is_refused_clearly_and_changes_nothing(
    client: TestClient, request_args: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/v1/check", **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert message in (body.get("message") or body.get("reason")), body
    counters = client.get("/v1/counters").json()
    assert counters["verdicts"]["VALID"] == counters["verdicts"]["DUPLICATE"] == 0


def test_image_without_barcode_is_400(client: TestClient) -> None:
    blank = io.BytesIO()
    Image.new("L", (600, 400), 255).save(blank, format="PNG")
    response = client.post("/v1/check", files={"file": ("blank.png", blank.getvalue())})
    assert response.status_code == 400
    assert response.json()["error"] == "BarcodeError"
    assert "no PDF417" in response.json()["message"] or "barcode" in response.json()["message"]
    assert client.get("/v1/counters").json()["rejected"] == {"400": 1}


def test_bad_batches_are_refused_whole(tmp_path: Path, certs: Path) -> None:
    good = signed(VECTORS, ECDSA, sequence=31)
    with station_client(config(tmp_path, max_batch=3)) as client:
        for body, message in [
            ({"items": [good.hex(), "zz"]}, "items[1] is not hexadecimal"),
            ({"items": [good.hex(), 5]}, "items[1] is not a string"),
            ({"items": [good.hex()] * 4}, "at most 3 per batch"),
            ({"items": []}, "empty"),
            ({"hex": good.hex()}, '{"items"'),
        ]:
            response = client.post("/v1/cancel-batch", json=body)
            assert response.status_code == 400 and message in response.json()["message"]
        # Nothing of the refused batches reached the replay store.
        assert verify_hex(client, good).json()["verdict"] == "VALID"


def test_huge_uploads_are_413_by_length_and_by_streamed_size(tmp_path: Path, certs: Path) -> None:
    good = signed(VECTORS, ECDSA, sequence=41)
    limit = 4096
    with station_client(config(tmp_path, max_upload=limit)) as client:
        declared = client.post(
            "/v1/check", content=b"\x01" * (limit + 1), headers={"Content-Type": "image/png"}
        )
        assert declared.status_code == 413
        assert str(limit) in declared.json()["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: only the streamed size tells
            for _ in range(8):
                yield b"\x00" * 1024

        streamed = client.post(
            "/v1/check", content=chunks(), headers={"Content-Type": "application/octet-stream"}
        )
        assert streamed.status_code == 413
        big_batch = client.post("/v1/cancel-batch", json={"items": [good.hex()] * 20})
        assert big_batch.status_code == 413
        assert client.get("/v1/counters").json()["rejected"] == {"413": 3}
        assert verify_hex(client, good).json()["verdict"] == "VALID"


@pytest.mark.parametrize(
    ("damage", "error", "names"),
    [
        (lambda d: (d / "postal-root.pem").unlink(), ConfigurationError, "postal-root.pem"),
        (lambda d: (d / "meters.pem").write_text("not a certificate"), CertificateError,
         "meters.pem"),
        (lambda d: (d / "extra.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                                 b"-----END CERTIFICATE-----\n"),
         CertificateError, "extra.pem"),
        (lambda d: (d / "revocations.json").write_text("{"), CertificateError,
         "revocations.json"),
        (lambda d: shutil.rmtree(d), ConfigurationError, "does not exist"),
    ],
)  # fmt: skip
def test_malformed_certificate_directory_at_start_is_refused(
    tmp_path: Path, certs: Path, damage: Any, error: type[Exception], names: str
) -> None:
    damage(certs)
    with pytest.raises(error, match=names.replace(".", r"\.")):
        create_app(config(tmp_path))
    # Nothing was left open: the same store and ledger open at once afterwards.
    shutil.rmtree(certs, ignore_errors=True)
    write_cert_dir(certs)
    with station_client(config(tmp_path)) as client:
        assert client.get("/readyz").status_code == 200


def test_certificate_directory_is_reloaded_when_it_changes(client: TestClient, certs: Path) -> None:
    first = signed(VECTORS, EDDSA, sequence=1)
    assert verify_hex(client, first).json()["verdict"] == "UNKNOWN_DEVICE"
    (certs / "new-meter.pem").write_bytes(meter_pem(ED25519_SERIAL))
    assert verify_hex(client, first).json()["verdict"] == "VALID"

    # A malformed change keeps the last good set serving and says why it is not ready.
    (certs / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    assert verify_hex(client, signed(VECTORS, EDDSA, sequence=2)).json()["verdict"] == "VALID"
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "broken.pem" in ready.json()["problems"][0]
    assert "meter_postoffice_ready 0" in client.get("/metrics").text

    (certs / "broken.pem").unlink()
    assert client.get("/readyz").status_code == 200
    # A revocation added later applies at once (the vectors' meters were issued at 08:00).
    revoked = json.loads((certs / "revocations.json").read_text())
    revoked.append({"device_serial": ED25519_SERIAL, "revoked_at": f"{TODAY}T07:00:00+00:00"})
    (certs / "revocations.json").write_text(json.dumps(revoked))
    assert verify_hex(client, signed(VECTORS, EDDSA, sequence=3)).json()["verdict"] == "REVOKED"


def test_health_readiness_counters_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["problems"] == []
    assert body["certificates"]["files"] == 4  # meters, postal root, providers, revocations
    assert body["certificates"]["meters"] == len(_vectors.trust_store(VECTORS).credentials) - 1

    data = signed(VECTORS, ECDSA, sequence=51)
    verify_hex(client, data)
    verify_hex(client, data)
    client.post("/v1/cancel-batch", json={"items": [forged(data).hex(), data.hex()]})
    counters = client.get("/v1/counters").json()
    assert counters["verdicts"]["VALID"] == 1
    assert counters["verdicts"]["DUPLICATE"] == 2
    assert counters["verdicts"]["FORGED"] == 1
    assert counters["requests"] == {"check": 0, "check_batch": 0, "cancel": 2, "cancel_batch": 1}
    metrics = client.get("/metrics").text
    assert 'meter_postoffice_verdicts_total{verdict="DUPLICATE"} 2' in metrics
    assert "meter_postoffice_ready 1" in metrics


def test_pieces_are_remembered_across_restarts_and_reconciled(tmp_path: Path, certs: Path) -> None:
    pieces = [
        signed(VECTORS, ECDSA, sequence=61, ascending=100_000, descending=400_000, postage=730),
        signed(VECTORS, ECDSA, sequence=62, ascending=100_730, descending=399_270, postage=730),
    ]
    with station_client(config(tmp_path)) as client:
        assert verify_hex(client, pieces[0]).json()["verdict"] == "VALID"
        report = client.get("/v1/reconciliation")
        assert report.status_code == 200
    with station_client(config(tmp_path)) as client:
        assert verify_hex(client, pieces[0]).json()["verdict"] == "DUPLICATE"
        assert verify_hex(client, pieces[1]).json()["verdict"] == "VALID"
        report = client.get("/v1/reconciliation").json()
    assert report["clean"] is True and report["credited_checked"] is False
    [device] = report["devices"]
    assert (device["device_serial"], device["pieces"], device["last_sequence"]) == (
        ECDSA_SERIAL,
        2,
        62,
    )


def test_the_store_forgets_expired_pieces_on_the_first_verification_of_a_day(
    tmp_path: Path, certs: Path
) -> None:
    piece = signed(VECTORS, ECDSA, sequence=71, postage=730)
    with station_client(config(tmp_path)) as client:
        assert verify_hex(client, piece).json()["verdict"] == "VALID"
    store = config(tmp_path).store
    with EmbeddedReplayStore.open(store) as replay:
        assert len(replay) == 1
    later = TODAY + timedelta(days=190)  # the piece's date of mailing is now out of the window
    with station_client(config(tmp_path, today=later)) as client:
        assert verify_hex(client, b"\x00").status_code == 400  # any request of the day
        assert verify_hex(client, piece).json()["verdict"] == "EXPIRED"
    with EmbeddedReplayStore.open(store) as replay:
        assert len(replay) == 0


def test_reconciliation_reports_a_broken_register_chain(client: TestClient) -> None:
    pieces = [
        signed(VECTORS, ECDSA, sequence=71, ascending=100_000, descending=400_000, postage=730),
        # The next piece's ascending register should be 100_730.
        signed(VECTORS, ECDSA, sequence=72, ascending=100_000, descending=400_000, postage=730),
    ]
    client.post("/v1/cancel-batch", json={"items": [p.hex() for p in pieces]})
    report = client.get("/v1/reconciliation").json()
    assert report["clean"] is False
    assert [f["kind"] for f in report["findings"]] == ["ascending-step"]


@pytest.mark.softhsm
def test_reconciliation_reads_the_providers_signed_export(provisioned: Home) -> None:
    """A real meter's label, and the provider's export dropped into the certificate directory."""
    home = provisioned
    direct.credit(home, 10_000)
    request = IssueRequest(
        postage=730,
        rate_category=RateCategory.FIRST_CLASS_LETTER,
        origin_zip="94043",
        destination_zip="62704",
        address=list(ADDRESS),
    )
    label = direct.issue_label(home, request)
    settings = ServiceConfig(
        cert_dir=home.certs,
        store=home.path / "postoffice" / "replay",
        ledger=home.path / "postoffice" / "registers.sqlite",
        allowed_hosts=("testserver",),
    )
    with station_client(settings) as client:
        files = {"file": ("label.png", label.read_bytes(), "image/png")}
        looked = client.post("/v1/check", files=files).json()
        assert looked["verdict"] == "VALID"
        cancelled = client.post("/v1/cancel", json={"hex": looked["indicium_hex"]}).json()
        assert cancelled["recorded"] is True
        credited = home.certs / "credited.json"
        exported = CliRunner().invoke(
            cli, ["--home", str(home.path), "provider", "export-credited", "--out", str(credited)]
        )
        assert exported.exit_code == 0, exported.output
        report = client.get("/v1/reconciliation").json()
        assert report["clean"] is True and report["credited_checked"] is True
        [device] = report["devices"]
        assert (device["credited"], device["last_ascending"]) == (10_000, 730)

        # An export altered after signing is refused, with the reason.
        document = json.loads(credited.read_text())
        document["devices"] = {k: v * 10 for k, v in document["devices"].items()}
        credited.write_text(json.dumps(document))
        refused = client.get("/v1/reconciliation")
        assert refused.status_code == 500
        assert "credited.json" in refused.json()["message"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_redis_gives_error_never_valid(tmp_path: Path, certs: Path) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    data = signed(VECTORS, ECDSA, sequence=81)
    with station_client(config(tmp_path, store=url)) as client:
        response = verify_hex(client, data)
        assert response.status_code == 503
        assert response.json()["verdict"] == "ERROR"
        assert "replay store" in response.json()["reason"]
        batch = client.post("/v1/cancel-batch", json={"items": [data.hex(), forged(data).hex()]})
        assert batch.status_code == 503
        assert [r["verdict"] for r in batch.json()["results"]] == ["ERROR", "FORGED"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["problems"]
        assert client.get("/v1/counters").json()["verdicts"]["VALID"] == 0


def test_embedded_store_in_use_is_refused_at_start(tmp_path: Path, certs: Path) -> None:
    with station_client(config(tmp_path)) as client:
        assert client.get("/readyz").status_code == 200
        with pytest.raises(ReplayStoreError, match="in use"):
            create_app(config(tmp_path, ledger=tmp_path / "other.sqlite"))


def test_clerk_page_is_served_offline(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="verdict"' in page.text and 'id="file"' in page.text and 'id="hex"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing external
    assert "default-src 'none'" in page.headers["content-security-policy"]


# The command, as an operator runs it: a real uvicorn server in a child process.


def test_serve_refuses_a_broken_setup_clearly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = CliRunner().invoke(
        cli, ["--home", str(home), "postoffice", "serve", "--certs", str(tmp_path / "none")]
    )
    assert result.exit_code == 1
    assert "does not exist" in result.output
    result = CliRunner().invoke(
        cli, ["--home", str(home), "postoffice", "serve", "--store", "x", "--redis", "redis://h"]
    )
    assert result.exit_code == 1 and "not both" in result.output


def test_serve_runs_the_service_on_a_port(tmp_path: Path, certs: Path) -> None:
    port = closed_port()
    meter = Path(sys.executable).with_name("meter")
    args = [str(meter), "--home", str(tmp_path / "home"), "postoffice", "serve"]
    args += ["--certs", str(certs), "--port", str(port)]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "CI": ""}
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        data = signed(VECTORS, ECDSA, sequence=91)
        # The verifier's date is today's: the vectors' pieces may be in or out of date.
        verdict = httpx.post(f"{base}/v1/check", json={"hex": data.hex()}).json()["verdict"]
        assert verdict in ("VALID", "EXPIRED", "NOT_YET_VALID")
        assert 'id="verdict"' in httpx.get(f"{base}/").text
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert (tmp_path / "home" / "postoffice").is_dir()


REDIS_URLS = {
    "standalone": os.environ.get("METER_TEST_REDIS_URL", "redis://127.0.0.1:6390/0"),
    "cluster": os.environ.get("METER_TEST_REDIS_CLUSTER_URL", "redis://127.0.0.1:7000"),
}


@pytest.mark.redis
@pytest.mark.parametrize("kind", sorted(REDIS_URLS))
def test_service_on_redis(tmp_path: Path, certs: Path, kind: str) -> None:
    import redis

    url = REDIS_URLS[kind]
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        require_service(False, f"Redis ({kind}) at {url}")
    # A sequence no earlier run used, so that the shared server's state does not matter.
    sequence = 1 + secrets.randbelow(2**32 - 2)
    data = signed(VECTORS, ECDSA, sequence=sequence)
    with station_client(config(tmp_path, store=url)) as client:
        assert client.get("/readyz").json()["store"] == "redis"
        assert verify_hex(client, data).json()["verdict"] == "VALID"
        batch = client.post("/v1/cancel-batch", json={"items": [data.hex()]})
        assert batch.json()["results"][0]["verdict"] == "DUPLICATE"


def test_expire_command_forgets_pieces_past_the_window(tmp_path: Path, certs: Path) -> None:
    with station_client(config(tmp_path)) as client:
        piece = signed(VECTORS, ECDSA, sequence=81, postage=730)
        assert verify_hex(client, piece).json()["verdict"] == "VALID"
    store = str(config(tmp_path).store)
    args = ["--json", "postoffice", "expire", "--store", store, "--date"]
    kept = CliRunner().invoke(cli, [*args, (TODAY + timedelta(days=30)).isoformat()], obj={})
    assert kept.exit_code == 0 and json.loads(kept.output)["dropped"] == 0, kept.output
    gone = CliRunner().invoke(cli, [*args, (TODAY + timedelta(days=190)).isoformat()], obj={})
    assert gone.exit_code == 0 and json.loads(gone.output)["dropped"] == 1, gone.output
