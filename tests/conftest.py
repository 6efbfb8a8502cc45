"""Shared fixtures: real SoftHSM2 homes. Skipped locally without SoftHSM2, failed under CI=true."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meter.cli.home import PIN_VARIABLES, Home
from meter.token import load_profile

SOFTHSM_MODULE = load_profile().module
TEST_PINS = {
    var: f"test-{var.lower().replace('_', '-')}" for pair in PIN_VARIABLES.values() for var in pair
}


def require_service(available: bool, what: str) -> None:
    """Skip when a real service is missing; under CI that is a failure, never a silent pass."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI=true but is not available")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def softhsm() -> None:
    require_service(os.path.exists(SOFTHSM_MODULE), f"SoftHSM2 ({SOFTHSM_MODULE})")


# The first users' passwords; they meet the default policy.
TEST_PASSWORDS = {"METER_ADMIN_PASSWORD": "Wheel-pass-0001", "METER_SO_PASSWORD": "Guard-pass-0002"}
# scrypt at the policy's floor (2**14) keeps hundreds of test logons quick.
TEST_POLICY = "[password]\nscrypt_log2_n = 14\n"


@pytest.fixture
def home(softhsm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A new, empty meter home with the test PINs and first passwords in the environment.

    The meter PINs in the environment stand for a lab provisioning station:
    tests open the meter token directly as well as through users' logons.
    """
    for var, pin in TEST_PINS.items():
        monkeypatch.setenv(var, pin)
    for var, password in TEST_PASSWORDS.items():
        monkeypatch.setenv(var, password)
    home = Home.at(tmp_path / "home")
    home.device.mkdir(parents=True, mode=0o700)
    (home.device / "policy.toml").write_text(TEST_POLICY)
    yield home


@pytest.fixture
def provisioned(home: Home) -> Home:
    """A home with postal root, provider and a certified ECDSA meter, no credit yet."""
    from meter.cli import workflows

    workflows.init_home(home, workflows.InitOptions(device_serial=983973031309))
    return home


# One user per role on a set-up device; passwords meet the default policy.
ROLE_USERS: dict[str, tuple[str, str]] = {
    "administrator": ("admin", "Wheel-pass-0001"),
    "security-officer": ("security", "Guard-pass-0002"),
    "customer": ("customer", "Mailer-pass-0003"),
    "provider": ("provider", "Vendor-pass-0004"),
    "certificate-authority": ("authority", "Issuer-pass-0005"),
    "auditor": ("auditor", "Review-pass-0006"),
    "key-custodian": ("custodian", "Keeper-pass-0007"),
}


@pytest.fixture
def device_home(provisioned: Home) -> Home:
    """A certified meter with a user per role, an audit key, an authorized customer, $100."""
    from meter.cli import workflows

    passwords = dict(ROLE_USERS.values())
    workflows.setup_demo_device(provisioned, passwords, workflows.InitOptions(0), 100_000)
    return provisioned
