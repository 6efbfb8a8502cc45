"""Update PSC from both sides: the provider signs bundles, a Security Officer installs them.

- ``meter provider code-signing-certificate``: the provider's code-signing key
  (generated in the provider's token) certified by the postal root (its own token);
- ``meter provider sign-update``: a signed bundle (software id and version, rate
  table, watchdog thresholds, revocations) written to a file;
- ``meter update install BUNDLE`` (Security Officer, through the device), ``meter
  update status`` and ``meter update quote`` (a host-side preview of a price).

docs/updates.md and docs/rates.md say what each checks and refuses.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from cryptography.x509.oid import NameOID

from meter.cli.common import emit, errors, home_of
from meter.cli.device_session import device
from meter.cli.provider_cli import provider
from meter.cli.workflows import format_mills
from meter.durable import write_atomically
from meter.errors import ConfigurationError, InvalidInput
from meter.indicium import RateCategory
from meter.protocol.update_bundle import BundleContents, UpdateBundle
from meter.protocol.watchdog import COMMERCIAL, WatchdogThresholds
from meter.provider import PostalRoot, Provider
from meter.provider.code_signing import CodeSigner, certify_code_signing
from meter.rates import RateTable, Weight, default_table, load_table, quote

__all__ = ["update"]


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _table(path: Path | None) -> RateTable:
    return default_table() if path is None else load_table(path)


@provider.command("code-signing-certificate")
@click.pass_context
def code_signing_certificate(ctx: click.Context) -> None:
    """Have the postal root certify the provider's code-signing key.

    The key is generated in the provider's token the first time (label
    provider-code-signing); the certificate (extended key usage codeSigning,
    not a CA) is kept there, replacing an older one. Needs PROVIDER_USER_PIN and
    POSTAL_ROOT_USER_PIN: in the lab both tokens are in the home.
    """
    with errors(ctx):
        home = home_of(ctx)
        now = _now()
        with home.open_token("postal-root") as rtoken, home.open_token("provider") as ptoken:
            root = PostalRoot.open(rtoken)
            party = Provider.open(ptoken, home.ledger)
            authorization_id = party.authorization_id
            common = party.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(common[0].value) if common else f"Provider {authorization_id}"
            signer = CodeSigner(ptoken)
            cert = certify_code_signing(root, signer.public_key_spki(), authorization_id, name, now)
            signer.install_certificate(cert, root.certificate, now)
        data = {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "authorization_id": authorization_id,
        }
        emit(
            ctx,
            data,
            lambda: (
                f"code-signing certificate {data['subject']}, by {data['issuer']}, "
                f"valid until {data['not_after']}"
            ),
        )


@provider.command("sign-update")
@click.option("--version", "version", required=True, help="Software version MAJOR.MINOR.PATCH.")
@click.option(
    "--software-id",
    type=int,
    required=True,
    help="Release number every indicium prints (0-65535); must grow with each release.",
)
@click.option(
    "--vendor-model", default="PM01", show_default=True, help="The meters this software is for."
)
@click.option(
    "--rates",
    "rates_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Rate table (pim-rates-v1 JSON); default: the shipped US domestic 2026 table.",
)
@click.option("--watchdog-warn", type=int, default=COMMERCIAL.warn_days, show_default=True)
@click.option("--watchdog-stop", type=int, default=COMMERCIAL.stop_days, show_default=True)
@click.option(
    "--revocations",
    "revocations_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of {device_serial, revoked_at} to carry.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write the signed bundle to.",
)
@click.pass_context
def sign_update(
    ctx: click.Context,
    version: str,
    software_id: int,
    vendor_model: str,
    rates_path: Path | None,
    watchdog_warn: int,
    watchdog_stop: int,
    revocations_path: Path | None,
    out: Path,
) -> None:
    """Sign an update bundle with the provider's code-signing key (PROVIDER_USER_PIN)."""
    with errors(ctx):
        home = home_of(ctx)
        revocations: list[Any] = []
        if revocations_path is not None:
            try:
                revocations = json.loads(_read(revocations_path, "revocation list"))
            except ValueError as exc:
                raise InvalidInput(f"{revocations_path}: not JSON ({exc})") from exc
            if not isinstance(revocations, list) or not all(
                isinstance(e, dict) and set(e) == {"device_serial", "revoked_at"}
                for e in revocations
            ):
                raise InvalidInput(
                    f"{revocations_path}: must be a list of {{device_serial, revoked_at}}"
                )
        contents = BundleContents(
            software_id=software_id,
            vendor_model=vendor_model,
            version=version,
            issued_at=_now(),
            rates=_table(rates_path),
            watchdog=WatchdogThresholds(watchdog_warn, watchdog_stop),
            revocations=tuple((e["device_serial"], e["revoked_at"]) for e in revocations),
        )
        with home.open_token("provider") as token:
            bundle = CodeSigner(token).sign(contents)
        try:
            write_atomically(out, bundle.to_bytes(), mode=0o644)
        except OSError as exc:
            raise ConfigurationError(f"cannot write {out}: {exc.strerror or exc}") from exc
        data = {
            "out": str(out),
            "version": version,
            "software_id": software_id,
            "bundle_sha256": bundle.sha256,
            "rate_table": contents.rates.name,
        }
        emit(
            ctx,
            data,
            lambda: (
                f"wrote {out}: version {version}, software id {software_id}, sha256 {bundle.sha256}"
            ),
        )


@click.group()
def update() -> None:
    """Install provider-signed update bundles (Update PSC) and see what is installed."""


@update.command("install")
@click.argument("bundle_path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def install(ctx: click.Context, bundle_path: Path) -> None:
    """Update PSC (Security Officer): install BUNDLE on the device.

    The device verifies it (code-signing certificate from its postal root, its own
    provider, signature, lineage, newer version and software id) and refuses
    anything else, auditing every refusal; nothing changes then.
    """
    with errors(ctx):
        text = _read(bundle_path, "update bundle").decode("utf-8", errors="replace")
        with device(ctx) as client:
            result = client.post("/v1/psc", {"bundle": text})
        emit(ctx, result, lambda: _psc_text(result))


@update.command("status")
@click.pass_context
def status(ctx: click.Context) -> None:
    """The installed version, software id, bundle SHA-256, rate table and thresholds."""
    with errors(ctx):
        with device(ctx) as client:
            psc = client.get("/v1/status")["psc"]
        emit(ctx, psc, lambda: _psc_text(psc))


@update.command("quote")
@click.option("--rate", default="first-class-letter", show_default=True, help="Rate category.")
@click.option("--weight", required=True, help="Weight with its unit, e.g. 1oz, 3.5oz, 2lb.")
@click.option("--from-zip", "origin_zip", required=True)
@click.option("--to-zip", "destination_zip", required=True)
@click.option(
    "--rates",
    "rates_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Rate table or signed bundle to price from (default: the shipped table).",
)
@click.pass_context
def quote_command(
    ctx: click.Context,
    rate: str,
    weight: str,
    origin_zip: str,
    destination_zip: str,
    rates_path: Path | None,
) -> None:
    """Preview a price on the host. The device prices every piece itself from the table
    it installed; this is only what that table would say."""
    with errors(ctx):
        table = _table_or_bundle(rates_path)
        q = quote(
            table, RateCategory.parse(rate), Weight.parse(weight), origin_zip, destination_zip
        )
        data = q.to_json()
        emit(ctx, data, lambda: f"{format_mills(q.mills)}: {q.rule}")


def _table_or_bundle(path: Path | None) -> RateTable:
    if path is None:
        return default_table()
    data = _read(path, "rate table")
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if isinstance(document, dict) and "body" in document:
        return UpdateBundle.from_bytes(data, str(path)).contents.rates
    return load_table(path)


def _psc_text(psc: dict[str, Any]) -> str:
    watchdog = psc.get("watchdog") or {}
    lines = [
        f"version:     {psc.get('version')}",
        f"software id: {psc.get('software_id')}",
        f"bundle:      {psc.get('bundle_sha256') or 'none installed (explicit postage only)'}",
        f"rate table:  {psc.get('rate_table') or 'none'}",
    ]
    if watchdog:
        lines.append(
            f"watchdog:    warn after {watchdog['warn_days']} days, stop after "
            f"{watchdog['stop_days']} days without a provider audit"
        )
    return "\n".join(lines)
