"""HSM profiles and `meter hsm probe`, on the real SoftHSM2 and the real openCryptoki soft token.

The probe runs in a child process (the `meter` command), as an operator runs it: this
process never loads either module, so the tests are independent of the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import OPENCRYPTOKI_PROFILE

from meter.errors import ConfigurationError
from meter.token.profile import CAPABILITIES, ROLES, KeyAlgorithm, load_profile, profiles_dir

METER = Path(sys.executable).parent / "meter"
PROFILES = sorted(profiles_dir().glob("*.toml"))
SOFTHSM_PROFILE = profiles_dir() / "softhsm2.toml"
TESTED_HERE = {"softhsm2", "opencryptoki"}


def probe(profile: Path, pin: str, *args: str, env: dict[str, str] | None = None) -> Any:
    run = subprocess.run(
        [str(METER), "hsm", "probe", "--profile", str(profile), "--json", *args],
        env={**os.environ, **(env or {}), "HSM_USER_PIN": pin},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return run.returncode, json.loads(run.stdout) if run.stdout.strip() else None, run.stderr


# -- profiles ---------------------------------------------------------------


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_loads_strictly_with_roles_capabilities_and_sources(path: Path) -> None:
    profile = load_profile(path)
    assert set(profile.roles) == set(ROLES)
    assert profile.capabilities <= set(CAPABILITIES)
    assert profile.tested_here == (profile.name in TESTED_HERE)
    if not profile.tested_here:
        assert profile.documented_in and "from the vendor's documentation" in profile.claims_source
    for capability in ("modify_data_value", "monotonic_counter", "usage_limit"):
        profile.can(capability)  # stated either way: the loader refuses a missing one


def test_production_profiles_cover_the_devices_of_the_issue() -> None:
    modules = {load_profile(p).name: load_profile(p).module for p in PROFILES}
    assert modules["yubihsm2"].endswith("yubihsm_pkcs11.so")
    assert {"luna", "nshield", "cloudhsm", "smartcard-hsm"} <= set(modules)


def _profile_text(**replace: str) -> str:
    text = OPENCRYPTOKI_PROFILE.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("usage_limit = false", "usage_limit = false\ncounters = true", "unknown capability"),
        ("usage_limit = false\n", "", "must say true or false for: usage_limit"),
        ('no-role = "public session, no login"\n', "", "missing: no-role"),
        ('sign = "CKM_SHA256_RSA_PKCS_PSS"', 'sign = "CKM_ECDSA"', "mechanisms.sign"),
        ("tested_here = true", "tested_here = false", "documented_in"),
        ("slot = 3", 'slot = "3"', "token.slot"),
        ('selection = "slot"', 'selection = "any"', "token.selection"),
        ("pin_max = 8", "pin_max = 2", "pin_min"),
    ],
)
def test_a_bad_profile_is_refused_naming_file_and_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_profile_text(**{old: new}))
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_profile(path)
    assert str(path) in str(caught.value)


def test_provisioning_refuses_what_the_token_lacks_naming_capability_and_profile() -> None:
    opencryptoki = load_profile(OPENCRYPTOKI_PROFILE)
    opencryptoki.require_for_provisioning()  # rsa-pss-2048 and HMAC: fine
    with pytest.raises(ConfigurationError, match=r"opencryptoki.*capability raw_ecdsa"):
        opencryptoki.require_for_provisioning(KeyAlgorithm.ECDSA_P256)
    smartcard = load_profile(profiles_dir() / "smartcard-hsm.toml")
    with pytest.raises(ConfigurationError, match=r"smartcard-hsm.*hmac_sha256.*register MAC"):
        smartcard.require_for_provisioning()


def test_meter_init_refuses_before_making_anything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = subprocess.run(
        [
            str(METER),
            "--home",
            str(home),
            "--profile",
            str(profiles_dir() / "smartcard-hsm.toml"),
            "init",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "hmac_sha256" in run.stderr and "smartcard-hsm" in run.stderr
    assert not home.exists()


# -- the probe on the two tokens of CI -----------------------------------------


@pytest.fixture
def softhsm_token(softhsm: None, tmp_path: Path) -> dict[str, str]:
    """A fresh SoftHSM2 token labelled 'probe'; the environment that finds it."""
    pins = {"SOFTHSM_SO_PIN": "probe-so-pin", "SOFTHSM_USER_PIN": "probe-user-pin"}
    subprocess.run(
        [str(profiles_dir().parent / "softhsm" / "provision"), str(tmp_path), "probe"],
        env={**os.environ, **pins},
        check=True,
        capture_output=True,
        timeout=120,
    )
    return {"SOFTHSM2_CONF": str(tmp_path / "softhsm2.conf"), "PIN": pins["SOFTHSM_USER_PIN"]}


def _claims_hold(report: dict[str, Any]) -> None:
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == set(CAPABILITIES)
    wrong = [n for n, c in checks.items() if c["claimed"] != c["works"]]
    assert wrong == [], [checks[n] for n in wrong]
    assert report["wrong_claims"] == []


def test_probe_on_softhsm2_verdict_ok_and_every_claim_holds(softhsm_token: dict[str, str]) -> None:
    rc, report, err = probe(
        SOFTHSM_PROFILE, softhsm_token["PIN"], "--token-label", "probe", env=softhsm_token
    )
    assert rc == 0, err
    assert report["verdict"] == "ok" and report["missing"] == []
    assert "ECDSA" in report["mechanisms"] and "AES_GCM" in report["mechanisms"]
    _claims_hold(report)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["raw_ecdsa"]["per_second"] > 0 and checks["data_objects"]["per_second"] > 0


def test_probe_on_opencryptoki_verdict_ok_with_rsa_pss_and_every_claim_holds(
    opencryptoki: dict[str, str],
) -> None:
    rc, report, err = probe(OPENCRYPTOKI_PROFILE, opencryptoki["user_pin"])
    assert rc == 0, err
    assert report["verdict"] == "ok" and report["slot"] == 3
    assert not any(m.startswith(("EC", "ECDSA")) for m in report["mechanisms"])
    assert "AES_GCM" not in report["mechanisms"]
    _claims_hold(report)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["rsa_pss"]["needed_for"].startswith("signing")
    assert checks["rsa_pss"]["per_second"] > 0
    assert checks["modify_data_value"]["works"]


def test_probe_leaves_no_object_on_the_machine_wide_token(opencryptoki: dict[str, str]) -> None:
    probe(OPENCRYPTOKI_PROFILE, opencryptoki["user_pin"])
    code = (
        "import os, pkcs11\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        "lib = pkcs11.lib(os.environ['M'])\n"
        "slot = [s for s in lib.get_slots(token_present=True) if s.slot_id == 3][0]\n"
        "with slot.get_token().open(user_pin=os.environ['P']) as s:\n"
        "    print(len(list(s.get_objects({Attribute.APPLICATION: 'meter-probe'}))))\n"
    )
    env = {**os.environ, "M": load_profile(OPENCRYPTOKI_PROFILE).module}
    env["P"] = opencryptoki["user_pin"]
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.stdout.strip() == "0", run.stderr


def test_probe_says_unusable_when_the_profile_chooses_what_the_token_lacks(
    opencryptoki: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "ecdsa-on-opencryptoki.toml"
    path.write_text(
        _profile_text(
            **{
                'algorithm = "rsa-pss-2048"': 'algorithm = "ecdsa-p256"',
                'sign = "CKM_SHA256_RSA_PKCS_PSS"': 'sign = "CKM_ECDSA"',
            }
        )
    )
    rc, report, _ = probe(path, opencryptoki["user_pin"])
    assert rc == 3
    assert report["verdict"] == "unusable"
    assert {"capability": "raw_ecdsa", "needed_for": "signing (CKM_ECDSA)"} in report["missing"]


# -- bad input: a clear error, nothing changed ----------------------------------


def _with_module(tmp_path: Path, module: str) -> Path:
    path = tmp_path / "p.toml"
    text = OPENCRYPTOKI_PROFILE.read_text()
    path.write_text(text.replace(load_profile(OPENCRYPTOKI_PROFILE).module, module))
    return path


def test_probe_of_a_module_that_does_not_exist(tmp_path: Path) -> None:
    rc, report, _ = probe(_with_module(tmp_path, "/nonexistent/libnothing.so"), "1234")
    assert rc == 1 and report["error"] == "ConfigurationError"
    assert "/nonexistent/libnothing.so does not exist" in report["message"]


def test_probe_of_a_library_that_is_not_pkcs11(tmp_path: Path) -> None:
    libz = next(p for p in Path("/lib/x86_64-linux-gnu").glob("libz.so.1*"))
    rc, report, _ = probe(_with_module(tmp_path, str(libz)), "1234")
    assert rc == 1 and "is not a PKCS#11 module" in report["message"]


def _token_flags(module: str) -> int:
    code = (
        "import os, pkcs11\n"
        "lib = pkcs11.lib(os.environ['M'])\n"
        "slot = [s for s in lib.get_slots(token_present=True) if s.slot_id == 3][0]\n"
        "print(int(slot.get_token().flags))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "M": module},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(run.stdout)


def test_probe_refuses_a_pin_of_the_wrong_length_before_any_login(
    opencryptoki: dict[str, str],
) -> None:
    module = load_profile(OPENCRYPTOKI_PROFILE).module
    before = _token_flags(module)
    rc, report, _ = probe(OPENCRYPTOKI_PROFILE, "nine-char")
    assert rc == 1 and "takes 4 to 8" in report["message"]
    assert _token_flags(module) == before  # no failed login counted (CKF_USER_PIN_COUNT_LOW)


def test_probe_of_a_slot_without_a_token(opencryptoki: dict[str, str]) -> None:
    rc, report, _ = probe(OPENCRYPTOKI_PROFILE, opencryptoki["user_pin"], "--slot", "77")
    assert rc == 1 and "no token at slot 77" in report["message"]
