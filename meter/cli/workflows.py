"""The steps the CLI strings together on the host: labels, credit, the demo's set-up.

Everything the meter does goes through the running device (meter.host):
this module holds no meter PIN and never opens the meter's token. It lays
labels out from the signed indicia the device returns, and, as the
development provider of the home, signs credit grants in the provider's own
token.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meter.cli.batch_csv import BatchRow
from meter.cli.home import Home
from meter.errors import (
    ConfigurationError,
    InsufficientFunds,
    InvalidInput,
    MeterError,
    TokenUnavailable,
)
from meter.host import DeviceClient
from meter.indicium import Indicium
from meter.label import LabelInfo, render_label, write_label
from meter.label.layout import check_label
from meter.label.sheets import LAYOUTS, SheetLabel, SheetResult, write_sheets
from meter.protocol.batch import split_batches
from meter.protocol.issue import IssueRequest
from meter.provider import Provider
from meter.psd.roles import Role

__all__ = [
    "DEMO_CUSTOMER",
    "DEMO_USERS",
    "BatchIssued",
    "IssuedLabel",
    "credit_from_local_provider",
    "development_password",
    "format_mills",
    "issue_batch_on",
    "issue_on",
    "local_customer_authorization",
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
        # Priced by the device from a weight: the widest amount a table could ask.
        postage=format_mills(99_999 if request.postage is None else max(request.postage, 0)),
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


def local_customer_authorization(
    home: Home, customer: str, device_serial: int | None = None
) -> dict[str, Any]:
    """Authorize Customer's record from the home's development provider (PROVIDER_USER_PIN):
    the home's meter (or ``device_serial``) bound to ``customer`` in the home's accounts
    ledger, the account opened if it is new, and the provider-signed record as JSON."""
    from meter.cli.provider_serve_cli import default_ledger
    from meter.provider.customers import authorize_meter
    from meter.provider.ledger_sql import open_ledger

    if device_serial is None:
        device_serial = _home_meter_serial(home)
    now = datetime.now(UTC).replace(microsecond=0)
    ledger = open_ledger(default_ledger(home))
    try:
        if customer not in ledger.customers():
            ledger.create_customer(customer, f"customer {customer}", now)
        with home.open_token("provider") as token:
            record = authorize_meter(
                Provider.open(token, home.ledger), ledger, customer, device_serial, now
            )
    finally:
        ledger.close()
    return record.to_json()


def _home_meter_serial(home: Home) -> int:
    from cryptography import x509

    path = home.certs / "meter.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read the meter's certificate {path} ({exc}): provision the home first"
        ) from exc
    serials = cert.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
    return int(str(serials[0].value))


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
        authorization = local_customer_authorization(home, DEMO_CUSTOMER)
        client.post("/v1/customer", {"authorization": authorization})
        return credit_from_local_provider(client, home, credit_mills)


# -- batches (meter issue-batch) ---------------------------------------------------------

_DEVICE_PIECE = re.compile(r"^piece (\d+) of the batch: (.*)$", re.DOTALL)


@dataclass(frozen=True)
class BatchIssued:
    """What `issue_batch_on` did: the pieces issued, in the rows' order, and their PDF."""

    indicia: tuple[Indicium, ...]
    batches: tuple[dict[str, Any], ...]  # per device batch: rows, sequences, postage
    sheets: SheetResult

    def summary(self) -> dict[str, Any]:
        return {
            "pdf": str(self.sheets.path),
            "pieces": len(self.indicia),
            "pages": self.sheets.pages,
            "layout": self.sheets.layout,
            "workers": self.sheets.workers,
            "first_sequence": self.indicia[0].sequence,
            "last_sequence": self.indicia[-1].sequence,
            "total_postage": sum(i.postage for i in self.indicia),
            "descending": self.indicia[-1].descending,
            "batches": list(self.batches),
        }


def issue_batch_on(
    client: DeviceClient,
    rows: Sequence[BatchRow],
    out: Path,
    *,
    layout: str = "4x6",
    symbology: str = "pdf417",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> BatchIssued:
    """Create Indicium for every row, in device batches (one durable debit each), then
    every label into the one PDF ``out``, laid out on ``workers`` processes.

    Refused before anything is issued: a row whose label cannot be printed, a layout
    or folder that cannot be written, rows that total more than the descending
    register. A device batch refused after earlier ones were issued still gets the
    earlier ones' labels written; the error says which rows were issued.
    """
    if layout not in LAYOUTS:
        raise InvalidInput(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    for row in rows:
        lines = row.request.address_lines()
        try:
            check_label(_placeholder_info(row.request, lines), symbology=symbology)
        except MeterError as exc:
            raise InvalidInput(
                f"{row.where()}, field 'address': {exc}; nothing was issued"
            ) from exc
    _require_writable(out.parent)
    total = sum(r.request.postage or 0 for r in rows)  # rows priced by weight: the device checks
    descending = int(client.get("/v1/psd-status")["descending"])
    if total > descending:
        raise InsufficientFunds(
            f"the {len(rows)} rows total {format_mills(total)}, more than the descending "
            f"register ({format_mills(descending)}); nothing was issued"
        )
    indicia: list[Indicium] = []
    batches: list[dict[str, Any]] = []
    failure: MeterError | None = None
    requests = [r.request for r in rows]
    for start, chunk in split_batches(requests):
        try:
            result = client.issue_batch(chunk)
        except MeterError as exc:
            failure = _batch_refusal(exc, rows, start, len(chunk))
            break
        indicia += result.indicia
        batches.append(
            {
                "rows": [rows[start].row, rows[start + len(chunk) - 1].row],
                "first_sequence": result.first_sequence,
                "last_sequence": result.last_sequence,
                "total_postage": result.total_postage,
            }
        )
    if not indicia:
        assert failure is not None
        raise failure
    labels = [
        SheetLabel(ind.to_bytes(), label_info(ind, row.request.address_lines()), symbology)
        for ind, row in zip(indicia, rows, strict=False)
    ]
    try:
        sheets = write_sheets(labels, out, layout=layout, workers=workers, progress=progress)
    except OSError as exc:
        raise ConfigurationError(
            f"pieces {indicia[0].sequence}-{indicia[-1].sequence} were issued, but their "
            f"labels could not be written to {out} ({exc.strerror or exc}); the indicia are "
            "in the device's audit log"
        ) from exc
    if failure is not None:
        done = rows[len(indicia) - 1].row
        raise type(failure)(
            f"rows 1-{done} were issued (pieces {indicia[0].sequence}-{indicia[-1].sequence}) "
            f"and their labels written to {sheets.path}; then: {failure}"
        )
    return BatchIssued(tuple(indicia), tuple(batches), sheets)


def _batch_refusal(exc: MeterError, rows: Sequence[BatchRow], start: int, size: int) -> MeterError:
    """The device's refusal of a batch, its "piece N" turned into the file's row."""
    first, last = rows[start], rows[start + size - 1]
    found = _DEVICE_PIECE.match(str(exc))
    if found is not None and 0 < int(found.group(1)) <= size:
        row = rows[start + int(found.group(1)) - 1]
        return type(exc)(f"{row.where()}: the device refused it: {found.group(2)}")
    if isinstance(exc, TokenUnavailable):
        return TokenUnavailable(
            f"{exc}. Rows {first.row}-{last.row} were in flight: if Retrieve PSD Status shows "
            "the piece count advanced by them, they were debited and are lost with the batch "
            "(the audit log has its create-indicium-batch record); issue them again"
        )
    return type(exc)(f"rows {first.row}-{last.row}: {exc}")
