"""The steps the CLI strings together for one home: init, credit, issue, export.

Each function opens the tokens it needs, does one thing through the service
packages, and closes them again. The development postal root and provider
live in their own tokens in the same home (the embedded default).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.cli.home import PIN_VARIABLES, Home, password_from_env, pin_from_env
from meter.errors import ConfigurationError
from meter.indicium import Indicium
from meter.label import LabelInfo, render_label, write_label
from meter.protocol.credit import CreditGrant, CreditRequest
from meter.provider import PostalRoot, Provider
from meter.psd import DeviceIdentity, IssueRequest, Meter
from meter.psd.device import CERT_APPLICATION, Clock, system_clock
from meter.psd.firmware import PSD, secrets_for
from meter.psd.passwords import PasswordPolicy
from meter.psd.roles import Role
from meter.psd.users import UserStore
from meter.token import KeyAlgorithm, Token, ensure_token

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
    admin_user: str = "admin"
    so_user: str = "security"
    provider_name: str = "Development Provider"
    root_name: str = "Postal Root (development)"


def meter_pins() -> dict[str, str]:
    """The meter token's PINs for a new token: random unless a lab sets them in the environment.

    Nobody is shown them: they are sealed into the first users' slots, and
    every later use unseals them at a user's logon.
    """
    user_var, so_var = PIN_VARIABLES["meter"]
    return {
        "user_pin": os.environ.get(user_var) or secrets.token_urlsafe(24),
        "so_pin": os.environ.get(so_var) or secrets.token_urlsafe(24),
    }


def init_home(home: Home, options: InitOptions, clock: Clock = system_clock) -> dict[str, object]:
    """Provision the home's tokens idempotently: postal root, provider, certified meter.

    A new meter token gets its first two users, an Administrator and a
    Security Officer, whose slots hold the token's PINs.
    """
    home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = {}
    pins = meter_pins()
    users: list[dict[str, object]] = []
    for party in _PARTIES:
        user_var, so_var = PIN_VARIABLES[party]
        if party == "meter":
            so_pin, user_pin = pins["so_pin"], pins["user_pin"]
        else:
            so_pin = pin_from_env(so_var, f"SO PIN of the {party} token")
            user_pin = pin_from_env(user_var, f"user PIN of the {party} token")
        if party == "meter" and not home.token_exists("meter"):
            # The passwords are checked before the token exists; the slots need its PINs.
            store, first = first_users(home, options)
        created[party] = ensure_token(
            home.profile, home.path, home.token_label(party), so_pin, user_pin
        )
        if party == "meter" and created[party]:
            now = clock().astimezone(UTC)
            users = [
                store.create(uid, role, pw, secrets_for(role, pins), now).to_json()
                for uid, role, pw in first
            ]
        elif party == "meter" and not os.environ.get(user_var):
            raise ConfigurationError(
                f"the meter in {home.path} is initialized already; its PINs are sealed in the "
                "users' slots: log on instead (meter --user ID status)"
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
            with home.open_token("meter", pins["user_pin"]) as mtoken:
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
                return {
                    "created": created,
                    "meter": meter.status(),
                    "certificates": paths,
                    "users": users,
                }


def first_users(home: Home, options: InitOptions) -> tuple[UserStore, list[tuple[str, Role, str]]]:
    """The Administrator and Security Officer a new device starts with, passwords checked
    against the host policy (from METER_ADMIN_PASSWORD / METER_SO_PASSWORD or a prompt)."""
    store = UserStore.open(home.device, PasswordPolicy.load(home.device / "policy.toml"))
    if store.count():
        raise ConfigurationError(
            f"{home.device} has users but the meter token is missing: restore the token or "
            "move the folder away"
        )
    users = []
    for user_id, role, variable in (
        (options.admin_user, Role.ADMINISTRATOR, "METER_ADMIN_PASSWORD"),
        (options.so_user, Role.SECURITY_OFFICER, "METER_SO_PASSWORD"),
    ):
        password = password_from_env(
            variable, f"password for {role.display} '{user_id}'", confirm=True
        )
        store.policy.check(password, user_id)
        users.append((user_id, role, password))
    return store, users


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


def export_device_certificates(home: Home, token: Token, out: Path | None = None) -> dict[str, str]:
    """Write the chain stored (publicly) in the meter's token as PEM files, no logon needed."""
    stored = {obj.label: obj.value for obj in token.data_objects(CERT_APPLICATION)}
    if set(stored) != {"meter", "provider", "postal-root"}:
        raise ConfigurationError("the meter has no certificates yet (Authorize PSD)")
    out = out or home.certs
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, name in (
        ("postal-root", "postal_root"),
        ("provider", "provider"),
        ("meter", "meter"),
    ):
        cert = x509.load_der_x509_certificate(stored[label])
        path = out / f"{label}.pem"
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


def issue_on(psd: PSD, home: Home, request: IssueRequest, out: Path | None = None) -> IssuedLabel:
    """Create Indicium (or Create Correction Indicium) on the running device, then the label.

    As in `issue`, the label is laid out with placeholder values first, so an
    address it cannot print is refused before a piece sequence is spent.
    """
    lines = _address_lines(request)
    render_label(
        bytes(_PLACEHOLDER_LENGTH[psd.signing_algorithm]), _placeholder_info(request, lines)
    )
    if request.correction_of is None:
        indicium = psd.create_indicium(request)
    else:
        indicium = psd.create_correction_indicium(request, request.correction_of)
    return _write(home, indicium, lines, out)


def _address_lines(request: IssueRequest) -> list[str]:
    address = [request.address] if isinstance(request.address, str) else list(request.address)
    return [line for text in address for line in text.splitlines() if line.strip()]


def _write(home: Home, indicium: Indicium, lines: list[str], out: Path | None) -> IssuedLabel:
    label = render_label(indicium.to_bytes(), label_info(indicium, lines))
    stem = out or home.labels / f"{indicium.device_serial}-{indicium.sequence:06d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    write_label(label, png, pdf)
    return IssuedLabel(indicium, png, pdf)


def issue(
    home: Home, request: IssueRequest, out: Path | None = None, clock: Clock = system_clock
) -> IssuedLabel:
    """Issue one indicium (durable debit first) and write its label as PNG and PDF.

    The label is laid out once with placeholder values before the meter
    debits anything, so an address the label cannot print is refused
    before a piece sequence is spent.
    """
    lines = _address_lines(request)
    with home.open_token("meter") as token:
        meter = Meter.open(token, clock)
        render_label(
            bytes(_PLACEHOLDER_LENGTH[meter.identity.algorithm]), _placeholder_info(request, lines)
        )
        indicium = meter.issue(request)
    return _write(home, indicium, lines, out)


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


@contextmanager
def logged_on(home: Home, user_id: str, password: str) -> Iterator[PSD]:
    """Power the device up, log ``user_id`` on, and power down (ending the session) after."""
    psd = PSD.power_up(home.open_device_token(), home.device)
    try:
        psd.logon(user_id, password)
        yield psd
    finally:
        psd.power_down()


# The demo's users beyond the first two, one per remaining role.
DEMO_USERS = (
    ("customer", Role.CUSTOMER),
    ("provider", Role.PROVIDER),
    ("authority", Role.CERTIFICATE_AUTHORITY),
    ("auditor", Role.AUDITOR),
    ("custodian", Role.KEY_CUSTODIAN),
)
DEMO_CUSTOMER = "DEMO-0001"


def development_password(user_id: str) -> str:
    """A random password that meets the default policy (all four classes, not the user id)."""
    while True:
        password = f"{secrets.token_urlsafe(15)}-Aa1"
        if user_id.casefold() not in password.casefold():
            return password


def setup_demo_device(
    home: Home, passwords: dict[str, str], options: InitOptions, credit_mills: int
) -> dict[str, Any]:
    """After init: every role gets a user; audit key, administration and customer authorized,
    and the provider downloads postage. Each step is its own session, as Table 2 lets only
    some roles log off."""
    with logged_on(home, options.so_user, passwords[options.so_user]) as psd:
        psd.administration_authorization(True)
        psd.create_audit_key()
    with logged_on(home, options.admin_user, passwords[options.admin_user]) as psd:
        for user_id, role in DEMO_USERS:
            psd.create_user(user_id, role, passwords[user_id])
    with logged_on(home, "provider", passwords["provider"]) as psd:
        psd.authorize_customer(DEMO_CUSTOMER)
        return psd.download_postage_value(local_provider_grant(home, credit_mills))


def local_provider_grant(home: Home, amount: int) -> Callable[[CreditRequest], CreditGrant]:
    def obtain(request: CreditRequest) -> CreditGrant:
        with home.open_token("provider") as token:
            provider = Provider.open(token, home.ledger)
            return provider.grant_credit(request, amount, system_clock().astimezone(UTC))

    return obtain


def new_device_serial() -> int:
    """A random 12-digit development serial."""
    return 100_000_000_000 + secrets.randbelow(900_000_000_000)
