"""The reload lab: a set-up home made ready for reloads, over either ledger back end.

Used by tests/_reload_harness.py (the fault harness), the reload tests and scripts. The
accounts ledger is a location, as `meter provider --db` takes it: a SQLite file's path or
a postgresql:// URL (meter.provider.ledger_sql.open_ledger opens either).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from meter.cli.home import Home

if TYPE_CHECKING:
    from meter.provider.ledger_sql import SqlLedger
    from meter.provider.reload_server import ReloadServer
    from meter.psd.firmware import PSD

__all__ = [
    "AUDITOR_USER",
    "AUTHORITY_USER",
    "CUSTOMER",
    "FUNDS",
    "PROVIDER_USER",
    "Lab",
    "certify_reload_key",
    "make_home",
    "meter_and_provider",
    "prepare_lab",
    "second_meter",
]

CUSTOMER = "DEMO-0001"
PROVIDER_USER = ("provider", "Vendor-pass-0004")
AUTHORITY_USER = ("authority", "Issuer-pass-0005")
AUDITOR_USER = ("auditor", "Review-pass-0006")
FUNDS = 10**12  # mills the customer pays in: never the limit in a soak


@dataclass
class Lab:
    home: Home
    ledger: str  # the accounts ledger: a SQLite file's path or a postgresql:// URL
    status: Path
    serial: int
    baseline: int  # the meter's control total before any reload (local credit of set-up)
    funded: int


def certify_reload_key(home: Home) -> tuple[int, int]:
    """Authorize PSD for the reload key: the home's provider certifies the meter's reload
    key and the meter installs the certificate. The meter's serial and control total."""
    from cryptography.hazmat.primitives import serialization

    from meter.pki.reload_certs import make_reload_certificate
    from meter.provider import Provider
    from meter.psd.firmware import PSD

    now = datetime.now(UTC).replace(microsecond=0)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(*AUTHORITY_USER)
        key = psd.reload_key()
        with home.open_token("provider") as token:
            provider = Provider.open(token, home.ledger)
            cert = make_reload_certificate(
                bytes.fromhex(key["public_key_spki_hex"]),
                key["device_serial"],
                provider.certificate,
                provider.signer(),
                now,
            )
        psd.install_reload_certificate(cert.public_bytes(serialization.Encoding.PEM))
        return int(key["device_serial"]), psd._require_meter().registers.control_total


def prepare_lab(home: Home, ledger: str | None = None) -> Lab:
    """A set-up home (tests/conftest.py's ``device_home``) made ready for reloads: the
    meter's reload key certified, the root's status of the provider, a ledger (``ledger``,
    an empty one: by default a SQLite file in the home) with the customer funded and the
    meter authorized to it."""
    from meter.pki.reload_certs import ProviderStatus, ProviderStatusKind
    from meter.provider import PostalRoot, Provider
    from meter.provider.ledger_sql import open_ledger

    serial, baseline = certify_reload_key(home)
    now = datetime.now(UTC).replace(microsecond=0)
    with home.open_token("provider") as token:
        provider_cert = Provider.open(token, home.ledger).certificate
    with home.open_token("postal-root") as token:
        root = PostalRoot.open(token)
        status = ProviderStatus.issue(provider_cert, ProviderStatusKind.GOOD, root.signer(), now)
    status_path = home.path / "provider-status.bin"
    status_path.write_bytes(status.to_bytes())
    location = ledger or str(home.path / "accounts.sqlite")
    opened = open_ledger(location)
    try:
        opened.create_customer(CUSTOMER, "Demo Mailer", now)
        opened.fund(CUSTOMER, FUNDS, "lab", now)
        opened.authorize_meter(CUSTOMER, serial, now)
    finally:
        opened.close()
    return Lab(home, location, status_path, serial, baseline, FUNDS)


@contextmanager
def meter_and_provider(
    lab: Lab,
    home: Home | None = None,
    *,
    status: bytes | None = None,
    user: tuple[str, str] = PROVIDER_USER,
) -> Iterator[tuple[PSD, ReloadServer, SqlLedger]]:
    """In one process: the firmware over the meter token of ``home`` (the lab's by
    default), logged on as ``user``, and the provider's ReloadServer over that home's
    provider token and the lab's ledger, stapling ``status`` (the lab's by default)."""
    from meter.provider import Provider
    from meter.provider.ledger_sql import open_ledger
    from meter.provider.reload_server import ReloadServer
    from meter.psd.firmware import PSD

    home = home or lab.home
    with (
        PSD.power_up(home.open_device_token(), home.device) as psd,
        home.open_token("provider") as token,
    ):
        psd.logon(*user)
        ledger = open_ledger(lab.ledger)
        try:
            provider = Provider.open(token, home.ledger)
            server = ReloadServer(provider, ledger, status or lab.status.read_bytes())
            yield psd, server, ledger
        finally:
            ledger.close()


def second_meter(first: Home, path: Path, device_serial: int) -> Home:
    """Another meter of the same postal root and provider: a new home at ``path`` holding
    copies of ``first``'s root and provider tokens (the same keys) and a meter of its own,
    provisioned, set up (users, audit key, customer authorized; no credit) and with its
    reload key certified. ``first``'s tokens must be closed (one SoftHSM2 store at a time
    in a process); the lab's PINs and passwords are in the environment."""
    from meter.cli import provision
    from meter.token.softhsm import conf_path, ensure_conf, token_copies_dir, token_dir
    from tests.conftest import TEST_METER_PINS, TEST_POLICY, set_up

    second = Home.at(path)
    second.device.mkdir(parents=True, mode=0o700)
    (second.device / "policy.toml").write_text(TEST_POLICY)
    for folder in (token_dir, token_copies_dir):
        shutil.copytree(folder(first.path), folder(second.path))
    if (first.path / "provider").exists():  # the development provider's local books
        shutil.copytree(first.path / "provider", second.path / "provider")
    # The copy holds the first meter's token too; SoftHSM2's own tool removes it by label.
    ensure_conf(second.lab_profile, second.path)
    conf = conf_path(second.lab_profile, second.path)
    subprocess.run(
        ["softhsm2-util", "--delete-token", "--token", second.token_label("meter")],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
    )
    kept = {p.name for p in token_dir(second.path).iterdir()}
    for copy in token_copies_dir(second.path).iterdir():
        if copy.name not in kept:  # the removed token's verified copy
            shutil.rmtree(copy)
    provision.init_home(
        second, provision.InitOptions(device_serial=device_serial), meter_pins=TEST_METER_PINS
    )
    set_up(second, credit_mills=0)
    certify_reload_key(second)
    return second


def make_home(base: Path) -> Home:
    """A new set-up home outside pytest (scripts/soak-reload, scripts/bench_reload.py): the
    test suite's lab PINs and passwords in this process's environment."""
    from meter.cli import provision
    from tests.conftest import TEST_METER_PINS, TEST_PASSWORDS, TEST_PINS, TEST_POLICY, set_up

    os.environ.update(TEST_PINS)
    os.environ.update(TEST_PASSWORDS)
    home = Home.at(base / "home")
    home.device.mkdir(parents=True, mode=0o700)
    (home.device / "policy.toml").write_text(TEST_POLICY)
    provision.init_home(
        home, provision.InitOptions(device_serial=983973031309), meter_pins=TEST_METER_PINS
    )
    set_up(home)
    return home
