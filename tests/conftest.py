"""Shared fixtures: real SoftHSM2 homes. Skipped locally without SoftHSM2, failed under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from meter.cli.home import PIN_VARIABLES, Home
from meter.indicium import RateCategory
from meter.protocol.credit import CreditGrant, CreditRequest
from meter.protocol.issue import IssueRequest
from meter.token import Token, load_profile
from meter.token.profile import profiles_dir
from tests._lab_pins import LAB_METER_PINS

if TYPE_CHECKING:
    from _card_readers import Readers

    from meter.psd.firmware import PSD

SOFTHSM_MODULE = load_profile().module
TEST_PINS = {
    var: f"test-{var.lower().replace('_', '-')}" for pair in PIN_VARIABLES.values() for var in pair
}
# The meter token's PINs are no environment variable: tests provision with these, as a lab
# would, so that a test can open the token itself to check what the device did.
TEST_METER_PINS = {"user_pin": "test-meter-user-pin", "so_pin": "test-meter-so-pin"}
# The piece most device tests issue: a first-class letter, 73 cents.
LETTER = IssueRequest(
    postage=730,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="62704",
    address=["Jane Q. Public", "1234 Main St."],
)


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


OPENCRYPTOKI_PROFILE = profiles_dir() / "opencryptoki.toml"
# Lab PINs of openCryptoki's soft token (it takes 4 to 8 characters). The token is
# machine-wide: OPENCRYPTOKI_SO_PIN / OPENCRYPTOKI_USER_PIN name others where it was
# initialized with other PINs.
OPENCRYPTOKI_LAB_PINS = {"so_pin": "labso-01", "user_pin": "labus-01"}


def _pkcsslotd_running() -> bool:
    try:
        pid = int(Path("/run/pkcsslotd.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture
def opencryptoki() -> dict[str, str]:
    """openCryptoki's soft token, initialized with the lab PINs if it is new; its PINs.

    Initialized in a child process, so this process never loads the module (the tests
    that use it run the meter in children too).
    """
    profile = load_profile(OPENCRYPTOKI_PROFILE)
    require_service(
        os.path.exists(profile.module) and _pkcsslotd_running(),
        f"openCryptoki ({profile.module} with pkcsslotd; scripts/opencryptoki-services start)",
    )
    pins = {
        "so_pin": os.environ.get("OPENCRYPTOKI_SO_PIN", OPENCRYPTOKI_LAB_PINS["so_pin"]),
        "user_pin": os.environ.get("OPENCRYPTOKI_USER_PIN", OPENCRYPTOKI_LAB_PINS["user_pin"]),
    }
    env = {
        **os.environ,
        "SLOT_FACTORY_SO_PIN": profile.selection.factory_so_pin or "",
        "SLOT_SO_PIN": pins["so_pin"],
        "SLOT_USER_PIN": pins["user_pin"],
    }
    command = [sys.executable, "-m", "meter.token.slot_token", profile.module]
    command += [str(profile.selection.slot), "meter-ci"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
    return pins


# The meter token's profiles the token tests run on (pytest parameter `meter_profile`).
METER_PROFILES = ("softhsm2", "opencryptoki")


@pytest.fixture(params=METER_PROFILES)
def meter_profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def meter_home(meter_profile: str, home: Home, request: pytest.FixtureRequest) -> Iterator[Home]:
    """``home`` whose meter token is on ``meter_profile`` (provider and root on SoftHSM2);
    on openCryptoki the slot is emptied of meter objects before and after."""
    if meter_profile == "softhsm2":
        yield home
        return
    pins = request.getfixturevalue("opencryptoki")
    path = profiles_dir() / f"{meter_profile}.toml"
    wipe_meter_objects(path, pins["user_pin"])
    LAB_METER_PINS[home.path] = pins
    try:
        yield Home.at(home.path, path)
    finally:
        LAB_METER_PINS.pop(home.path, None)
        wipe_meter_objects(path, pins["user_pin"])


@pytest.fixture
def provisioned_on(meter_home: Home) -> Home:
    """``provisioned``, with the meter token on each profile of METER_PROFILES."""
    from meter.cli import provision

    provision.init_home(
        meter_home,
        provision.InitOptions(device_serial=983973031309),
        meter_pins=LAB_METER_PINS.get(meter_home.path, TEST_METER_PINS),
    )
    return meter_home


@pytest.fixture
def device_home_on(provisioned_on: Home) -> Home:
    """``device_home``, with the meter token on each profile of METER_PROFILES."""
    set_up(provisioned_on)
    return provisioned_on


# The first users' passwords; they meet the default policy.
TEST_PASSWORDS = {"METER_ADMIN_PASSWORD": "Wheel-pass-0001", "METER_SO_PASSWORD": "Guard-pass-0002"}
# scrypt at the policy's floor (2**14) keeps hundreds of test logons quick.
TEST_POLICY = "[password]\nscrypt_log2_n = 14\n"


@pytest.fixture
def home(softhsm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A new, empty meter home with the provider's and postal root's test PINs and the
    first passwords in the environment."""
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
    from meter.cli import provision

    provision.init_home(
        home, provision.InitOptions(device_serial=983973031309), meter_pins=TEST_METER_PINS
    )
    return home


def open_meter_token(home: Home) -> Token:
    """The meter's token, logged in with the lab's PIN: for checking what the device did."""
    return home.open_token("meter", LAB_METER_PINS.get(home.path, TEST_METER_PINS)["user_pin"])


# What the meter makes on a token: keys by label, data objects by application. The tests
# remove exactly these from the machine-wide openCryptoki token, before and after each test
# (they are serialized: two meters on one token cannot be told apart, and the meter refuses
# a token that carries one already). Re-initializing the slot is no way to empty it: on
# openCryptoki 3.8.1 C_InitToken over an initialized soft token leaves an SO login that
# fails (CKR_FUNCTION_FAILED) until the SO PIN is set again.
METER_KEY_LABELS = ("indicium-signing", "register-mac", "audit-signing", "key-exchange")
METER_APPLICATION_PREFIX = "meter."


def wipe_meter_objects(profile_path: Path, user_pin: str) -> int:
    """Destroy every meter object on the profile's slot token; how many there were."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    from meter.token import load_module

    profile = load_profile(profile_path)
    module = load_module(profile.module)
    assert profile.selection.slot is not None
    token = module.token_in_slot(profile.selection.slot)
    count = 0
    with module.lock, token.open(rw=True, user_pin=user_pin) as session:
        for obj in list(session.get_objects({Attribute.TOKEN: True})):
            try:  # another program's object may refuse to show an attribute: not ours
                label = str(obj[Attribute.LABEL])
                mine = label in METER_KEY_LABELS
                if obj[Attribute.CLASS] == ObjectClass.DATA:
                    mine = str(obj[Attribute.APPLICATION]).startswith(METER_APPLICATION_PREFIX)
            except pkcs11.PKCS11Error:
                mine = False
            if mine:
                obj.destroy()
                count += 1
    return count


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


def set_up(home: Home, credit_mills: int = 100_000) -> None:
    """In the firmware itself (no device process): a user per role, an audit key,
    administration and a customer authorized, and credit from the home's provider."""
    from meter.cli import workflows
    from meter.psd.firmware import PSD

    passwords = dict(ROLE_USERS.values())
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon("security", passwords["security"])
        psd.administration_authorization(True)
        psd.create_audit_key()
        psd.logoff()
        psd.logon("admin", passwords["admin"])
        for user_id, role in workflows.DEMO_USERS:
            psd.create_user(user_id, role, passwords[user_id])
        psd.logoff()
        psd.logon("provider", passwords["provider"])
        psd.authorize_customer(
            workflows.local_customer_authorization(home, workflows.DEMO_CUSTOMER)
        )
        if credit_mills:
            psd.download_postage_value(local_grant(home, credit_mills))


def local_grant(home: Home, amount: int) -> Callable[[CreditRequest], CreditGrant]:
    """The home's development provider granting ``amount`` for a request (its own token)."""
    from meter.provider import Provider

    def obtain(request: CreditRequest) -> CreditGrant:
        with home.open_token("provider") as token:
            return Provider.open(token, home.ledger).grant_credit(
                request, amount, datetime.now(UTC).replace(microsecond=0)
            )

    return obtain


@pytest.fixture
def device_home(provisioned: Home) -> Home:
    """A certified meter with a user per role, an audit key, an authorized customer, $100."""
    set_up(provisioned)
    return provisioned


@pytest.fixture
def running(device_home: Home) -> Iterator[Home]:
    """``device_home`` with its device process running (stopped after the test)."""
    from meter.cli.device_process import running_device

    with running_device(device_home):
        yield device_home


class Clock:
    """A host clock the test moves by hand (``clock.now += timedelta(...)``)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def psd(device_home: Home, clock: Clock) -> Iterator[PSD]:
    """``device_home``'s firmware powered up in this process on ``clock``, nobody logged on.

    A module that wants it powered up otherwise (logged on as a role) defines its own ``psd``.
    """
    from meter.psd.firmware import PSD

    device = PSD.power_up(device_home.open_device_token(), device_home.device, clock=clock)
    yield device
    device.power_down()


@pytest.fixture
def readers() -> Iterator[Readers]:
    """The two vpcd readers, to insert emulated OpenPGP cards into (tests/_card_readers.py);
    every card is removed after the test."""
    from _card_readers import READERS, Readers

    from meter.custody.card import CardError, list_readers

    try:
        names = list_readers()
    except CardError:
        names = []
    require_service(
        all(name in names for name in READERS.values()),
        "pcscd with two vpcd readers (scripts/pcsc-services start)",
    )
    slots = Readers()
    try:
        yield slots
    finally:
        slots.clear()
