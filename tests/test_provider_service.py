"""The provider's HTTP service and its CLI, on a real provider token, on both ledger back ends."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from _postgres import fresh_database
from _postgres import ledger_location as ledger_location  # a fixture: sqlite, postgresql
from _provider_serve import serving
from click.testing import CliRunner
from fastapi.testclient import TestClient

from meter.cli.home import Home
from meter.cli.main import cli
from meter.cli.provider_serve_cli import default_ledger
from meter.errors import AccessDenied, AuthenticationFailed, ConfigurationError, InvalidInput
from meter.postoffice.service_server import uvicorn_config
from meter.protocol.authorization import CustomerAuthorization
from meter.provider import Provider
from meter.provider.api_keys import ApiKeys, KeyRole
from meter.provider.http import create_provider_app
from meter.provider.http_config import ProviderConfig
from meter.provider.ledger_sql import SqlLedger, open_ledger

METER = 983973031309


@dataclass
class Served:
    client: TestClient
    ledger: SqlLedger
    provider: Provider
    operator: dict[str, str]
    auditor: dict[str, str]
    keys: ApiKeys


@pytest.fixture
def served(provisioned: Home, ledger_location: str, tmp_path: Path) -> Iterator[Served]:
    keys = ApiKeys(tmp_path / "keys.json")
    operator = {"Authorization": f"Bearer {keys.add('desk', KeyRole.OPERATOR)}"}
    auditor = {"Authorization": f"Bearer {keys.add('books', KeyRole.AUDITOR)}"}
    config = ProviderConfig(ledger=ledger_location, keys=keys.path)
    ledger = open_ledger(ledger_location)
    try:
        with provisioned.open_token("provider") as token:
            provider = Provider.open(token, provisioned.ledger)
            app = create_provider_app(config, ledger, provider)
            with TestClient(app, base_url="http://localhost") as client:
                yield Served(client, ledger, provider, operator, auditor, keys)
    finally:
        ledger.close()


def open_account(s: Served, customer: str = "ACME", mills: int = 100_000) -> None:
    answer = s.client.post(
        "/v1/customers", json={"customer": customer, "name": "Acme Ltd"}, headers=s.operator
    )
    assert answer.status_code == 201, answer.text
    answer = s.client.post(
        f"/v1/customers/{customer}/fund",
        json={"amount": mills, "reference": "pay-1"},
        headers=s.operator,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["available"] == mills


def test_accounts_funds_meters_and_transactions(served: Served) -> None:
    s = served
    assert s.client.get("/healthz").json() == {"status": "ok"}
    open_account(s)
    answer = s.client.post(
        "/v1/customers/ACME/meters", json={"device_serial": METER}, headers=s.operator
    )
    assert answer.status_code == 201, answer.text
    record = CustomerAuthorization.from_json(answer.json()["authorization"], "answer")
    record.verify(s.provider.certificate, METER, "answer")  # signed by this provider's token
    assert (record.customer, record.device_serial) == ("ACME", METER)
    now = datetime.now(UTC)
    s.ledger.prepare(bytes(range(16)), "ACME", METER, 25_000, now, now + timedelta(minutes=5))
    account = s.client.get("/v1/customers/ACME", headers=s.auditor).json()
    assert account["available"] == 75_000
    assert account["reserved"] == 25_000
    assert account["meters"] == [METER]
    assert [t["transaction_id"] for t in account["transactions"]] == [bytes(range(16)).hex()]
    found = s.client.get(f"/v1/transactions/{bytes(range(16)).hex()}", headers=s.auditor)
    assert found.status_code == 200
    assert found.json()["state"] == "prepared"
    assert found.json()["amount"] == 25_000


def _refusal(answer: Any, status: int, kind: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "message", "next_step"}
    assert body["error"] == kind
    return dict(body)


def test_bad_requests_are_refused_and_change_nothing(served: Served) -> None:
    s = served
    open_account(s)
    open_account(s, "OTHER", 5_000)
    assert (
        s.client.post(
            "/v1/customers/OTHER/meters", json={"device_serial": 77}, headers=s.operator
        ).status_code
        == 201
    )
    before = (s.ledger.totals(), s.ledger.account("ACME"), s.ledger.account("OTHER"))
    post = s.client.post
    cases = [
        (
            post(
                "/v1/customers/ACME/fund", json={"amount": 0, "reference": "z"}, headers=s.operator
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": -100, "reference": "n"},
                headers=s.operator,
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": True, "reference": "b"},
                headers=s.operator,
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": "5", "reference": "s"},
                headers=s.operator,
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": 5, "reference": "x", "more": 1},
                headers=s.operator,
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": 5, "reference": "pay-1"},
                headers=s.operator,
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/NOBODY/fund",
                json={"amount": 5, "reference": "u"},
                headers=s.operator,
            ),
            400,
            "InvalidInput",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                content=b"amount=5",
                headers={**s.operator, "Content-Type": "application/x-www-form-urlencoded"},
            ),
            415,
            "UnsupportedMediaType",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                content=b"{not json",
                headers={**s.operator, "Content-Type": "application/json"},
            ),
            400,
            "InvalidInput",
        ),
        (
            post("/v1/customers/ACME/meters", json={"device_serial": 77}, headers=s.operator),
            400,
            "InvalidInput",
        ),
        (
            post("/v1/customers/NOBODY/meters", json={"device_serial": 78}, headers=s.operator),
            400,
            "InvalidInput",
        ),
        (
            post("/v1/customers/ACME/meters", json={"device_serial": 0}, headers=s.operator),
            400,
            "InvalidInput",
        ),
        (
            post("/v1/customers", json={"customer": "ACME", "name": "again"}, headers=s.operator),
            400,
            "InvalidInput",
        ),
        (
            post("/v1/customers", json={"customer": "bad id", "name": "x"}, headers=s.operator),
            400,
            "InvalidInput",
        ),
        # who may do what
        (
            post("/v1/customers/ACME/fund", json={"amount": 5, "reference": "k"}),
            401,
            "Unauthorized",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": 5, "reference": "k"},
                headers={"Authorization": "Bearer prv1_00000000_" + "A" * 43},
            ),
            401,
            "Unauthorized",
        ),
        (
            post(
                "/v1/customers/ACME/fund", json={"amount": 5, "reference": "k"}, headers=s.auditor
            ),
            403,
            "Forbidden",
        ),
        # the post office's guard
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": 5, "reference": "h"},
                headers={**s.operator, "Host": "evil.example"},
            ),
            421,
            "HostNotAllowed",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                json={"amount": 5, "reference": "o"},
                headers={**s.operator, "Origin": "https://evil.example"},
            ),
            403,
            "CrossOrigin",
        ),
        (
            post(
                "/v1/customers/ACME/fund",
                content=b"{" + b" " * 70_000 + b"}",
                headers={**s.operator, "Content-Type": "application/json"},
            ),
            413,
            "PayloadTooLarge",
        ),
    ]
    for answer, status, kind in cases:
        _refusal(answer, status, kind)
    assert (s.ledger.totals(), s.ledger.account("ACME"), s.ledger.account("OTHER")) == before
    _refusal(s.client.get("/v1/customers/NOBODY", headers=s.auditor), 404, "NotFound")
    _refusal(s.client.get("/v1/customers/ACME"), 401, "Unauthorized")
    _refusal(s.client.get("/v1/transactions/abcd", headers=s.auditor), 400, "InvalidInput")
    _refusal(s.client.get(f"/v1/transactions/{'00' * 16}", headers=s.auditor), 404, "NotFound")
    _refusal(s.client.get("/v1/nothing-here"), 404, "NotFound")


def test_a_revoked_key_fails_at_the_next_request(served: Served) -> None:
    s = served
    open_account(s)
    s.keys.revoke("desk")
    body = _refusal(
        s.client.post(
            "/v1/customers/ACME/fund", json={"amount": 5, "reference": "r"}, headers=s.operator
        ),
        401,
        "Unauthorized",
    )
    assert "revoked" in body["message"]
    assert s.ledger.available("ACME") == 100_000


# -- the CLI ------------------------------------------------------------------------------------


def meter(
    home: Home, *args: str, ok: bool = True, env: dict[str, str] | None = None
) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["--home", str(home.path), "--json", *args], obj={}, env=env)
    assert (result.exit_code == 0) is ok, result.output
    return dict(json.loads(result.output.splitlines()[-1]))


def test_cli_fund_on_the_home_ledger(provisioned: Home) -> None:
    meter(provisioned, "provider", "add-customer", "ACME", "Acme Ltd")
    funded = meter(provisioned, "provider", "fund", "ACME", "50.00")
    assert funded["amount"] == 50_000
    assert funded["available"] == 50_000
    assert meter(provisioned, "provider", "fund", "ACME", "$0.125")["available"] == 50_125
    for amount in ("0", "-5.00", "1.0001", "fifty"):
        refused = meter(provisioned, "provider", "fund", "--", "ACME", amount, ok=False)
        assert refused["error"] == "InvalidInput"
    assert (
        meter(provisioned, "provider", "fund", "NOBODY", "5.00", ok=False)["error"]
        == "InvalidInput"
    )
    account = meter(provisioned, "provider", "account", "ACME")
    assert account["available"] == account["funded"] == 50_125
    assert default_ledger(provisioned).exists()


def test_cli_authorize_meter_writes_a_verifiable_record(provisioned: Home, tmp_path: Path) -> None:
    meter(provisioned, "provider", "add-customer", "ACME", "Acme Ltd")
    meter(provisioned, "provider", "add-customer", "OTHER", "Other")
    out = tmp_path / "auth.json"
    meter(provisioned, "provider", "authorize-meter", "ACME", str(METER), "--out", str(out))
    record = CustomerAuthorization.from_json(out.read_bytes(), str(out))
    with provisioned.open_token("provider") as token:
        record.verify(Provider.open(token, provisioned.ledger).certificate, METER, str(out))
    again = tmp_path / "again.json"
    refused = meter(
        provisioned,
        "provider",
        "authorize-meter",
        "OTHER",
        str(METER),
        "--out",
        str(again),
        ok=False,
    )
    assert "another customer" in refused["message"]
    assert not again.exists()


@pytest.fixture
def live(served: Served, provisioned: Home, tmp_path: Path) -> Iterator[str]:
    """The served app on a real uvicorn server: its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = served.client.app
    server = uvicorn.Server(
        uvicorn_config(
            app, "127.0.0.1", port, ProviderConfig("x", tmp_path).timeouts, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.025)
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_cli_fund_through_the_service(served: Served, provisioned: Home, live: str) -> None:
    open_account(served)
    key = served.operator["Authorization"].split()[1]
    env = {"METER_PROVIDER_KEY": key}
    answer = meter(provisioned, "provider", "fund", "ACME", "12.50", "--service", live, env=env)
    assert answer["available"] == 112_500
    assert served.ledger.available("ACME") == 112_500
    refused = meter(
        provisioned, "provider", "fund", "ACME", "0", "--service", live, env=env, ok=False
    )
    assert refused["error"] == "InvalidInput"
    auditor = {"METER_PROVIDER_KEY": served.auditor["Authorization"].split()[1]}
    refused = meter(
        provisioned, "provider", "fund", "ACME", "1.00", "--service", live, env=auditor, ok=False
    )
    assert refused["error"] == "AccessDenied"
    assert served.ledger.available("ACME") == 112_500


def test_cli_migrate_to_postgresql(provisioned: Home) -> None:
    meter(provisioned, "provider", "add-customer", "ACME", "Acme Ltd")
    meter(provisioned, "provider", "fund", "ACME", "75.00")
    with fresh_database() as url:
        totals = meter(provisioned, "provider", "migrate", "--to", url)
        assert totals["funded"] == 75_000
        assert meter(provisioned, "provider", "account", "ACME", "--db", url)["available"] == 75_000
        refused = meter(provisioned, "provider", "migrate", "--to", url, ok=False)
        assert "holds accounts already" in refused["message"]


def test_meter_provider_serve_runs_the_service(provisioned: Home) -> None:
    """`meter provider serve` itself: the home's token and ledger, a key, a payment."""
    key = ApiKeys(provisioned.path / "provider" / "keys.json").add("desk")
    with serving(provisioned) as (base, _):
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as answer:
            assert json.loads(answer.read()) == {"status": "ok"}
        env = {"METER_PROVIDER_KEY": key}
        meter(provisioned, "provider", "add-customer", "ACME", "Acme", "--service", base, env=env)
        answer = meter(provisioned, "provider", "fund", "ACME", "20.00", "--service", base, env=env)
        assert answer["available"] == 20_000
    # What the service recorded is in the home's ledger.
    assert meter(provisioned, "provider", "account", "ACME")["available"] == 20_000


def test_operator_keys_are_kept_as_hashes_and_a_damaged_file_admits_nobody(
    tmp_path: Path,
) -> None:
    keys = ApiKeys(tmp_path / "keys.json")
    key = keys.add("desk")
    assert key not in keys.path.read_text()
    assert (keys.path.stat().st_mode & 0o777) == 0o600
    assert keys.require(key, KeyRole.OPERATOR).name == "desk"
    with pytest.raises(AccessDenied, match="operator role; this needs auditor"):
        keys.require(key, KeyRole.AUDITOR)
    with pytest.raises(AuthenticationFailed, match="unknown"):
        keys.require(key[:-1] + ("A" if key[-1] != "A" else "B"), KeyRole.OPERATOR)
    with pytest.raises(InvalidInput, match="active key already"):
        keys.add("desk")
    keys.path.write_text('{"format": "provider-keys-v1", "keys": [{"id": 1}]}')
    with pytest.raises(ConfigurationError, match="damaged"):
        ApiKeys(keys.path).require(key, KeyRole.OPERATOR)


def test_cli_keys_add_list_revoke(provisioned: Home) -> None:
    added = meter(provisioned, "provider", "keys", "add", "books", "--role", "auditor")
    assert added["key"].startswith("prv1_")
    listed = meter(provisioned, "provider", "keys", "list")["keys"]
    assert [(k["name"], k["role"], k["revoked"]) for k in listed] == [("books", "auditor", None)]
    assert "key" not in listed[0]
    meter(provisioned, "provider", "keys", "revoke", "books")
    assert meter(provisioned, "provider", "keys", "list")["keys"][0]["revoked"] is not None
    assert (
        meter(provisioned, "provider", "keys", "revoke", "books", ok=False)["error"]
        == "InvalidInput"
    )
