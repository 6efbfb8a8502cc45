"""Table 2 across the device's socket on SoftHSM2: every role x every service.

The device runs as its own process. Each role's user logs on as a client
(No-Role: a client that never logs on) and calls every service over the
socket. Allowed cells must not fail for access (they may fail for another
reason, e.g. Authorize PSD on a device certified already); denied cells must
come back as AccessDenied naming the role and the service, change nothing
the caller can see (registers, device state, keys, session, users), and
leave exactly one "denied" record in the device's audit log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from meter.cli import workflows
from meter.cli.home import Home
from meter.errors import AccessDenied, MeterError
from meter.host import DeviceClient
from meter.indicium import RateCategory
from meter.protocol.issue import IssueRequest
from meter.psd.roles import MATRIX, TABLE_2, Role, Service, allowed
from tests.conftest import ROLE_USERS

pytestmark = pytest.mark.softhsm

REQUEST = IssueRequest(
    postage=550,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="10001",
    address=["ACME Corp", "PO Box 42", "New York NY 10001"],
)

# Destructive or session-ending services go last, in this order.
_LAST = [
    Service.CREATE_USER,
    Service.MODIFY_USER,
    Service.DELETE_USER,
    Service.ARCHIVE_AUDIT_LOG,
    Service.DELETE_AUDIT_RECORDS,
    Service.WITHDRAW_PSD,
    Service.LOGON,
    Service.LOGOFF,
]
ORDER = [s for s in MATRIX if s not in _LAST] + _LAST
# Provider last: its Withdraw PSD ends the device's service life.
ROLE_ORDER = [r for r in Role if r is not Role.PROVIDER] + [Role.PROVIDER]


# Allowed cells expected to fail for a reason other than access, and why.
EXPECTED_OTHER_FAILURES = [
    # Rule 4: Logon is open to every caller, but not while a session is open.
    *(f"{r.value} logon: SessionActive" for r in Role if r is not Role.NO_ROLE),
    "no-role logon: AuthenticationFailed",  # an unknown user
    "certificate-authority authorize-psd: CertificateError",  # certified at provisioning
    "security-officer create-audit-key: TokenError",  # the set-up made one already
    "security-officer update-psc: InvalidInput",  # an empty document is no update bundle
    "provider withdraw-psd: InvalidInput",  # neither the provider's nonce nor its acknowledgement
]


def _calls(client: DeviceClient, home: Home, role: Role) -> dict[Service, Callable[[], Any]]:
    certs = home.certs
    new_password = f"Changed-{ROLE_ORDER.index(role)}-9xQ"
    old_password = ROLE_USERS.get(role.value, ("", ""))[1]
    walk = f"walk-{role.value[:10]}"

    def later_clock() -> Any:
        later = datetime.now(UTC) + timedelta(seconds=60)
        return client.post("/v1/clock", {"time": later.isoformat()})

    return {
        Service.KEY_ADMINISTRATION: lambda: client.post("/v1/keys", {"action": "list"}),
        Service.AUTHORIZE_CUSTOMER: lambda: client.post(
            "/v1/customer",
            {"authorization": workflows.local_customer_authorization(home, "DEMO-0001")},
        ),
        Service.AUTHORIZE_PSD: lambda: client.post(
            "/v1/certificates",
            {
                "meter_pem": (certs / "meter.pem").read_text(),
                "provider_pem": (certs / "provider.pem").read_text(),
                "root_pem": (certs / "postal-root.pem").read_text(),
            },
        ),
        Service.ADMINISTRATION_AUTHORIZATION: lambda: client.post(
            "/v1/administration", {"authorize": True}
        ),
        Service.CHANGE_USER_PASSWORD: lambda: client.post(
            "/v1/password", {"old_password": old_password, "new_password": new_password}
        ),
        Service.SESSION_MANAGEMENT: lambda: client.get("/v1/session"),
        Service.CREATE_USER: lambda: client.post(
            "/v1/users", {"user_id": walk, "role": "auditor", "password": "Walk-user-pass-01"}
        ),
        Service.CREATE_AUDIT_KEY: lambda: client.post("/v1/audit-key"),
        Service.CREATE_INDICIUM: lambda: client.issue(REQUEST),
        Service.CREATE_INDICIUM_BATCH: lambda: client.issue_batch([REQUEST, REQUEST]),
        Service.CREATE_CORRECTION_INDICIUM: lambda: client.issue(replace(REQUEST, correction_of=1)),
        Service.WITHDRAW_PSD: lambda: client.post("/v1/withdraw"),
        Service.DELETE_USER: lambda: client.call("DELETE", f"/v1/users/{walk}"),
        Service.REQUEST_DEVICE_AUDIT: lambda: client.post("/v1/device-audit"),
        Service.DOWNLOAD_POSTAGE_VALUE: lambda: workflows.credit_from_local_provider(
            client, home, 5_000
        ),
        Service.EXPORT_AUDIT_KEY: lambda: client.get("/v1/audit-key"),
        Service.KEY_EXCHANGE: lambda: client.post("/v1/key-exchange"),
        Service.LOGOFF: client.logoff,
        Service.LOGON: lambda: client.logon("nobody", "Wrong-password-00"),
        Service.MODIFY_USER: lambda: client.call(
            "PUT", f"/v1/users/{walk}", {"role": "key-custodian", "password": "Walk-user-pass-02"}
        ),
        Service.RETRIEVE_PSD_STATUS: lambda: client.get("/v1/psd-status"),
        Service.RETRIEVE_PSD_PUBLIC_KEY: lambda: client.get("/v1/public-key"),
        Service.SET_CLOCK: later_clock,
        Service.REQUEST_STATUS: lambda: client.get("/v1/status"),
        # Not a signed bundle: the Security Officer's call is refused for that (see below);
        # installing real ones is tests/test_update_psc.py.
        Service.UPDATE_PSC: lambda: client.post("/v1/psc", {"bundle": "{}"}),
        Service.VIEW_USERS: lambda: client.get("/v1/users"),
        Service.VIEW_AUDIT_LOG: lambda: client.get("/v1/audit"),
        Service.SAVE_AUDIT_LOG: lambda: client.post("/v1/audit/save"),
        Service.ARCHIVE_AUDIT_LOG: lambda: client.post("/v1/audit/archive"),
        Service.DELETE_AUDIT_RECORDS: lambda: client.call("DELETE", "/v1/audit/archived"),
    }


def _audit(home: Home) -> list[dict[str, Any]]:
    """The device's live audit log, read from its file (the test runs as the device's account)."""
    path = home.device / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if "index" in line]


def _snapshot(client: DeviceClient, home: Home) -> dict[str, Any]:
    """What a denied call must not change, as Request Status and the users file show it."""
    status = client.get("/v1/status")
    for moving in ("time", "self_tests"):
        status.pop(moving)
    status["session"].pop("idle_s", None)
    users = json.loads((home.device / "users.json").read_text())["users"]
    return {"status": status, "users": users}


def test_table_2_has_25_services_and_the_auditor_duties() -> None:
    assert len(TABLE_2) == 25
    assert set(MATRIX) == set(Service)
    assert all(allowed(r, Service.REQUEST_STATUS) for r in Role)
    assert not allowed(Role.CUSTOMER, Service.LOGOFF)  # the table marks AD, AU, KC, SO only


def test_every_cell_of_the_matrix_across_the_socket(running: Home, tmp_path: Path) -> None:
    cells = 0
    other_failures: list[str] = []
    for role in ROLE_ORDER:
        with DeviceClient(running.socket) as client:
            if role is not Role.NO_ROLE:
                client.logon(*ROLE_USERS[role.value])
            calls = _calls(client, running, role)
            for service in ORDER:
                caller = Role(client.get("/v1/status")["role"])
                if service is Service.LOGOFF:
                    assert caller is role, "the session ended before Logoff"
                expect = allowed(caller, service)
                before = _snapshot(client, running)
                audit_before = len(_audit(running))
                try:
                    calls[service]()
                except AccessDenied as exc:
                    assert not expect, f"{role} {service}: allowed cell denied: {exc}"
                    assert caller.display in str(exc), str(exc)
                    assert service.display in str(exc), str(exc)
                    records = _audit(running)
                    assert len(records) == audit_before + 1, f"{role} {service}: audit"
                    assert (records[-1]["service"], records[-1]["outcome"]) == (
                        service.value,
                        "denied",
                    )
                    after = _snapshot(client, running)
                    assert after == before, f"{role} {service}: denied call changed state"
                except MeterError as exc:
                    assert expect, f"{role} {service}: denied cell raised {type(exc).__name__}"
                    other_failures.append(f"{role.value} {service.value}: {type(exc).__name__}")
                else:
                    assert expect, f"{role} {service}: denied cell succeeded"
                cells += 1
    assert cells == len(ROLE_ORDER) * len(ORDER)
    # The allowed cells that fail, and why: each for a reason of the device's state, not access.
    assert sorted(other_failures) == sorted(EXPECTED_OTHER_FAILURES), other_failures


def test_the_policy_table_says_where_each_service_beyond_table_2_comes_from() -> None:
    from meter.cli.device_cli import _policy_text, policy_matrix

    matrix = policy_matrix()
    sources = {entry["service"]: entry["source"] for entry in matrix["services"]}
    assert sources["create-indicium"] == "table-2"
    assert sources["create-indicium-batch"] == "batch"
    assert sources["view-audit-log"] == "section-4"
    lines = {line.split("  ")[0]: line for line in _policy_text(matrix).splitlines()}
    batch = next(line for title, line in lines.items() if "batch" in title.lower())
    assert batch.endswith("(Create Indicium, many at once)") and "section 4" not in batch
