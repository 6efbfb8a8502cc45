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


@pytest.fixture
def home(softhsm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A new, empty meter home with the test PINs in the environment."""
    for var, pin in TEST_PINS.items():
        monkeypatch.setenv(var, pin)
    yield Home.at(tmp_path / "home")


@pytest.fixture
def provisioned(home: Home) -> Home:
    """A home with postal root, provider and a certified ECDSA meter, no credit yet."""
    from meter.cli import workflows

    workflows.init_home(home, workflows.InitOptions(device_serial=983973031309))
    return home
