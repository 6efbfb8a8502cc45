"""The steps the CLI strings together for one home: init, credit, issue, export.

Each function opens the tokens it needs, does one thing through the service
packages, and closes them again. The development postal root and provider
live in their own tokens in the same home (the embedded default).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from meter.cli.home import PIN_VARIABLES, Home, pin_from_env
from meter.errors import ConfigurationError
from meter.indicium import Indicium
from meter.label import LabelInfo, render_label, write_label
from meter.provider import PostalRoot, Provider
from meter.psd import DeviceIdentity, IssueRequest, Meter
from meter.psd.device import Clock, system_clock
from meter.token import KeyAlgorithm, ensure_token

__all__ = [
    "InitOptions",
    "IssuedLabel",
    "credit",
    "export_certificates",
    "format_mills",
    "init_home",
    "issue",
]

_PARTIES = ("postal-root", "provider", "meter")


def format_mills(mills: int) -> str:
    return f"${mills // 1000}.{mills % 1000:03d}"


@dataclass(frozen=True)
class InitOptions:
    device_serial: int
    vendor_model: str = "PM01"
    authorization_id: int = 60001
    algorithm: KeyAlgorithm | None = None
    software_id: int = 100
    provider_name: str = "Development Provider"
    root_name: str = "Postal Root (development)"


def init_home(home: Home, options: InitOptions, clock: Clock = system_clock) -> dict[str, object]:
    """Provision the home's tokens idempotently: postal root, provider, certified meter."""
    home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = {}
    for party in _PARTIES:
        user_var, so_var = PIN_VARIABLES[party]
        created[party] = ensure_token(
            home.profile,
            home.path,
            home.token_label(party),
            pin_from_env(so_var, f"SO PIN of the {party} token"),
            pin_from_env(user_var, f"user PIN of the {party} token"),
        )
    now = clock().astimezone(UTC).replace(microsecond=0)
    with home.open_token("postal-root") as token:
        root = (
            PostalRoot.create(token, options.root_name, now)
            if created["postal-root"]
            else PostalRoot.open(token)
        )
        root_cert = root.certificate
        with home.open_token("provider") as ptoken:
            if created["provider"]:
                provider = Provider.create(ptoken, home.ledger)
                cert = root.certify_provider(
                    provider.public_key_spki, options.authorization_id, options.provider_name, now
                )
                provider.install_certificate(cert, root_cert, now)
            else:
                provider = Provider.open(ptoken, home.ledger)
            with home.open_token("meter") as mtoken:
                if created["meter"]:
                    identity = DeviceIdentity(
                        device_serial=options.device_serial,
                        vendor_model=options.vendor_model,
                        authorization_id=provider.authorization_id,
                        algorithm=options.algorithm or home.profile.signing_algorithm,
                        software_id=options.software_id,
                    )
                    meter = Meter.provision(mtoken, identity, clock)
                else:
                    meter = Meter.open(mtoken, clock)
                if meter.certificates is None:
                    meter_cert = provider.certify_meter(
                        meter.public_key_spki, meter.identity.device_serial, now
                    )
                    meter.install_certificates(meter_cert, provider.certificate, root_cert)
                paths = export_certificates(home, meter)
                return {"created": created, "meter": meter.status(), "certificates": paths}


def export_certificates(home: Home, meter: Meter, out: Path | None = None) -> dict[str, str]:
    """Write the meter's chain as PEM files: postal root, provider, meter."""
    if meter.certificates is None:
        raise ConfigurationError("the meter has no certificates yet: run `meter init`")
    out = out or home.certs
    out.mkdir(parents=True, exist_ok=True)
    certs = meter.certificates
    paths = {}
    for name, cert in (
        ("postal_root", certs.root),
        ("provider", certs.provider),
        ("meter", certs.meter),
    ):
        path = out / f"{name.replace('_', '-')}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name] = str(path)
    return paths


def credit(home: Home, amount: int, clock: Clock = system_clock) -> dict[str, Any]:
    """One credit round: the meter asks, the provider grants and records, the meter applies."""
    with home.open_token("meter") as mtoken, home.open_token("provider") as ptoken:
        meter = Meter.open(mtoken, clock)
        provider = Provider.open(ptoken, home.ledger)
        request = meter.request_credit()
        grant = provider.grant_credit(request, amount, clock().astimezone(UTC))
        registers = meter.apply_credit(grant)
        return {
            "transaction_id": grant.transaction_id.hex(),
            "amount": amount,
            "ascending": registers.ascending,
            "descending": registers.descending,
            "control_total": registers.control_total,
        }


@dataclass(frozen=True)
class IssuedLabel:
    indicium: Indicium
    png: Path
    pdf: Path


def label_info(indicium: Indicium, address: Sequence[str]) -> LabelInfo:
    return LabelInfo(
        postage=format_mills(indicium.postage),
        date_of_mailing=indicium.date_of_mailing.isoformat(),
        origin_zip=indicium.origin_zip,
        device_serial=str(indicium.device_serial),
        sequence=str(indicium.sequence),
        rate=indicium.rate_category.title,
        destination_lines=tuple(address),
        specimen=indicium.is_specimen,
        correction=indicium.is_correction,
    )


def issue(
    home: Home, request: IssueRequest, out: Path | None = None, clock: Clock = system_clock
) -> IssuedLabel:
    """Issue one indicium (durable debit first) and write its label as PNG and PDF.

    The label is laid out once with placeholder values before the meter
    debits anything, so an address the label cannot print is refused
    before a piece sequence is spent.
    """
    address = [request.address] if isinstance(request.address, str) else list(request.address)
    lines = [line for text in address for line in text.splitlines() if line.strip()]
    with home.open_token("meter") as token:
        meter = Meter.open(token, clock)
        render_label(
            bytes(_PLACEHOLDER_LENGTH[meter.identity.algorithm]), _placeholder_info(request, lines)
        )
        indicium = meter.issue(request)
    label = render_label(indicium.to_bytes(), label_info(indicium, lines))
    stem = out or home.labels / f"{indicium.device_serial}-{indicium.sequence:06d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    write_label(label, png, pdf)
    return IssuedLabel(indicium, png, pdf)


_PLACEHOLDER_LENGTH = {
    KeyAlgorithm.ECDSA_P256: 148,
    KeyAlgorithm.ED25519: 148,
    KeyAlgorithm.RSA_PSS_2048: 340,
}


def _placeholder_info(request: IssueRequest, lines: Sequence[str]) -> LabelInfo:
    """The widest values the indicium's human-readable fields can take, with the real address."""
    return LabelInfo(
        postage=format_mills(max(request.postage, 0)),
        date_of_mailing="2026-12-31",
        origin_zip=request.origin_zip or "00000",
        device_serial="18446744073709551615",
        sequence="4294967295",
        rate=request.rate_category.title,
        destination_lines=tuple(lines),
        specimen=request.specimen,
        correction=request.correction_of is not None,
    )


def new_device_serial() -> int:
    """A random 12-digit development serial."""
    return 100_000_000_000 + secrets.randbelow(900_000_000_000)
