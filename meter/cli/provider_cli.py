"""``meter provider``: the provider's commands (the export post offices reconcile against)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.provider_ledger_cli import DB_OPTION, ledger_location
from meter.durable import write_atomically
from meter.errors import ConfigurationError
from meter.provider import Provider
from meter.provider.ledger_sql import SqlLedger, open_ledger

__all__ = ["provider"]


@click.group()
def provider() -> None:
    """Run the provider: its service and accounts ledger, exports for post offices."""


@provider.command("export-credited")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write the signed export to (JSON, format pim-credited-v1).",
)
@DB_OPTION
@click.pass_context
def export_credited(ctx: click.Context, out: Path, db: str | None) -> None:
    """Write every device's credited total, signed by the provider's token key.

    The total is the credit the accounts ledger (--db, the one `meter provider
    serve` uses) COMMITTED to the meter, reloads included, plus the home's local
    signed grants. A post office reconciles against it (`meter postoffice
    reconcile --credited FILE`): a control total above it is credit never
    granted. Needs PROVIDER_USER_PIN.
    """
    with errors(ctx):
        home = home_of(ctx)
        location = ledger_location(ctx, db)
        accounts = _accounts_ledger(location, explicit=db is not None)
        try:
            with home.open_token("provider") as token:
                document = Provider.open(token, home.ledger).export_credited(
                    datetime.now(UTC), accounts
                )
        finally:
            if accounts is not None:
                accounts.close()
        text = json.dumps(document, indent=1, sort_keys=True) + "\n"
        try:  # whole or not at all: a post office never reads half an export
            write_atomically(out, text.encode(), mode=0o644)
        except OSError as exc:
            raise ConfigurationError(f"cannot write {out}: {exc.strerror}") from exc
        devices = document["devices"]
        assert isinstance(devices, dict)
        named = None if accounts is None else _shown(location)
        summary = {
            "out": str(out),
            "devices": len(devices),
            "total": sum(devices.values()),
            "accounts_ledger": named,
        }
        emit(
            ctx,
            summary,
            lambda: (
                f"wrote {out}: credited totals of {len(devices)} devices, signed"
                + (
                    f" (accounts ledger {named})"
                    if named
                    else " (local grants only: no accounts ledger)"
                )
            ),
        )


def _shown(location: str) -> str:
    """A ledger location as output may show it: a PostgreSQL URL without its password."""
    if "://" not in location:
        return location
    from meter.provider.ledger_postgres import redacted

    return redacted(location)


def _accounts_ledger(location: str, *, explicit: bool) -> SqlLedger | None:
    """The accounts ledger to export from. The home's default SQLite file may not exist yet
    (a home whose provider never served): then there is no reload credit to export. A
    ledger named with --db must exist: a mistyped path would export too little credit."""
    if "://" not in location and not Path(location).exists():
        if explicit:
            raise ConfigurationError(
                f"no accounts ledger at {location}: give the --db that `meter provider serve` "
                "uses; nothing was written"
            )
        return None
    return open_ledger(location)


# The provider service, its accounts ledger and its keys (a module of their own).
from meter.cli.provider_serve_cli import COMMANDS  # noqa: E402
from meter.cli.provider_status_cli import issue_status  # noqa: E402

for _command in (*COMMANDS, issue_status):
    provider.add_command(_command)
