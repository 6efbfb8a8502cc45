"""``meter provider fund|add-customer|account|expired|authorize-meter|migrate|keys``.

The accounts ledger is the home's SQLite file (``HOME/provider/accounts.db``)
unless ``--db`` names another file or a postgresql:// URL (its password from
the URL or libpq's PGPASSWORD/.pgpass; never echoed). ``fund`` and
``add-customer`` work on the ledger directly, or through a running service
with ``--service URL`` and the operator key in METER_PROVIDER_KEY. ``keys``
manages the service's operator keys (meter.cli.provider_keys_cli). ``serve`` is in
meter.cli.provider_serve_cli.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from meter.cli.common import emit, errors, home_of, parse_postage
from meter.cli.home import Home
from meter.cli.provider_keys_cli import default_keys, keys
from meter.durable import write_atomically
from meter.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigurationError,
    InsufficientFunds,
    InvalidInput,
    MeterError,
    ProtocolError,
)
from meter.protocol.reload import PREPARE_TIMEOUT
from meter.provider.ledger_sql import SqlLedger, copy_ledger, open_ledger

__all__ = [
    "DB_OPTION",
    "EXPIRED_NOTE",
    "LEDGER_COMMANDS",
    "default_keys",
    "default_ledger",
    "format_dollars",
    "ledger_location",
]

KEY_VARIABLE = "METER_PROVIDER_KEY"
_SERVICE_ERRORS: dict[str, type[MeterError]] = {
    "InsufficientFunds": InsufficientFunds,
    "ProtocolError": ProtocolError,
    "Unauthorized": AuthenticationFailed,
    "Forbidden": AccessDenied,
}


def default_ledger(home: Home) -> Path:
    return home.path / "provider" / "accounts.db"


def format_dollars(mills: int) -> str:
    return f"${mills // 1000}.{mills % 1000:03d}"


def ledger_location(ctx: click.Context, db: str | None) -> str:
    return db if db else str(default_ledger(home_of(ctx)))


def _with_ledger(ctx: click.Context, db: str | None, work: Callable[[SqlLedger], Any]) -> Any:
    ledger = open_ledger(ledger_location(ctx, db))
    try:
        return work(ledger)
    finally:
        ledger.close()


DB_OPTION = click.option(
    "--db",
    default=None,
    metavar="PATH|URL",
    help="The accounts ledger: a SQLite file or a postgresql:// URL "
    "(default: HOME/provider/accounts.db).",
)
_SERVICE = click.option(
    "--service",
    default=None,
    metavar="URL",
    help=f"A running provider service (http://host:port) instead of the ledger; "
    f"the operator key comes from {KEY_VARIABLE}.",
)


def _call_service(url: str, method: str, path: str, body: dict[str, Any] | None) -> Any:
    key = os.environ.get(KEY_VARIABLE)
    if not key:
        raise ConfigurationError(f"an operator key is needed: set {KEY_VARIABLE}")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            refusal = json.loads(exc.read())
            kind, message = str(refusal["error"]), str(refusal["message"])
        except (ValueError, KeyError, TypeError):
            kind, message = "InvalidInput", f"HTTP {exc.code} from {url}"
        raise _SERVICE_ERRORS.get(kind, InvalidInput)(message) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigurationError(f"cannot reach the provider service at {url}: {exc}") from exc


@click.command("add-customer")
@click.argument("customer")
@click.argument("name")
@DB_OPTION
@_SERVICE
@click.pass_context
def add_customer(
    ctx: click.Context, customer: str, name: str, db: str | None, service: str | None
) -> None:
    """Open an account for CUSTOMER (1-64 letters, digits, . _ -) named NAME."""
    with errors(ctx):
        if service:
            _call_service(service, "POST", "/v1/customers", {"customer": customer, "name": name})
        else:
            _with_ledger(ctx, db, lambda lg: lg.create_customer(customer, name, datetime.now(UTC)))
        emit(ctx, {"customer": customer, "name": name}, lambda: f"customer {customer} opened")


@click.command("fund")
@click.argument("customer")
@click.argument("amount")
@click.option(
    "--reference",
    default=None,
    help="The payment's reference, unique per customer (default: a new random one).",
)
@DB_OPTION
@_SERVICE
@click.pass_context
def fund(
    ctx: click.Context,
    customer: str,
    amount: str,
    reference: str | None,
    db: str | None,
    service: str | None,
) -> None:
    """Record a payment of AMOUNT dollars (e.g. 50.00) into CUSTOMER's funds.

    Stands in for a payment system. A zero or negative amount, an unknown
    customer or a reference used before is refused and changes nothing.
    """
    with errors(ctx):
        mills = parse_postage(amount)
        ref = reference or f"cli-{secrets.token_hex(8)}"
        if service:
            answer = _call_service(
                service,
                "POST",
                f"/v1/customers/{customer}/fund",
                {"amount": mills, "reference": ref},
            )
            available = int(answer["available"])
        else:
            available = _with_ledger(
                ctx, db, lambda lg: lg.fund(customer, mills, ref, datetime.now(UTC))
            )
        emit(
            ctx,
            {"customer": customer, "amount": mills, "reference": ref, "available": available},
            lambda: (
                f"{customer}: paid in {format_dollars(mills)} ({ref}); "
                f"available {format_dollars(available)}"
            ),
        )


@click.command("account")
@click.argument("customer")
@DB_OPTION
@click.pass_context
def account(ctx: click.Context, customer: str, db: str | None) -> None:
    """Show CUSTOMER's funds and meters."""
    with errors(ctx):
        found = _with_ledger(ctx, db, lambda lg: lg.account(customer))
        data = {
            "customer": found.customer,
            "name": found.name,
            "available": found.available,
            "funded": found.funded,
            "refunded": found.refunded,
            "reserved": found.reserved,
            "credited": found.credited,
            "meters": list(found.meters),
        }
        emit(
            ctx,
            data,
            lambda: (
                f"{found.customer} ({found.name}): available {format_dollars(found.available)}, "
                f"paid in {format_dollars(found.funded)}, credited "
                f"{format_dollars(found.credited)}, reserved {format_dollars(found.reserved)}; "
                f"meters {', '.join(map(str, found.meters)) or 'none'}"
            ),
        )


EXPIRED_NOTE = (
    "their funds stay reserved until the meter's next contact (a reload, or a device audit) "
    "settles each one; they are never released blindly: the meter may have applied the "
    "grant and its receipt may still be on its way"
)


def _instant(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--now {text!r} is not an ISO 8601 time") from None
    if at.tzinfo is None:
        raise InvalidInput(f"--now {text!r} has no time zone (e.g. 2026-12-02T09:00:00+00:00)")
    return at.astimezone(UTC)


def _minutes(span: timedelta) -> str:
    return f"{span.total_seconds() / 60:.0f} min"


@click.command("expired")
@click.option(
    "--now",
    "at",
    default=None,
    metavar="TIME",
    help="Judge at this ISO 8601 time instead of the clock (e.g. what will be past its "
    "timeout by then).",
)
@DB_OPTION
@click.pass_context
def expired(ctx: click.Context, at: str | None, db: str | None) -> None:
    """List PREPARED reload transactions past their timeout (15 minutes).

    Each is a grant whose meter has not answered for it since: its fate is fixed
    (the meter can no longer apply it), and the meter's next contact settles it,
    committing on its receipt or aborting on its signed "not applied". Nothing is
    released here: a blind abort could release funds the meter was credited with.
    """
    with errors(ctx):
        now = _instant(at)
        found = _with_ledger(ctx, db, lambda lg: lg.expired(now))
        rows = [
            {
                "transaction_id": t.transaction_id.hex(),
                "device_serial": t.device_serial,
                "customer": t.customer,
                "amount": t.amount,
                "prepared_at": t.prepared_at.isoformat(),
                "expires_at": t.expires_at.isoformat(),
                "age_s": int((now - t.prepared_at).total_seconds()),
            }
            for t in found
        ]
        reserved = sum(t.amount for t in found)

        def text() -> str:
            if not found:
                return f"no PREPARED transaction is past its timeout at {now.isoformat()}"
            lines = [
                f"{len(found)} PREPARED transaction(s) past the {_minutes(PREPARE_TIMEOUT)} "
                f"timeout at {now.isoformat()}, {format_dollars(reserved)} reserved:"
            ]
            lines += [
                f"  {t.transaction_id.hex()}  meter {t.device_serial}  {t.customer}  "
                f"{format_dollars(t.amount)}  prepared {t.prepared_at.isoformat()}  "
                f"age {_minutes(now - t.prepared_at)}"
                for t in found
            ]
            return "\n".join([*lines, f"{EXPIRED_NOTE[0].upper()}{EXPIRED_NOTE[1:]}."])

        emit(
            ctx,
            {
                "now": now.isoformat(),
                "timeout_s": int(PREPARE_TIMEOUT.total_seconds()),
                "expired": rows,
                "reserved": reserved,
                "note": EXPIRED_NOTE,
            },
            text,
        )


@click.command("authorize-meter")
@click.argument("customer")
@click.argument("device_serial", type=int)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File for the signed record (give it to the meter: meter authorize-customer FILE).",
)
@DB_OPTION
@click.pass_context
def authorize_meter_command(
    ctx: click.Context, customer: str, device_serial: int, out: Path, db: str | None
) -> None:
    """Authorize meter DEVICE_SERIAL to CUSTOMER and write the provider-signed record.

    Needs PROVIDER_USER_PIN. Refused for an unknown customer or a meter
    authorized to another customer.
    """
    with errors(ctx):
        from meter.provider import Provider
        from meter.provider.customers import authorize_meter

        home = home_of(ctx)

        def sign(ledger: SqlLedger) -> Any:
            with home.open_token("provider") as token:
                provider = Provider.open(token, home.ledger)
                return authorize_meter(provider, ledger, customer, device_serial, datetime.now(UTC))

        record = _with_ledger(ctx, db, sign)
        try:
            text = json.dumps(record.to_json(), indent=1) + "\n"
            write_atomically(out, text.encode(), mode=0o644)
        except OSError as exc:
            raise ConfigurationError(f"cannot write {out}: {exc.strerror}") from exc
        emit(
            ctx,
            {"out": str(out), "authorization": record.to_json()},
            lambda: f"meter {device_serial} authorized to {customer}; signed record in {out}",
        )


@click.command("migrate")
@click.option("--to", "target", required=True, metavar="URL", help="postgresql://... (empty).")
@DB_OPTION
@click.pass_context
def migrate(ctx: click.Context, target: str, db: str | None) -> None:
    """Copy the SQLite ledger into an empty PostgreSQL database, checking every total.

    All or nothing: the copy commits only when its counts and sums equal the
    source's and every customer's balance adds up. Stop the service first.
    """
    with errors(ctx):
        if not target.startswith(("postgresql://", "postgres://")):
            raise InvalidInput("--to must be a postgresql:// URL")

        def move(source: SqlLedger) -> dict[str, int]:
            destination = open_ledger(target)
            try:
                return copy_ledger(source, destination)
            finally:
                destination.close()

        totals = _with_ledger(ctx, db, move)
        emit(
            ctx,
            totals,
            lambda: (
                f"copied {totals['customers']} customers, {totals['meters']} meters, "
                f"{totals['transactions']} transactions; totals agree. Serve with --db URL now."
            ),
        )


LEDGER_COMMANDS = (add_customer, fund, account, expired, authorize_meter_command, migrate, keys)
