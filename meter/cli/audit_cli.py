"""The ``meter audit`` group: the audit log. ``verify`` needs no logon, only the public key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from meter.cli.common import emit, errors
from meter.errors import InvalidInput
from meter.psd.audit_verify import VerifyReport, verify_export

__all__ = ["audit"]

BROKEN_EXIT = 2


@click.group()
def audit() -> None:
    """The meter's hash-chained, signed audit log: view, export, archive, verify."""


@audit.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The public audit key (PEM), as the Auditor exported it.",
)
@click.pass_context
def verify(ctx: click.Context, files: tuple[Path, ...], key_path: Path) -> None:
    """Check exported audit FILES offline, oldest archive first, latest export last.

    Prints "OK: N records, signed through record M", or "BROKEN at record K:
    reason" and exits with status 2. Errors (a missing file, a key that is not
    an ECDSA P-256 or RSA-2048 public key) exit with status 1.
    """
    with errors(ctx):
        try:
            key_pem = key_path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{key_path}: cannot read the audit key: {exc.strerror}") from exc
        report = verify_export(list(files), key_pem)
        emit(ctx, dataclasses.asdict(report), lambda: _text(report))
        if not report.ok:
            ctx.exit(BROKEN_EXIT)


def _text(report: VerifyReport) -> str:
    if report.ok:
        return (
            f"OK: {report.records} records, signed through record {report.signed_through}\n"
            f"{report.reason}"
        )
    where = f" at record {report.first_bad}" if report.first_bad is not None else ""
    return f"BROKEN{where}: {report.reason}"
