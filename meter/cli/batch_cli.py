"""``meter issue-batch CSV --out FILE.pdf``: a mailer's batch, issued and printed at once."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from meter.cli import workflows
from meter.cli.batch_csv import read_batch_csv
from meter.cli.common import emit, errors
from meter.cli.device_session import device
from meter.cli.main import cli
from meter.errors import InvalidInput
from meter.label import SYMBOLOGIES
from meter.label.sheets import LAYOUTS

__all__ = ["issue_batch"]


@cli.command("issue-batch")
@click.argument("csv_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The PDF of all the labels (written whole, or not at all).",
)
@click.option(
    "--layout",
    type=click.Choice(list(LAYOUTS)),
    default="4x6",
    show_default=True,
    help="4x6: a label a page (label printers); letter-2up: two full-size labels a letter "
    "page, turned; letter-2x2: four a letter page, at 11/12 size.",
)
@click.option(
    "--symbology",
    type=click.Choice(SYMBOLOGIES),
    default="pdf417",
    show_default=True,
    help="Barcode the labels carry the indicia in.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes laying the labels out (default: one per core).",
)
@click.pass_context
def issue_batch(
    ctx: click.Context,
    csv_file: Path,
    out: Path,
    layout: str,
    symbology: str,
    workers: int | None,
) -> None:
    """Create Indicium (Customer) for every row of CSV_FILE, and their labels in one PDF.

    The file is checked whole first (a bad row is named, with its column, and nothing
    is issued). The device debits each batch of up to 1,000 pieces in one durable
    write; the pieces have consecutive sequences. See docs/cli.md for the columns.
    """
    with errors(ctx):
        if out.suffix.lower() != ".pdf":
            raise InvalidInput(f"--out {out}: the labels are one PDF: name a .pdf file")
        rows = read_batch_csv(csv_file)
        with device(ctx) as client, _progress(len(rows)) as progress:
            issued = workflows.issue_batch_on(
                client,
                rows,
                out,
                layout=layout,
                symbology=symbology,
                workers=workers,
                progress=progress,
            )
        summary = issued.summary()
        emit(ctx, summary, lambda: _text(summary))


@contextmanager
def _progress(length: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar of the labels drawn, on stderr when it is a terminal (else none)."""
    if not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=length, label="labels", file=sys.stderr) as bar:
        yield bar.update


def _text(summary: dict[str, Any]) -> str:
    return (
        f"{summary['pieces']} pieces {summary['first_sequence']}-{summary['last_sequence']}: "
        f"{workflows.format_mills(summary['total_postage'])} in {len(summary['batches'])} "
        f"device batch(es); descending register {workflows.format_mills(summary['descending'])}\n"
        f"labels: {summary['pdf']} ({summary['pages']} pages, {summary['layout']})"
    )
