"""Table 2 through the real service layer on SoftHSM2: every role x every service.

Each role's user logs on to a set-up device (No-Role: nobody logs on) and
calls every service. Allowed cells must not fail for access (they may fail
for another reason, e.g. Authorize PSD on a device certified already);
denied cells must raise AccessDenied naming the role and the service,
change nothing, and leave a "denied" audit record.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meter.cli import workflows
from meter.cli.home import Home
from meter.errors import AccessDenied, MeterError
from meter.indicium import RateCategory
from meter.psd import IssueRequest
from meter.psd.firmware import PSD
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
    "no-role logon: LogonFailed",  # an unknown user
    "certificate-authority authorize-psd: CertificateError",  # certified at provisioning
    "security-officer create-audit-key: TokenError",  # the set-up made one already
]


def _calls(psd: PSD, home: Home, tmp: Path, role: Role) -> dict[Service, Callable[[], Any]]:
    certs = home.certs
    new_password = f"Changed-{ROLE_ORDER.index(role)}-9xQ"
    old_password = ROLE_USERS.get(role.value, ("", ""))[1]
    walk_user = f"walk-{role.value[:10]}"
    return {
        Service.KEY_ADMINISTRATION: lambda: psd.key_administration("list"),
        Service.AUTHORIZE_CUSTOMER: lambda: psd.authorize_customer("WALK-0001"),
        Service.AUTHORIZE_PSD: lambda: psd.authorize_psd(
            (certs / "meter.pem").read_bytes(),
            (certs / "provider.pem").read_bytes(),
            (certs / "postal-root.pem").read_bytes(),
        ),
        Service.ADMINISTRATION_AUTHORIZATION: lambda: psd.administration_authorization(True),
        Service.CHANGE_USER_PASSWORD: lambda: psd.change_user_password(old_password, new_password),
        Service.SESSION_MANAGEMENT: psd.session_management,
        Service.CREATE_USER: lambda: psd.create_user(walk_user, Role.AUDITOR, "Walk-user-pass-01"),
        Service.CREATE_AUDIT_KEY: psd.create_audit_key,
        Service.CREATE_INDICIUM: lambda: psd.create_indicium(REQUEST),
        Service.CREATE_CORRECTION_INDICIUM: lambda: psd.create_correction_indicium(REQUEST, 1),
        Service.WITHDRAW_PSD: psd.withdraw_psd,
        Service.DELETE_USER: lambda: psd.delete_user(walk_user),
        Service.REQUEST_DEVICE_AUDIT: psd.request_device_audit,
        Service.DOWNLOAD_POSTAGE_VALUE: lambda: psd.download_postage_value(
            workflows.local_provider_grant(home, 5_000)
        ),
        Service.EXPORT_AUDIT_KEY: psd.export_audit_key,
        Service.KEY_EXCHANGE: psd.key_exchange,
        Service.LOGOFF: psd.logoff,
        Service.LOGON: lambda: psd.logon("nobody", "Wrong-password-00"),
        Service.MODIFY_USER: lambda: psd.modify_user(
            walk_user, Role.KEY_CUSTODIAN, "Walk-user-pass-02"
        ),
        Service.RETRIEVE_PSD_STATUS: psd.retrieve_psd_status,
        Service.RETRIEVE_PSD_PUBLIC_KEY: psd.retrieve_psd_public_key,
        Service.SET_CLOCK: lambda: psd.set_clock(psd.meter_now() + timedelta(seconds=60)),
        Service.REQUEST_STATUS: psd.request_status,
        Service.UPDATE_PSC: lambda: psd.update_psc(f"1.0.{ROLE_ORDER.index(role) + 1}"),
        Service.VIEW_USERS: psd.view_users,
        Service.VIEW_AUDIT_LOG: psd.view_audit_log,
        Service.SAVE_AUDIT_LOG: lambda: psd.save_audit_log(tmp / f"save-{role.value}.json"),
        Service.ARCHIVE_AUDIT_LOG: lambda: psd.archive_audit_log(
            tmp / f"archive-{role.value}.json"
        ),
        Service.DELETE_AUDIT_RECORDS: psd.delete_audit_records,
    }


def _snapshot(psd: PSD) -> dict[str, Any]:
    """What a denied call must not change: registers, users, device state, key state."""
    status = psd._status()
    return {
        "registers": status["registers"],
        "users": [u.to_json() for u in psd.users.users()],
        "state": psd._device_state(),
        "keys": status["keys"],
        "session": psd.session_info()["open"],
    }


def test_table_2_has_25_services_and_the_auditor_duties() -> None:
    assert len(TABLE_2) == 25
    assert set(MATRIX) == set(Service)
    assert all(allowed(r, Service.REQUEST_STATUS) for r in Role)
    assert not allowed(Role.CUSTOMER, Service.LOGOFF)  # the table marks AD, AU, KC, SO only


def test_every_cell_of_the_matrix(device_home: Home, tmp_path: Path) -> None:
    cells = 0
    other_failures: list[str] = []
    for role in ROLE_ORDER:
        psd = PSD.power_up(device_home.open_device_token(), device_home.device)
        try:
            if role is not Role.NO_ROLE:
                user, password = ROLE_USERS[role.value]
                psd.logon(user, password)
            calls = _calls(psd, device_home, tmp_path, role)
            for service in ORDER:
                if service is Service.LOGOFF and role is not Role.NO_ROLE:
                    caller_role = psd.caller().role  # still logged on?
                    assert caller_role is role
                expect = allowed(psd.caller().role, service)
                before = _snapshot(psd)
                audit_before = len(psd.audit.records())
                try:
                    calls[service]()
                except AccessDenied as exc:
                    assert not expect, f"{role} {service}: allowed cell denied: {exc}"
                    assert psd.caller().role.display in str(exc), str(exc)
                    assert service.display in str(exc), str(exc)
                    assert _snapshot(psd) == before, f"{role} {service}: denied call changed state"
                    last = psd.audit.records()[-1]
                    assert (last.service, last.outcome) == (service.value, "denied")
                    assert len(psd.audit.records()) == audit_before + 1
                except MeterError as exc:
                    assert expect, (
                        f"{role} {service}: denied cell raised {type(exc).__name__}: {exc}"
                    )
                    other_failures.append(f"{role.value} {service.value}: {type(exc).__name__}")
                else:
                    assert expect, f"{role} {service}: denied cell succeeded"
                cells += 1
        finally:
            psd.power_down()
    assert cells == len(ROLE_ORDER) * len(ORDER)
    # The allowed cells that fail, and why: each for a reason of the device's state, not access.
    assert sorted(other_failures) == sorted(EXPECTED_OTHER_FAILURES), other_failures
