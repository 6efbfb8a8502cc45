"""The ``meter`` command: thin click commands over the library, text or ``--json``."""

from __future__ import annotations

import os
import secrets
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from meter.cli import postoffice_cli, workflows
from meter.cli.common import emit, errors, home_of, parse_date
from meter.cli.home import PIN_VARIABLES, Home
from meter.cli.postoffice_group import postoffice
from meter.errors import ConfigurationError, InvalidInput
from meter.indicium import RateCategory
from meter.psd import IssueRequest, Meter
from meter.token import KeyAlgorithm

__all__ = ["cli", "main"]


def parse_postage(text: str) -> int:
    """Dollars ("0.73", "$1.234") to mills, exactly; more than 3 decimals is refused."""
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation as exc:
        raise InvalidInput(f"postage '{text}' is not an amount in dollars (e.g. 0.73)") from exc
    mills = value * 1000
    if mills != mills.to_integral_value():
        raise InvalidInput(f"postage '{text}' has more precision than a mill ($0.001)")
    return int(mills)


@click.group()
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="METER_HOME",
    default=Path("~/.meter"),
    show_default=True,
    help="Folder holding the tokens and local state (or METER_HOME).",
)
@click.option(
    "--profile",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="METER_HSM_PROFILE",
    default=None,
    help="HSM profile file (default: hsm_profiles/softhsm2.toml).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_context
def cli(ctx: click.Context, home: Path, profile: Path | None, as_json: bool) -> None:
    """Electronic postage: a PKCS#11 postage meter, its provider and the post office."""
    ctx.ensure_object(dict)
    ctx.obj["json"] = as_json
    ctx.obj["home_path"] = home
    ctx.obj["profile"] = profile


@cli.command()
@click.option("--device-serial", type=int, default=None, help="Device serial (random if omitted).")
@click.option("--vendor-model", default="PM01", show_default=True, help="4 characters A-Z/0-9.")
@click.option("--authorization-id", type=int, default=60001, show_default=True)
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in KeyAlgorithm]),
    default=None,
    help="Signing key kind (default: the HSM profile's).",
)
@click.pass_context
def init(
    ctx: click.Context,
    device_serial: int | None,
    vendor_model: str,
    authorization_id: int,
    algorithm: str | None,
) -> None:
    """Provision the home's tokens: development postal root, provider, and a certified meter.

    Idempotent: tokens that exist are kept. PINs come from the environment
    (METER_USER_PIN, METER_SO_PIN, PROVIDER_*, POSTAL_ROOT_*) or a prompt.
    """
    with errors(ctx):
        options = workflows.InitOptions(
            device_serial=device_serial or workflows.new_device_serial(),
            vendor_model=vendor_model,
            authorization_id=authorization_id,
            algorithm=KeyAlgorithm(algorithm) if algorithm else None,
        )
        result = workflows.init_home(home_of(ctx), options)
        emit(ctx, result, lambda: _status_text(result["meter"]))  # type: ignore[arg-type]


@cli.command()
@click.argument("amount")
@click.pass_context
def credit(ctx: click.Context, amount: str) -> None:
    """Buy AMOUNT dollars of postage from the provider (e.g. 100.00)."""
    with errors(ctx):
        result = workflows.credit(home_of(ctx), parse_postage(amount))
        emit(
            ctx,
            result,
            lambda: (
                f"credited {workflows.format_mills(int(result['amount']))}; descending register "
                f"{workflows.format_mills(int(result['descending']))} (transaction {result['transaction_id']})"
            ),
        )


@cli.command()
@click.option("--postage", required=True, help="Postage in dollars, e.g. 0.73 (0 for --specimen).")
@click.option(
    "--rate",
    "rate",
    default="first-class-letter",
    show_default=True,
    help="Rate category: " + ", ".join(r.slug for r in RateCategory),
)
@click.option(
    "--date",
    "mailing_date",
    default=None,
    help="Date of mailing YYYY-MM-DD (default today; up to 10 days ahead).",
)
@click.option("--from-zip", "origin_zip", required=True, help="Origin ZIP (5 digits).")
@click.option("--to-zip", "destination_zip", required=True, help="Destination ZIP (5 digits).")
@click.option(
    "--to-plus4", "plus4", default="0000", show_default=True, help="Destination ZIP+4 (4 digits)."
)
@click.option(
    "--delivery-point", default="00", show_default=True, help="Delivery point (2 digits)."
)
@click.option(
    "--to",
    "address",
    required=True,
    help="Destination address; lines separated by newlines or '|'.",
)
@click.option(
    "--specimen", is_flag=True, help="Print a specimen (test) indicium with no postage value."
)
@click.option(
    "--correction-of",
    type=int,
    default=None,
    help="Piece sequence this correction indicium adds postage to.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Label path without suffix (default: HOME/labels/SERIAL-SEQUENCE).",
)
@click.pass_context
def issue(
    ctx: click.Context,
    postage: str,
    rate: str,
    mailing_date: str | None,
    origin_zip: str,
    destination_zip: str,
    plus4: str,
    delivery_point: str,
    address: str,
    specimen: bool,
    correction_of: int | None,
    out: Path | None,
) -> None:
    """Issue one indicium and write its label (PNG and PDF)."""
    with errors(ctx):
        request = IssueRequest(
            postage=parse_postage(postage),
            rate_category=RateCategory.parse(rate),
            origin_zip=origin_zip,
            destination_zip=destination_zip,
            destination_plus4=plus4,
            delivery_point=delivery_point,
            address=address.replace("|", "\n").splitlines(),
            date_of_mailing=parse_date(mailing_date),
            specimen=specimen,
            correction_of=correction_of,
        )
        issued = workflows.issue(home_of(ctx), request, out)
        ind = issued.indicium
        data = {
            "indicium_hex": ind.to_bytes().hex(),
            "fields": ind.fields(),
            "label_png": str(issued.png),
            "label_pdf": str(issued.pdf),
        }
        emit(
            ctx,
            data,
            lambda: (
                f"piece {ind.sequence}: {workflows.format_mills(ind.postage)} {ind.rate_category.title}, "
                f"mailing {ind.date_of_mailing}; descending register {workflows.format_mills(ind.descending)}\n"
                f"label: {issued.png}\n       {issued.pdf}"
            ),
        )


def _status_text(status: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"device {status['device_serial']} ({status['vendor_model']}), authorization id "
            f"{status['authorization_id']}, {status['algorithm']}, key id {status['key_id']}",
            f"certified: {'yes' if status['certified'] else 'no'}",
            f"ascending {workflows.format_mills(status['ascending'])}  descending "
            f"{workflows.format_mills(status['descending'])}  control total "
            f"{workflows.format_mills(status['control_total'])}  pieces {status['piece_count']}",
            f"meter time {status['time']}",
        ]
    )


@cli.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the meter's identity, registers, piece count and time."""
    with errors(ctx):
        with home_of(ctx).open_token("meter") as token:
            result = Meter.open(token).status()
        emit(ctx, result, lambda: _status_text(result))


@cli.command("export-certs")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PEM files (default: HOME/certs).",
)
@click.pass_context
def export_certs(ctx: click.Context, out: Path | None) -> None:
    """Write the postal root, provider and meter certificates as PEM files."""
    with errors(ctx):
        home = home_of(ctx)
        with home.open_token("meter") as token:
            paths = workflows.export_certificates(home, Meter.open(token), out)
        emit(ctx, paths, lambda: "\n".join(f"{k}: {v}" for k, v in paths.items()))


def _development_pins(home: Home) -> dict[str, str]:
    """Generate any PIN not set in the environment, for a brand-new home only."""
    missing = [v for pair in PIN_VARIABLES.values() for v in pair if not os.environ.get(v)]
    if not missing:
        return {}
    if (home.path / "tokens").exists() and any((home.path / "tokens").iterdir()):
        raise ConfigurationError(
            f"{home.path} holds tokens already, but {', '.join(missing)} is not set: export the "
            "development credentials printed by the first demo run, or use a new --home"
        )
    generated = {v: secrets.token_urlsafe(12) for v in missing}
    os.environ.update(generated)
    return generated


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Everything at once on a new home: tokens, credit, one label, and its verification."""
    with errors(ctx):
        home = home_of(ctx)
        generated = _development_pins(home)
        init_result = workflows.init_home(
            home, workflows.InitOptions(device_serial=workflows.new_device_serial())
        )
        status_before = init_result["meter"]
        assert isinstance(status_before, dict)
        if int(status_before["descending"]) < 10_000:
            workflows.credit(home, 100_000)
        issued = workflows.issue(
            home,
            IssueRequest(
                postage=730,
                rate_category=RateCategory.FIRST_CLASS_LETTER,
                origin_zip="94043",
                destination_zip="62704",
                destination_plus4="1234",
                delivery_point="23",
                address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
            ),
        )
        certificates = init_result["certificates"]
        assert isinstance(certificates, dict)
        result = postoffice_cli.verify_label_image(
            home,
            issued.png,
            Path(certificates["postal_root"]),
            [Path(certificates["meter"]), Path(certificates["provider"])],
        )
        data = {
            "label_png": str(issued.png),
            "label_pdf": str(issued.pdf),
            "indicium_hex": issued.indicium.to_bytes().hex(),
            "verdict": result.verdict.value,
            "reason": result.reason,
            "fields": issued.indicium.fields(),
            "certificates": certificates,
            "home": str(home.path),
            "development_credentials": generated,
        }
        emit(ctx, data, lambda: _demo_text(home, data, generated))


def _demo_text(home: Home, data: dict[str, Any], generated: dict[str, str]) -> str:
    lines = [
        f"meter home:  {home.path}",
        f"label:       {data['label_png']}",
        f"             {data['label_pdf']}",
        f"indicium:    {data['indicium_hex']}",
        f"post office: {data['verdict']} ({data['reason']})",
    ]
    if generated:
        lines += [
            "",
            "DEVELOPMENT CREDENTIALS - generated for this demo home only; shown once, never stored.",
            "Do not use them for a real meter. To go on with this home:",
            *(f"  export {k}={v}" for k, v in sorted(generated.items())),
            f"  meter --home {home.path} issue --postage 0.73 --from-zip 94043 --to-zip 10001 "
            "--to 'ACME Corp|PO Box 42|New York NY 10001'",
        ]
    return "\n".join(lines)


postoffice_cli.register(cli)
cli.add_command(postoffice)
# Further command modules register here, one line each.


def main() -> None:
    cli(obj={}, prog_name="meter")


if __name__ == "__main__":
    main()
