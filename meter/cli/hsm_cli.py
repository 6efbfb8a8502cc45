"""``meter hsm probe``: check an HSM profile's claims against the real token.

The user PIN comes from ``HSM_USER_PIN`` or a hidden prompt, never a flag.
The probe makes only session objects, plus private data objects under a
label unique to the run that it destroys before it ends.
"""

from __future__ import annotations

from pathlib import Path

import click

from meter.cli.common import emit, errors
from meter.cli.home import pin_from_env
from meter.cli.main import cli
from meter.token import load_profile
from meter.token.probe import format_report, probe

__all__ = ["PIN_VARIABLE", "hsm"]

PIN_VARIABLE = "HSM_USER_PIN"
UNUSABLE_EXIT = 3  # the probe ran; the token cannot carry the meter with this profile


@cli.group()
def hsm() -> None:
    """The HSM behind the meter: what it can do, measured."""


@hsm.command("probe")
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HSM profile file (default: the one given to `meter --profile`, else softhsm2).",
)
@click.option("--slot", type=click.IntRange(min=0), default=None, help="Slot number to probe.")
@click.option("--token-label", default=None, help="Label of the token to probe.")
@click.pass_context
def probe_command(
    ctx: click.Context, profile_path: Path | None, slot: int | None, token_label: str | None
) -> None:
    """List the token's mechanisms, try every operation the meter needs, and judge.

    Exit status 0 when the verdict is "ok", 3 when "unusable", 1 on an error.
    """
    with errors(ctx):
        if slot is not None and token_label is not None:
            raise click.UsageError("give --slot or --token-label, not both")
        profile = load_profile(profile_path or ctx.find_root().obj["profile"])
        pin = pin_from_env(PIN_VARIABLE, f"user PIN of the token ({profile.name})")
        report = probe(profile, pin, slot=slot, token_label=token_label)
        emit(ctx, report.to_json(), lambda: format_report(report))
        if report.verdict != "ok":
            ctx.exit(UNUSABLE_EXIT)
