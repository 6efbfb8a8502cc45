"""The steps the CLI strings together on the host: labels, credit, the demo's set-up.

Everything the meter does goes through the running device (meter.host):
this module holds no meter PIN and never opens the meter's token. It lays
labels out from the signed indicia the device returns, and, as the
development provider of the home, signs credit grants in the provider's own
token.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meter.cli.home import Home
from meter.errors import ConfigurationError
from meter.host import DeviceClient
from meter.indicium import Indicium
from meter.label import LabelInfo, render_label, write_label
from meter.protocol.issue import IssueRequest
from meter.provider import Provider
from meter.psd.roles import Role

__all__ = [
    "DEMO_CUSTOMER",
    "DEMO_USERS",
    "IssuedLabel",
    "credit_from_local_provider",
    "development_password",
    "format_mills",
    "issue_on",
    "setup_demo_device",
]

# The widest indicium (RSA-PSS-2048's 340 bytes): an address that fits beside its
# barcode fits beside every other algorithm's.
_PLACEHOLDER_LENGTH = 340


def format_mills(mills: int) -> str:
    return f"${mills // 1000}.{mills % 1000:03d}"


@dataclass(frozen=True)
class IssuedLabel:
    indicium: Indicium
    png: Path
    pdf: Path


def label_info(indicium: Indicium, address: Sequence[str]) -> LabelInfo:
    return LabelInfo(
        postage=format_mills(indicium.postage),
        date_of_mailing=indicium.date_of_mailing.isoformat(),
        origin_zip=indicium.origin_zip,
        device_serial=str(indicium.device_serial),
        sequence=str(indicium.sequence),
        rate=indicium.rate_category.title,
        destination_lines=tuple(address),
        specimen=indicium.is_specimen,
        correction=indicium.is_correction,
    )


def issue_on(
    client: DeviceClient,
    labels: Path,
    request: IssueRequest,
    out: Path | None = None,
    *,
    symbology: str = "pdf417",
) -> IssuedLabel:
    """Create Indicium (or Create Correction Indicium) on the device, then the label.

    The label is laid out with placeholder values first, so an address it
    cannot print (or an unknown symbology) is refused before the device
    spends a piece sequence.
    """
    lines = request.address_lines()
    placeholder = _placeholder_info(request, lines)
    render_label(bytes(_PLACEHOLDER_LENGTH), placeholder, symbology=symbology)
    folder = out.parent if out is not None else labels
    _require_writable(folder)  # a label that cannot be saved must not spend a piece
    indicium = client.issue(request)
    label = render_label(indicium.to_bytes(), label_info(indicium, lines), symbology=symbology)
    stem = out or labels / f"{indicium.device_serial}-{indicium.sequence:06d}"
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    try:
        write_label(label, png, pdf)
    except OSError as exc:
        raise ConfigurationError(
            f"piece {indicium.sequence} was issued, but its label could not be written to "
            f"{png} ({exc.strerror or exc}); the indicium, to print it again: "
            f"{indicium.to_bytes().hex()}"
        ) from exc
    return IssuedLabel(indicium, png, pdf)


def _require_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"labels cannot be written to {folder} ({exc.strerror or exc}): choose a folder "
            "of your own with --out; nothing was issued"
        ) from exc


def _placeholder_info(request: IssueRequest, lines: Sequence[str]) -> LabelInfo:
    """The widest values the indicium's human-readable fields can take, with the real address."""
    return LabelInfo(
        postage=format_mills(max(request.postage, 0)),
        date_of_mailing="2026-12-31",
        origin_zip=request.origin_zip or "00000",
        device_serial="18446744073709551615",
        sequence="4294967295",
        rate=request.rate_category.title,
        destination_lines=tuple(lines),
        specimen=request.specimen,
        correction=request.correction_of is not None,
    )


def credit_from_local_provider(client: DeviceClient, home: Home, amount: int) -> dict[str, Any]:
    """Download Postage Value: the device's request, a grant from the home's development
    provider (its own token, PROVIDER_USER_PIN), the grant back to the device."""
    request = client.request_credit()
    with home.open_token("provider") as token:
        grant = Provider.open(token, home.ledger).grant_credit(
            request, amount, datetime.now(UTC).replace(microsecond=0)
        )
    result: dict[str, Any] = client.apply_credit(grant)
    return result


# The demo's users beyond the first two, one per remaining role.
DEMO_USERS = (
    ("customer", Role.CUSTOMER),
    ("provider", Role.PROVIDER),
    ("authority", Role.CERTIFICATE_AUTHORITY),
    ("auditor", Role.AUDITOR),
    ("custodian", Role.KEY_CUSTODIAN),
)
DEMO_CUSTOMER = "DEMO-0001"


def development_password(user_id: str) -> str:
    """A random password that meets the default policy (all four classes, not the user id)."""
    while True:
        password = f"{secrets.token_urlsafe(15)}-Aa1"
        if user_id.casefold() not in password.casefold():
            return password


def setup_demo_device(
    home: Home,
    passwords: dict[str, str],
    credit_mills: int,
    admin_user: str = "admin",
    so_user: str = "security",
) -> dict[str, Any]:
    """On a running, newly provisioned device: every role gets a user; audit key,
    administration and customer authorized, and the provider downloads postage.
    Each step is its own session (its own connection), as Table 2 lets only some roles
    log off."""
    with DeviceClient(home.socket, home=home.path) as client:
        client.logon(so_user, passwords[so_user])
        client.post("/v1/administration", {"authorize": True})
        client.post("/v1/audit-key")
    with DeviceClient(home.socket, home=home.path) as client:
        client.logon(admin_user, passwords[admin_user])
        for user_id, role in DEMO_USERS:
            body = {"user_id": user_id, "role": role.value, "password": passwords[user_id]}
            client.post("/v1/users", body)
    with DeviceClient(home.socket, home=home.path) as client:
        client.logon("provider", passwords["provider"])
        client.post("/v1/customer", {"customer": DEMO_CUSTOMER})
        return credit_from_local_provider(client, home, credit_mills)
