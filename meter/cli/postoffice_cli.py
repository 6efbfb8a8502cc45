"""``meter verify`` and ``meter verify-batch``: the post office's commands."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any

import click

from meter.cli.common import emit, errors, home_of, parse_date
from meter.cli.home import Home
from meter.errors import ConfigurationError, InvalidInput
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import (
    ReplayStore,
    Verdict,
    VerificationResult,
    Verifier,
    open_replay_store,
)
from meter.postoffice.parallel import BatchEngine, read_item
from meter.postoffice.reconcile import RegisterLedger

__all__ = [
    "PROGRESS_THRESHOLD",
    "ledger_path",
    "open_ledger",
    "open_replay",
    "open_verifier",
    "register",
    "trust_of",
    "verify_label_image",
]

PROGRESS_THRESHOLD = 1000  # lines of input above which a terminal gets a progress bar


def ledger_path(home: Home) -> Path:
    """Where the home's post office keeps its register ledger."""
    return home.path / "postoffice" / "registers.sqlite"


def open_ledger(home: Home, path: Path | None) -> RegisterLedger:
    path = path or ledger_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    return RegisterLedger.open(path)


def open_replay(home: Home, location: str | Path | None) -> ReplayStore:
    """A replay store: a ``redis://`` URL, or an embedded store (default: the home's)."""
    location = location or home.replay_store
    if not str(location).startswith(("redis://", "rediss://", "unix://")):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    return open_replay_store(location)


def trust_of(
    home: Home, root: Path | None, certs: Sequence[Path], revoked: Path | None
) -> tuple[TrustStore, Revocations]:
    """The trust store over the given certificates (default: the home's exported chain)."""
    if root is None:
        root, default_certs = _default_certs(home)
        certs = certs or default_certs
    trust = TrustStore.from_files(root, list(certs))
    revocations = Revocations.from_file(revoked) if revoked else Revocations.empty()
    return trust, revocations


def open_verifier(
    home: Home,
    root: Path | None,
    certs: Sequence[Path],
    revoked: Path | None,
    on: date | None,
    store: str | Path | None,
) -> tuple[Verifier, ReplayStore]:
    """A verifier over the given certificates and replay store (the caller closes the store)."""
    trust, revocations = trust_of(home, root, certs, revoked)
    replay = open_replay(home, store)
    return Verifier(trust, revocations, replay, on or _today()), replay


def verify_label_image(
    home: Home, image: Path, root: Path, certs: Sequence[Path]
) -> VerificationResult:
    """Decode a label image and verify it against the home's post-office stores."""
    data = read_item(image)
    if isinstance(data, VerificationResult):
        return data
    verifier, replay = open_verifier(home, root, certs, None, None, None)
    with ExitStack() as stack:
        stack.callback(replay.close)
        ledger = stack.enter_context(open_ledger(home, None))
        result = verifier.verify(data)
        ledger.record([result])
        return result


def _today() -> date:
    return datetime.now(UTC).date()


def _default_certs(home: Home) -> tuple[Path, list[Path]]:
    root = home.certs / "postal-root.pem"
    if not root.exists():
        raise ConfigurationError(
            f"no --root given and {root} does not exist (run `meter export-certs`)"
        )
    return root, [home.certs / "provider.pem", home.certs / "meter.pem"]


root_opt = click.option(
    "--root",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Postal root certificate (PEM; default HOME/certs/postal-root.pem).",
)
certs_opt = click.option(
    "--certs",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    multiple=True,
    help="Provider and meter certificates (PEM, any number).",
)


def register(cli: click.Group) -> None:
    """Add the post office's commands to the ``meter`` group."""
    revoked_opt = click.option(
        "--revoked",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help="Revocations: JSON list of {device_serial, revoked_at}.",
    )
    date_opt = click.option(
        "--date", "on", default=None, help="Verifier's date YYYY-MM-DD (default today, UTC)."
    )
    store_opt = click.option(
        "--store",
        default=None,
        help="Replay store: an embedded store (default HOME/postoffice/replay/) or a redis:// URL.",
    )
    ledger_opt = click.option(
        "--ledger",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Register ledger for reconciliation (default HOME/postoffice/registers.sqlite).",
    )

    @cli.command()
    @click.argument("indicium", required=False)
    @click.option(
        "--image",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="A label image to read the barcode from.",
    )
    @root_opt
    @certs_opt
    @revoked_opt
    @date_opt
    @store_opt
    @ledger_opt
    @click.pass_context
    def verify(
        ctx: click.Context,
        indicium: str | None,
        image: Path | None,
        root: Path | None,
        certs: tuple[Path, ...],
        revoked: Path | None,
        on: str | None,
        store: str | None,
        ledger: Path | None,
    ) -> None:
        """Verify one indicium, given as hex or as a label image (--image), as a post office would.

        A VALID piece is recorded in the replay store (verifying it again gives
        DUPLICATE) and, with its registers, in the register ledger.
        Exit status 0 for VALID, 2 for any other verdict, 1 for an error.
        """
        with errors(ctx):
            home = home_of(ctx)
            if (indicium is None) == (image is None):
                raise InvalidInput("give either an indicium in hex or --image PATH")
            data = read_item(image if image is not None else indicium or "")
            if isinstance(data, VerificationResult):
                if data.verdict is Verdict.ERROR:
                    raise InvalidInput(data.reason)  # no barcode: nothing was judged
                result = data
            else:
                verifier, replay = open_verifier(home, root, certs, revoked, parse_date(on), store)
                with ExitStack() as stack:
                    stack.callback(replay.close)
                    books = stack.enter_context(open_ledger(home, ledger))
                    result = verifier.verify(data)
                    books.record([result])
            emit(ctx, result.to_json(), lambda: _result_text(result))
            if result.verdict is not Verdict.VALID:
                ctx.exit(2)

    @cli.command("verify-batch")
    @click.argument("input_file", metavar="INPUT", type=click.File("r"))
    @root_opt
    @certs_opt
    @revoked_opt
    @date_opt
    @store_opt
    @ledger_opt
    @click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Processes decoding images and checking signatures (default: every core).",
    )
    @click.option(
        "--progress/--no-progress",
        default=None,
        help=f"Progress bar on stderr (default: on a terminal, for more than {PROGRESS_THRESHOLD} lines).",
    )
    @click.pass_context
    def verify_batch(
        ctx: click.Context,
        input_file: IO[str],
        root: Path | None,
        certs: tuple[Path, ...],
        revoked: Path | None,
        on: str | None,
        store: str | None,
        ledger: Path | None,
        workers: int | None,
        progress: bool | None,
    ) -> None:
        """Verify INPUT (a file, or - for stdin): one hex indicium or label image path per line.

        Prints one JSON object per non-blank line, in input order, with "input",
        "verdict", "reason" and, when the indicium decodes, its "fields". A line
        that is neither hex nor a file is MALFORMED; an image without a readable
        barcode is ERROR; neither changes a store. Images are decoded and
        signatures checked on every core; the replay store gets one call per
        2048 lines, and genuine pieces go to the register ledger.
        """
        with errors(ctx):
            home = home_of(ctx)
            trust, revocations = trust_of(home, root, certs, revoked)
            lines, count = _lines_and_count(input_file, progress)
            show = progress if progress is not None else _is_terminal(sys.stderr)
            show = show and (progress is True or (count or 0) > PROGRESS_THRESHOLD)
            engine = BatchEngine(trust, revocations, parse_date(on) or _today(), workers)
            # Fork the workers first, so that none holds the stores' files or locks.
            with ExitStack() as stack:
                stack.enter_context(engine)
                replay = open_replay(home, store)
                stack.callback(replay.close)
                books = stack.enter_context(open_ledger(home, ledger))
                bar = (
                    stack.enter_context(
                        click.progressbar(length=count, label="verifying", file=sys.stderr)
                    )
                    if show and count is not None
                    else None
                )
                advance = bar.update if bar is not None else None
                for done in engine.verify(lines, replay, books, advance):
                    record = {"input": done.item, **done.result.to_json()}
                    sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()


def _lines_and_count(source: IO[str], progress: bool | None) -> tuple[Iterator[str], int | None]:
    """The input's lines and, when it can be known cheaply, how many there are.

    A file is counted in one quick pass and read again; stdin is only read
    into memory when a progress bar is asked for (--progress).
    """
    lines = (line.rstrip("\n") for line in source)
    if progress is False:
        return lines, None
    try:
        seekable = source.seekable()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        seekable = False
    if seekable:
        start = source.tell()
        count = sum(1 for line in source if line.strip())
        source.seek(start)
        return (line.rstrip("\n") for line in source), count
    if progress:
        held = [line.rstrip("\n") for line in source]
        return iter(held), sum(1 for line in held if line.strip())
    return lines, None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _result_text(result: VerificationResult) -> str:
    lines = [f"{result.verdict.value}: {result.reason}"]
    if result.indicium is not None:
        for key, value in result.indicium.fields().items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)
