"""Provisioning a home (``meter init``): the device's first-run service, run as its account.

The development postal root and provider get their own tokens (PINs from the
environment or a prompt). The meter's token gets random PINs that nobody is
shown: they are sealed into the slots of its first two users, an
Administrator and a Security Officer, and live otherwise only in this
process's memory until it ends. Keys are generated in the tokens. The
provider then certifies the meter and the chain is installed, pinned by the
register record. Afterwards only the device process opens the meter token.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from meter.cli.home import PIN_VARIABLES, Home, password_from_env, pin_from_env
from meter.errors import ConfigurationError
from meter.provider import PostalRoot, Provider
from meter.psd import DeviceIdentity, Meter
from meter.psd.device import Clock, system_clock
from meter.psd.firmware import secrets_for
from meter.psd.passwords import PasswordPolicy
from meter.psd.roles import Role
from meter.psd.users import UserStore
from meter.token import KeyAlgorithm, ensure_token

__all__ = ["InitOptions", "export_certificates", "init_home", "new_device_serial"]


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


def new_device_serial() -> int:
    """A random 12-digit development serial."""
    return 100_000_000_000 + secrets.randbelow(900_000_000_000)


def new_meter_pins() -> dict[str, str]:
    """Random PINs for a new meter token (192 bits each), never shown to anybody."""
    return {name: secrets.token_urlsafe(24) for name in ("user_pin", "so_pin")}


def init_home(
    home: Home,
    options: InitOptions,
    clock: Clock = system_clock,
    *,
    meter_pins: dict[str, str] | None = None,
) -> dict[str, object]:
    """Provision the home: postal root and provider (kept if present) and a new certified meter.

    ``meter_pins`` is for a lab that must open the new meter token itself (tests,
    benchmarks); by default the PINs are random and never leave this process.
    """
    # What the token cannot do is refused before anything is made.
    home.profile.require_for_provisioning(options.algorithm)
    home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if home.token_exists("meter"):
        raise ConfigurationError(
            f"the meter in {home.path} is provisioned already; its PINs are sealed in the "
            "users' slots: start the device and log on (meter device serve, meter --user ID ...)"
        )
    pins = meter_pins or new_meter_pins()
    store, first = first_users(home, options)  # passwords checked before anything is made
    created = {}
    for party in ("postal-root", "provider"):
        user_var, so_var = PIN_VARIABLES[party]
        so_pin = pin_from_env(so_var, f"SO PIN of the {party} token")
        user_pin = pin_from_env(user_var, f"user PIN of the {party} token")
        created[party] = ensure_token(
            home.profile, home.path, home.token_label(party), so_pin, user_pin
        )
    created["meter"] = ensure_token(
        home.profile, home.path, home.token_label("meter"), pins["so_pin"], pins["user_pin"]
    )
    now = clock().astimezone(UTC).replace(microsecond=0)
    users = [
        store.create(uid, role, pw, secrets_for(role, pins), now).to_json()
        for uid, role, pw in first
    ]
    with home.open_token("postal-root") as token:
        root = (
            PostalRoot.create(token, options.root_name, now)
            if created["postal-root"]
            else PostalRoot.open(token)
        )
        with home.open_token("provider") as ptoken:
            if created["provider"]:
                provider = Provider.create(ptoken, home.ledger)
                cert = root.certify_provider(
                    provider.public_key_spki, options.authorization_id, options.provider_name, now
                )
                provider.install_certificate(cert, root.certificate, now)
            else:
                provider = Provider.open(ptoken, home.ledger)
            with home.open_token("meter", pins["user_pin"]) as mtoken:
                identity = DeviceIdentity(
                    device_serial=options.device_serial,
                    vendor_model=options.vendor_model,
                    authorization_id=provider.authorization_id,
                    algorithm=options.algorithm or home.profile.signing_algorithm,
                    software_id=options.software_id,
                )
                meter = Meter.provision(mtoken, identity, clock)
                meter_cert = provider.certify_meter(
                    meter.public_key_spki, meter.identity.device_serial, now
                )
                meter.install_certificates(meter_cert, provider.certificate, root.certificate)
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
    home.device.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    certs = meter.certificates
    return write_certificates(
        out or home.certs,
        {
            "postal_root": certs.root.public_bytes(serialization.Encoding.PEM).decode(),
            "provider": certs.provider.public_bytes(serialization.Encoding.PEM).decode(),
            "meter": certs.meter.public_bytes(serialization.Encoding.PEM).decode(),
        },
    )


def write_certificates(out: Path, pems: dict[str, str]) -> dict[str, str]:
    """PEM files ``postal-root.pem``, ``provider.pem``, ``meter.pem`` in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pem in pems.items():
        path = out / f"{name.replace('_', '-')}.pem"
        path.write_text(pem)
        paths[name] = str(path)
    return paths
