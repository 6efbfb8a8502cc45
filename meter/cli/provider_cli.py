"""``meter provider``: the provider's commands (the export post offices reconcile against)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of
from meter.durable import write_atomically
from meter.errors import ConfigurationError
from meter.provider import Provider

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
@click.pass_context
def export_credited(ctx: click.Context, out: Path) -> None:
    """Write every device's credited total, signed by the provider's token key.

    A post office reconciles against it (`meter postoffice reconcile
    --credited FILE`): an ascending register above the credited total is
    postage never paid for. Needs PROVIDER_USER_PIN.
    """
    with errors(ctx):
        home = home_of(ctx)
        with home.open_token("provider") as token:
            document = Provider.open(token, home.ledger).export_credited(datetime.now(UTC))
        text = json.dumps(document, indent=1, sort_keys=True) + "\n"
        try:  # whole or not at all: a post office never reads half an export
            write_atomically(out, text.encode(), mode=0o644)
        except OSError as exc:
            raise ConfigurationError(f"cannot write {out}: {exc.strerror}") from exc
        devices = document["devices"]
        assert isinstance(devices, dict)
        summary = {"out": str(out), "devices": len(devices), "total": sum(devices.values())}
        emit(
            ctx,
            summary,
            lambda: f"wrote {out}: credited totals of {len(devices)} devices, signed",
        )


# The provider service, its accounts ledger and its keys (a module of their own).
from meter.cli.provider_serve_cli import COMMANDS  # noqa: E402
from meter.cli.provider_status_cli import issue_status  # noqa: E402

for _command in (*COMMANDS, issue_status):
    provider.add_command(_command)
