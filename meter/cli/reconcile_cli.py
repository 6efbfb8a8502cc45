"""``meter postoffice reconcile``: check the registers of every piece this post office accepted."""

from __future__ import annotations

from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.postoffice_cli import certs_opt, ledger_path, open_ledger, root_opt, trust_of
from meter.cli.postoffice_group import postoffice
from meter.errors import InvalidInput
from meter.postoffice.reconcile import ReconciliationReport, load_credited, reconcile

__all__ = ["FINDINGS_EXIT", "reconcile_command"]

FINDINGS_EXIT = 3  # the report holds findings: evidence of a tampered, rolled-back or cloned meter


@postoffice.command("reconcile")
@click.option(
    "--ledger",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Register ledger (default HOME/postoffice/registers.sqlite).",
)
@click.option(
    "--credited",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    multiple=True,
    help="A provider's signed export of credited totals (`meter provider export-credited`); "
    "repeatable, one per provider.",
)
@root_opt
@certs_opt
@click.pass_context
def reconcile_command(
    ctx: click.Context,
    ledger: Path | None,
    credited: tuple[Path, ...],
    root: Path | None,
    certs: tuple[Path, ...],
) -> None:
    """Reconcile the registers of every piece in the register ledger, device by device.

    Flags ascending registers that do not grow by exactly each piece's postage,
    ascending + descending that falls, one piece sequence issued twice
    (rollback or clone), and, with --credited, registers above what the
    provider credited. Exit status 0 when clean, 3 with findings, 1 for an error.
    """
    with errors(ctx):
        home = home_of(ctx)
        totals: dict[int, int] | None = None
        if credited:
            trust, _ = trust_of(home, root, certs, None)
            totals = {}
            for path in credited:
                loaded = load_credited(path, trust)
                twice = sorted(set(loaded) & set(totals))
                if twice:
                    raise InvalidInput(
                        f"credited export {path} lists device {twice[0]} that another export "
                        "lists too: give each provider's export once"
                    )
                totals.update(loaded)
        path = ledger or ledger_path(home)
        if not path.exists():
            raise InvalidInput(f"register ledger {path} does not exist: nothing was verified yet")
        with open_ledger(home, path) as books:
            report = reconcile(books, totals)
        emit(ctx, report.to_json(), lambda: report_text(report))
        if not report.clean:
            ctx.exit(FINDINGS_EXIT)


def report_text(report: ReconciliationReport) -> str:
    header = (
        f"{'device':>20}  {'pieces':>7}  {'first':>7}  {'last':>7}  {'missing':>7}  "
        f"{'ascending':>12}  {'descending':>12}  {'credited':>12}"
    )
    lines = [header]
    for d in report.devices:
        lines.append(
            f"{d.device_serial:>20}  {d.pieces:>7}  {_or_dash(d.first_sequence):>7}  "
            f"{_or_dash(d.last_sequence):>7}  {d.missing:>7}  {_or_dash(d.last_ascending):>12}  "
            f"{_or_dash(d.last_descending):>12}  {_or_dash(d.credited):>12}"
        )
    if not report.credited_checked:
        lines.append("(no provider export given: registers not checked against credited totals)")
    if report.clean:
        lines.append("clean: no findings")
    else:
        lines.append(f"{len(report.findings)} findings:")
        for f in report.findings:
            pieces = ",".join(str(s) for s in f.sequences)
            lines.append(f"  device {f.device_serial} {f.kind.value} [{pieces}]: {f.detail}")
    return "\n".join(lines)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)
