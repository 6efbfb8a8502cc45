"""The ``meter`` command: thin click commands over the library, text or ``--json``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import click

from meter.cli import (
    device_admin_cli,
    device_audit_cli,
    device_cli,
    device_users_cli,
    postoffice_cli,
    provider_cli,
    provision,
    workflows,
)
from meter.cli.common import emit, errors, home_of, parse_date, parse_postage
from meter.cli.device_process import device_group, running_device
from meter.cli.device_session import device
from meter.cli.home import PIN_VARIABLES, Home
from meter.cli.postoffice_group import postoffice
from meter.errors import ConfigurationError, InvalidInput
from meter.host import DeviceClient
from meter.indicium import RateCategory
from meter.label import SYMBOLOGIES
from meter.protocol.issue import IssueRequest
from meter.token import KeyAlgorithm

__all__ = ["cli", "main"]


@click.group()
@click.option(
    "--home",
    type=click.Path(file_okay=False, readable=False, path_type=Path),  # a client may not list it
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
@click.option(
    "--user",
    envvar="METER_USER",
    default=None,
    help="Log on to the device as this user (or METER_USER); password from METER_PASSWORD or a prompt.",
)
@click.pass_context
def cli(
    ctx: click.Context, home: Path, profile: Path | None, as_json: bool, user: str | None
) -> None:
    """Electronic postage: a PKCS#11 postage meter, its provider and the post office."""
    ctx.ensure_object(dict)
    ctx.obj["user"] = user
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
    """Provision the home: the device's first run, under the device's own account.

    Makes the development postal root and provider tokens (kept if they exist;
    their PINs from PROVIDER_* and POSTAL_ROOT_* or a prompt) and a new, certified
    meter whose token PINs are random, sealed into the first Administrator's and
    Security Officer's slots, and never shown. Then start the device with
    `meter device serve`.
    """
    with errors(ctx):
        options = provision.InitOptions(
            device_serial=device_serial or provision.new_device_serial(),
            vendor_model=vendor_model,
            authorization_id=authorization_id,
            algorithm=KeyAlgorithm(algorithm) if algorithm else None,
        )
        result = provision.init_home(home_of(ctx), options)
        emit(ctx, result, lambda: _init_text(result))


@cli.command()
@click.option(
    "--postage",
    default=None,
    help="Postage in dollars, e.g. 0.73 (0 for --specimen); with a rate table installed, "
    "where the table allows an explicit amount, at least its price.",
)
@click.option(
    "--weight",
    default=None,
    help="Weight with its unit (1oz, 3.5oz, 2lb): the device computes the postage from its "
    "installed rate table.",
)
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
@click.option(
    "--symbology",
    type=click.Choice(SYMBOLOGIES),
    default="pdf417",
    show_default=True,
    help="Barcode the label carries the indicium in (Data Matrix as IMI and Mailmark use).",
)
@click.pass_context
def issue(
    ctx: click.Context,
    postage: str | None,
    weight: str | None,
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
    symbology: str,
) -> None:
    """Create Indicium (Customer): one indicium and its label (PNG and PDF).

    With --correction-of, Create Correction Indicium: additional postage for a
    piece this meter stamped already.
    """
    with errors(ctx):
        request = IssueRequest(
            postage=None if postage is None else parse_postage(postage),
            rate_category=RateCategory.parse(rate),
            origin_zip=origin_zip,
            destination_zip=destination_zip,
            destination_plus4=plus4,
            delivery_point=delivery_point,
            address=address.replace("|", "\n").splitlines(),
            date_of_mailing=parse_date(mailing_date),
            specimen=specimen,
            correction_of=correction_of,
            weight=weight,
        )
        if postage is None and weight is None and not specimen:
            raise InvalidInput("give --postage, or --weight for the meter to compute it")
        with device(ctx) as client:
            issued = workflows.issue_on(
                client, home_of(ctx).labels, request, out, symbology=symbology
            )
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


def _init_text(result: dict[str, Any]) -> str:
    meter = result["meter"]
    lines = [
        f"device {meter['device_serial']} ({meter['vendor_model']}), authorization id "
        f"{meter['authorization_id']}, {meter['algorithm']}, key id {meter['key_id']}",
        f"certified: {'yes' if meter['certified'] else 'no'}",
    ]
    lines += [f"created user {u['user_id']} ({u['role']})" for u in result.get("users", [])]
    return "\n".join(lines)


@cli.command("export-certs")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PEM files (default: HOME/certs).",
)
@click.pass_context
def export_certs(ctx: click.Context, out: Path | None) -> None:
    """Write the postal root, provider and meter certificates as PEM files.

    Asks the running device (Retrieve PSD Public Key: no logon needed).
    """
    with errors(ctx):
        home = home_of(ctx)
        with device(ctx) as client:
            chain = client.get("/v1/public-key").get("certificates")
        if not chain:
            raise ConfigurationError(
                "the device shows no certificate chain: it is not authorized yet, or no "
                "user has logged on since it started"
            )
        paths = provision.write_certificates(out or home.certs, chain)
        emit(ctx, paths, lambda: "\n".join(f"{k}: {v}" for k, v in paths.items()))


def _development_credentials(home: Home) -> dict[str, str]:
    """For a brand-new home only: the provider's and postal root's PINs and the first users'
    passwords, where the environment sets none. The meter's PINs are never among them:
    they are random and sealed into the users' slots."""
    variables = [v for pair in PIN_VARIABLES.values() for v in pair] + [
        "METER_ADMIN_PASSWORD",
        "METER_SO_PASSWORD",
    ]
    missing = [v for v in variables if not os.environ.get(v)]
    if not missing:
        return {}
    if (home.path / "tokens").exists() and any((home.path / "tokens").iterdir()):
        raise ConfigurationError(
            f"{home.path} holds tokens already, but {', '.join(missing)} is not set: export the "
            "development credentials printed by the first demo run, or use a new --home"
        )
    generated = {
        v: workflows.development_password("admin" if "ADMIN" in v else "security")
        if v.endswith("PASSWORD")
        else secrets.token_urlsafe(12)
        for v in missing
    }
    os.environ.update(generated)
    return generated


DEMO_REQUEST = IssueRequest(
    postage=730,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="62704",
    destination_plus4="1234",
    delivery_point="23",
    address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
)


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Everything at once on a new home: tokens, users, credit, one label, its verification.

    Starts the device for the demo and stops it afterwards.
    """
    with errors(ctx):
        home = home_of(ctx)
        generated = _development_credentials(home)
        new = not home.token_exists("meter")
        if new:
            provision.init_home(home, provision.InitOptions(provision.new_device_serial()))
        passwords = {
            "admin": os.environ["METER_ADMIN_PASSWORD"],
            "security": os.environ["METER_SO_PASSWORD"],
        }
        with running_device(home):
            if new:  # one user per role, credit
                passwords |= {u: workflows.development_password(u) for u, _ in workflows.DEMO_USERS}
                workflows.setup_demo_device(home, passwords, 100_000)
                generated |= {f"password of {u}": pw for u, pw in passwords.items()}
            customer_password = passwords.get("customer") or os.environ.get("METER_PASSWORD", "")
            with DeviceClient(home.socket, home=home.path) as client:
                client.logon("customer", customer_password)
                issued = workflows.issue_on(client, home.labels, DEMO_REQUEST)
                certificates = provision.write_certificates(
                    home.certs, client.get("/v1/public-key")["certificates"]
                )
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
            *(
                f"  export {k}={v}" if k.isupper() else f"  {k}: {v}"
                for k, v in sorted(generated.items())
            ),
            f"  METER_PASSWORD=<password of customer> meter --home {home.path} --user customer "
            "issue --postage 0.73 --from-zip 94043 --to-zip 10001 "
            "--to 'ACME Corp|PO Box 42|New York NY 10001'",
        ]
    return "\n".join(lines)


postoffice_cli.register(cli)
device_cli.register(cli)
device_users_cli.register(cli)
device_admin_cli.register(cli)
device_audit_cli.register(cli)
cli.add_command(postoffice)
cli.add_command(device_group)
# Further command modules register here, one line each.
import meter.cli.withdraw_cli  # noqa: E402
from meter.cli import audit_cli  # noqa: E402

cli.add_command(audit_cli.audit)
from meter.cli import ceremony_cli  # noqa: E402

cli.add_command(ceremony_cli.ceremony)
device_audit_cli.add_audit_commands(audit_cli.audit)
from meter.cli import serve_cli  # noqa: E402, F401

cli.add_command(provider_cli.provider)
import meter.cli.batch_cli  # noqa: E402
import meter.cli.hsm_cli  # noqa: E402, F401
from meter.cli import reconcile_cli, stations_cli, update_cli  # noqa: E402, F401

cli.add_command(update_cli.update)
from meter.cli import reload_cli  # noqa: E402

cli.add_command(reload_cli.reload)
cli.add_command(reload_cli.certify)


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_root().ensure_object(dict)["json"] = True


def _json_after_the_command(group: click.Group) -> None:
    """Accept `--json` after a command's name as well as before it (`meter demo --json`)."""
    for command in group.commands.values():
        if not any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params):
            command.params.append(
                click.Option(
                    ["--json"],
                    is_flag=True,
                    expose_value=False,
                    callback=_set_json,
                    help="Print one JSON object instead of text (as `meter --json ...`).",
                )
            )
        if isinstance(command, click.Group):
            _json_after_the_command(command)


_json_after_the_command(cli)


def main() -> None:
    cli(obj={}, prog_name="meter")


if __name__ == "__main__":
    main()
