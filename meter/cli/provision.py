"""Provisioning a home (``meter init``): the device's first-run service, run as its account.

The development postal root and provider get their own tokens (PINs from the
environment or a prompt). The meter's token gets random PINs that nobody is
shown, as long as the token takes (its C_GetTokenInfo range: 8 characters on
openCryptoki's soft token, 32 on SoftHSM2): they are sealed into the slots of
its first two users, an Administrator and a Security Officer, and live
otherwise only in this process's memory until it ends. A token in a fixed
slot that its administrator initialized already is opened with the PINs
given in METER_TOKEN_SO_PIN / METER_TOKEN_USER_PIN (or a prompt), which are
replaced by random ones (C_SetPIN) once the meter is provisioned. Keys are generated in the tokens. The
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
from meter.psd.identity import IDENTITY_APPLICATION
from meter.psd.passwords import PasswordPolicy
from meter.psd.roles import Role
from meter.psd.users import UserStore
from meter.token import KeyAlgorithm, Pkcs11Module, ensure_token
from meter.token.profile import Selection
from meter.token.slot_token import (
    change_pins,
    check_pin_length,
    ensure_slot_token,
    find_slot,
    is_initialized,
    new_pins,
    pin_length_range,
)

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


# The PINs an administrator initialized a slot's token with, replaced at provisioning.
CURRENT_PIN_VARIABLES = ("METER_TOKEN_USER_PIN", "METER_TOKEN_SO_PIN")


@dataclass(frozen=True)
class _MeterToken:
    created: bool
    pins: dict[str, str]  # the PINs sealed into the users' slots
    login: dict[str, str]  # the token's PINs during provisioning (``pins`` once it is done)
    module: Pkcs11Module | None  # for a slot's token: where to change the PINs
    slot_id: int | None


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
    store, first = first_users(home, options)  # passwords checked before anything is made
    created = {}
    for party in ("postal-root", "provider"):
        user_var, so_var = PIN_VARIABLES[party]
        so_pin = pin_from_env(so_var, f"SO PIN of the {party} token")
        user_pin = pin_from_env(user_var, f"user PIN of the {party} token")
        created[party] = ensure_token(
            home.lab_profile, home.path, home.token_label(party), so_pin, user_pin
        )
    meter_token = _meter_token(home, meter_pins)
    created["meter"] = meter_token.created
    pins, login = meter_token.pins, meter_token.login
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
            with home.open_token("meter", login["user_pin"]) as mtoken:
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
                status = meter.status()
    if login != pins and meter_token.module is not None and meter_token.slot_id is not None:
        # Last: until now the administrator's PINs still open the token.
        slot = find_slot(meter_token.module, slot=meter_token.slot_id, label=None)
        change_pins(meter_token.module, slot, login, pins)
    home.keep_profile()  # marks the home provisioned; later commands need no --profile
    return {"created": created, "meter": status, "certificates": paths, "users": users}


def _meter_token(home: Home, lab_pins: dict[str, str] | None) -> _MeterToken:
    """Make or take the meter's token, refusing one that carries a meter already.

    In the home's store: a new token, with random PINs (or the lab's). In a slot: an
    uninitialized token is initialized with the profile's factory SO PIN and random
    PINs; an initialized one is opened with the lab's PINs (kept) or the
    administrator's (replaced at the end). Every PIN is checked against the token's range.
    """
    profile = home.profile
    if home.meter_in_store:
        pins = lab_pins or new_pins(profile.selection.pin_min, profile.selection.pin_max)
        created = ensure_token(
            profile, home.path, home.token_label("meter"), pins["so_pin"], pins["user_pin"]
        )
        return _MeterToken(created, pins, pins, None, None)
    module = home.meter_module()
    by_slot = profile.selection.kind is Selection.SLOT
    slot = find_slot(
        module,
        slot=profile.selection.slot if by_slot else None,
        label=None if by_slot else profile.labels.meter,
    )
    low, high = pin_length_range(module, slot)
    where = f"the meter's token (slot {slot.slot_id} of {module.path}, HSM profile {profile.name})"
    if not is_initialized(module, slot):
        factory = profile.selection.factory_so_pin
        if factory is None:
            raise ConfigurationError(
                f"{where} is not initialized, and the profile names no factory SO PIN: "
                "initialize it with the vendor's tools first"
            )
        pins = lab_pins or new_pins(low, high)
        ensure_slot_token(
            module,
            slot,
            label=profile.labels.meter,
            factory_so_pin=factory,
            so_pin=pins["so_pin"],
            user_pin=pins["user_pin"],
        )
        return _MeterToken(True, pins, pins, module, slot.slot_id)
    if lab_pins is not None:
        login = pins = lab_pins
    else:
        user_var, so_var = CURRENT_PIN_VARIABLES
        login = {
            "user_pin": pin_from_env(user_var, f"the user PIN {where} has now"),
            "so_pin": pin_from_env(so_var, f"the SO PIN {where} has now"),
        }
        pins = new_pins(low, high)
    for name, what in (("user_pin", "the user PIN"), ("so_pin", "the SO PIN")):
        check_pin_length(module, slot, login[name], what)
    with home.open_token("meter", login["user_pin"]) as token:
        if token.data_objects(IDENTITY_APPLICATION):
            raise ConfigurationError(
                f"{where} carries a provisioned meter already (another home's?): one token, "
                "one meter"
            )
    return _MeterToken(False, pins, login, module, slot.slot_id)


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
