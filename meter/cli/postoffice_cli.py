"""``meter verify`` and ``meter verify-batch``: the post office's commands."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click

from meter.cli.common import emit, errors, home_of, parse_date
from meter.cli.home import Home
from meter.errors import BarcodeError, ConfigurationError, InvalidInput, MeterError
from meter.label import decode_image
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import EmbeddedReplayStore, Verdict, VerificationResult, Verifier

__all__ = ["open_verifier", "register", "verify_label_image"]

_HEX = re.compile(r"[0-9a-fA-F\s]*")


def open_verifier(
    home: Home,
    root: Path | None,
    certs: Sequence[Path],
    revoked: Path | None,
    on: date | None,
    store: Path | None,
) -> tuple[Verifier, EmbeddedReplayStore]:
    """A verifier over the given certificates (default: the home's exported chain)."""
    if root is None:
        root, default_certs = _default_certs(home)
        certs = certs or default_certs
    trust = TrustStore.from_files(root, list(certs))
    revocations = Revocations.from_file(revoked) if revoked else Revocations.empty()
    store = store or home.replay_store
    store.parent.mkdir(parents=True, exist_ok=True)
    replay = EmbeddedReplayStore.open(store)
    today = on or datetime.now(UTC).date()
    return Verifier(trust, revocations, replay, today), replay


def verify_label_image(
    home: Home, image: Path, root: Path, certs: Sequence[Path]
) -> VerificationResult:
    """Decode a label image and verify it against the home's post-office replay store."""
    data = decode_image(image)
    verifier, replay = open_verifier(home, root, certs, None, None, None)
    with replay:
        return verifier.verify(data)


def _indicium_bytes(value: str) -> bytes:
    """A line of input: hex of an indicium, or the path of a label image."""
    text = value.strip()
    if _HEX.fullmatch(text):
        compact = "".join(text.split())
        if len(compact) % 2:
            raise InvalidInput("hex input has an odd number of digits")
        return bytes.fromhex(compact)
    return decode_image(Path(text))


def _default_certs(home: Home) -> tuple[Path, list[Path]]:
    root = home.certs / "postal-root.pem"
    if not root.exists():
        raise ConfigurationError(
            f"no --root given and {root} does not exist (run `meter export-certs`)"
        )
    return root, [home.certs / "provider.pem", home.certs / "meter.pem"]


def register(cli: click.Group) -> None:
    """Add the post office's commands to the ``meter`` group."""
    root_opt = click.option(
        "--root",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help="Postal root certificate (PEM).",
    )
    certs_opt = click.option(
        "--certs",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        multiple=True,
        help="Provider and meter certificates (PEM, any number).",
    )
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
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Replay store file (default: HOME/postoffice/replay.log).",
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
    @click.pass_context
    def verify(
        ctx: click.Context,
        indicium: str | None,
        image: Path | None,
        root: Path | None,
        certs: tuple[Path, ...],
        revoked: Path | None,
        on: str | None,
        store: Path | None,
    ) -> None:
        """Verify one indicium, given as hex or as a label image (--image), as a post office would.

        A VALID piece is recorded in the replay store: verifying it again gives DUPLICATE.
        Exit status 0 for VALID, 2 for any other verdict, 1 for an error.
        """
        with errors(ctx):
            home = home_of(ctx)
            if (indicium is None) == (image is None):
                raise InvalidInput("give either an indicium in hex or --image PATH")
            data = decode_image(image) if image is not None else _indicium_bytes(indicium or "")
            verifier, replay = open_verifier(home, root, certs, revoked, parse_date(on), store)
            with replay:
                result = verifier.verify(data)
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
    @click.pass_context
    def verify_batch(
        ctx: click.Context,
        input_file: Any,
        root: Path | None,
        certs: tuple[Path, ...],
        revoked: Path | None,
        on: str | None,
        store: Path | None,
    ) -> None:
        """Verify INPUT (a file, or - for stdin): one hex indicium or image path per line.

        Prints one JSON object per line, in input order, with at least "verdict"
        and, when the indicium decodes, its "fields".
        """
        with errors(ctx):
            home = home_of(ctx)
            verifier, replay = open_verifier(home, root, certs, revoked, parse_date(on), store)
            with replay:
                for obj in _batch(verifier, (line.rstrip("\n") for line in input_file)):
                    sys.stdout.write(json.dumps(obj) + "\n")
                sys.stdout.flush()


def _batch(verifier: Verifier, lines: Iterator[str], size: int = 512) -> Iterator[dict[str, Any]]:
    """Read, decode and verify in batches (one replay-store sync per batch), output in order."""
    pending: list[tuple[str, bytes | MeterError]] = []

    def flush() -> Iterator[dict[str, Any]]:
        good = [data for _, data in pending if isinstance(data, bytes)]
        results = iter(verifier.verify_batch(good))
        for line, data in pending:
            if isinstance(data, bytes):
                yield {"input": line, **next(results).to_json()}
            else:
                yield {"input": line, "verdict": Verdict.ERROR.value, "reason": str(data)}
        pending.clear()

    for line in lines:
        if not line.strip():
            continue
        try:
            pending.append((line, _indicium_bytes(line)))
        except (BarcodeError, InvalidInput, ValueError) as exc:
            pending.append((line, exc if isinstance(exc, MeterError) else InvalidInput(str(exc))))
        if len(pending) >= size:
            yield from flush()
    yield from flush()


def _result_text(result: VerificationResult) -> str:
    lines = [f"{result.verdict.value}: {result.reason}"]
    if result.indicium is not None:
        for key, value in result.indicium.fields().items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)
