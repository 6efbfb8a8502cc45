"""The device's administration as ``meter`` commands: Key Administration, Administration
Authorization, Update PSC, Set Clock, Authorize PSD and Authorize Customer.

Clients of the running device, as every device command (meter.cli.device_cli).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click

from meter.cli import workflows
from meter.cli.common import errors, home_of
from meter.cli.device_cli import post_call, run_service
from meter.errors import InvalidInput

__all__ = ["register"]


def register(cli: click.Group) -> None:
    """Add the Security Officer's, Administrator's and authorizations' commands."""

    @cli.command()
    @click.option(
        "--action",
        type=click.Choice(["list", "activate-signing-key", "deactivate-signing-key"]),
        default="list",
        show_default=True,
    )
    @click.pass_context
    def keys(ctx: click.Context, action: str) -> None:
        """Key Administration (Security Officer): the keys and their state."""
        run_service(ctx, post_call("/v1/keys", {"action": action}))

    @cli.command("authorize-administration")
    @click.option("--revoke", is_flag=True, help="Withdraw the authorization instead.")
    @click.pass_context
    def authorize_administration(ctx: click.Context, revoke: bool) -> None:
        """Administration Authorization (Security Officer): may administrators manage users?"""
        run_service(ctx, post_call("/v1/administration", {"authorize": not revoke}))

    @cli.command("update-psc")
    @click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
    @click.pass_context
    def update_psc(ctx: click.Context, bundle: Path) -> None:
        """Update PSC (Security Officer): install a provider-signed update BUNDLE
        (as `meter update install`; docs/updates.md)."""
        with errors(ctx):
            try:
                text = bundle.read_bytes().decode("utf-8", errors="replace")
            except OSError as exc:
                raise InvalidInput(f"cannot read {bundle}: {exc.strerror or exc}") from exc
        run_service(ctx, post_call("/v1/psc", {"bundle": text}))

    @cli.command("set-clock")
    @click.argument("time")
    @click.pass_context
    def set_clock(ctx: click.Context, time: str) -> None:
        """Set Clock (Administrator): TIME as ISO 8601 with a zone, e.g. 2026-11-22T10:00:00Z."""
        with errors(ctx):
            try:
                to = datetime.fromisoformat(time)
            except ValueError as exc:
                raise InvalidInput(f"time '{time}' is not ISO 8601") from exc
            if to.tzinfo is None:
                raise InvalidInput(
                    "the new time must carry a time zone (e.g. 2026-11-22T10:00:00Z)"
                )
            run_service(ctx, post_call("/v1/clock", {"time": to.isoformat()}))

    @cli.command("authorize-psd")
    @click.option(
        "--meter-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
    )
    @click.option(
        "--provider-cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
    )
    @click.option(
        "--root-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
    )
    @click.pass_context
    def authorize_psd(
        ctx: click.Context, meter_cert: Path, provider_cert: Path, root_cert: Path
    ) -> None:
        """Authorize PSD (Certificate Authority): load the meter's certificate chain."""
        with errors(ctx):
            body = {
                "meter_pem": _read_text(meter_cert),
                "provider_pem": _read_text(provider_cert),
                "root_pem": _read_text(root_cert),
            }
            run_service(ctx, post_call("/v1/certificates", body))

    @cli.command("authorize-customer")
    @click.argument(
        "record", required=False, type=click.Path(dir_okay=False, path_type=Path), default=None
    )
    @click.option(
        "--account",
        default=None,
        help="Have the home's development provider sign a record for ACCOUNT "
        "(needs PROVIDER_USER_PIN), instead of giving RECORD.",
    )
    @click.pass_context
    def authorize_customer(ctx: click.Context, record: Path | None, account: str | None) -> None:
        """Authorize Customer (Provider): install the provider-signed RECORD binding this
        device to a customer account (from `meter provider authorize-meter` or the
        provider service's POST /v1/customers/ID/meters)."""
        with errors(ctx):
            if (record is None) == (account is None):
                raise InvalidInput("give the provider's signed RECORD file, or --account ACCOUNT")
            if record is not None:
                try:
                    authorization = json.loads(record.read_bytes())
                except (OSError, ValueError) as exc:
                    raise InvalidInput(
                        f"{record}: not a JSON customer authorization ({exc})"
                    ) from exc
            else:
                assert account is not None
                authorization = workflows.local_customer_authorization(home_of(ctx), account)
            if isinstance(authorization, dict) and "authorization" in authorization:
                authorization = authorization["authorization"]  # the service's whole answer
        run_service(ctx, post_call("/v1/customer", {"authorization": authorization}))


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read it as a PEM file ({exc})") from exc
