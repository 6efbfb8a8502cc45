"""Provisioning SoftHSM2 tokens under a folder of their own (development and CI).

A real HSM is initialized with its vendor's tools; SoftHSM2 tokens are made
here, idempotently, without PINs ever reaching a process argument: the token
is initialized through PKCS#11 (C_InitToken, C_InitPIN) rather than by
calling ``softhsm2-util --pin ...``.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pkcs11
from pkcs11 import TokenFlag

from meter.errors import ConfigurationError, TokenError
from meter.token._errors import translated
from meter.token.module import Pkcs11Module, load_module
from meter.token.profile import HsmProfile
from meter.token.token_files import keep_verified_copy

__all__ = [
    "conf_path",
    "ensure_conf",
    "ensure_token",
    "provision_main",
    "softhsm_env",
    "token_copies_dir",
    "token_dir",
]

_CONF_TEMPLATE = """\
# Written by meter: SoftHSM2 configuration for the tokens of this home.
directories.tokendir = {tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


def conf_path(profile: HsmProfile, home: Path) -> Path | None:
    """Where this home's SOFTHSM2_CONF lives, or None for a profile that is not SoftHSM2."""
    return None if profile.softhsm_conf is None else home / profile.softhsm_conf


def token_dir(home: Path) -> Path:
    return home / "tokens"


def token_copies_dir(home: Path) -> Path:
    """Verified copies of the tokens' token.object files, outside SoftHSM2's token folder."""
    return home / "token-copies"


def ensure_conf(profile: HsmProfile, home: Path) -> Path:
    """Write the home's softhsm2.conf and token folder if missing; return the conf path."""
    path = conf_path(profile, home)
    if path is None:
        raise ConfigurationError(f"profile {profile.name} is not a SoftHSM2 profile")
    tokens = token_dir(home).resolve()
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = _CONF_TEMPLATE.format(tokendir=tokens)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def softhsm_env(profile: HsmProfile, home: Path) -> dict[str, str]:
    path = conf_path(profile, home)
    return {} if path is None else {"SOFTHSM2_CONF": str(path.resolve())}


def _free_slot(module: Pkcs11Module) -> pkcs11.Slot:
    with module.lock, translated(f"module {module.path}", "list slots"):
        for slot in module.lib.get_slots(token_present=True):
            if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
                return slot
    raise TokenError(f"module {module.path}: no free slot to initialize a token in")


def _token_exists(module: Pkcs11Module, label: str) -> bool:
    with module.lock:
        return any(True for _ in module.lib.get_tokens(token_label=label))


def ensure_token(profile: HsmProfile, home: Path, label: str, so_pin: str, user_pin: str) -> bool:
    """Create the token ``label`` in the home's SoftHSM2 store unless it exists.

    Returns True when it was created now. PINs come from the caller (prompt or
    environment), never from a file. Either way the token's token.object is
    then copied to :func:`token_copies_dir` if its copy is missing or stale,
    for :func:`meter.token.guard_token_files` to restore after a crash.
    """
    ensure_conf(profile, home)
    module = load_module(profile.module, softhsm_env(profile, home))
    if _token_exists(module, label):
        _keep_copy(module, home, label)
        return False
    slot = _free_slot(module)
    where = f"token '{label}' in module {module.path}"
    # python-pkcs11 does not wrap C_InitToken; the library is already
    # initialized by python-pkcs11 and dlopen hands back the same instance.
    lib = ctypes.CDLL(module.path)
    lib.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib.C_InitToken.restype = ctypes.c_ulong
    so = so_pin.encode()
    padded = label.encode().ljust(32, b" ")
    if len(padded) > 32:
        raise ConfigurationError(f"token label '{label}' is longer than 32 bytes")
    with module.lock:
        rv = lib.C_InitToken(slot.slot_id, so, len(so), padded)
    if rv != 0:
        raise TokenError(f"{where}: C_InitToken failed with CKR 0x{rv:08x}")
    token = module.get_token(label)
    with (
        module.lock,
        translated(where, "set the user PIN"),
        token.open(rw=True, so_pin=so_pin) as session,
    ):
        session.init_pin(user_pin)
    _keep_copy(module, home, label)
    return True


def _keep_copy(module: Pkcs11Module, home: Path, label: str) -> None:
    # Under the module lock: no thread of this process rewrites token.object meanwhile.
    with module.lock:
        keep_verified_copy(token_dir(home).resolve(), token_copies_dir(home), label)


def provision_main(argv: list[str]) -> int:
    """``python -m meter.token.softhsm DIR LABEL``: provision a token; PINs from the environment."""
    import sys

    from meter.token.profile import load_profile

    if len(argv) != 2:
        print(
            "usage: softhsm/provision DIR LABEL  (PINs in SOFTHSM_SO_PIN, SOFTHSM_USER_PIN)",
            file=sys.stderr,
        )
        return 2
    so_pin, user_pin = os.environ.get("SOFTHSM_SO_PIN"), os.environ.get("SOFTHSM_USER_PIN")
    if not so_pin or not user_pin:
        print("set SOFTHSM_SO_PIN and SOFTHSM_USER_PIN", file=sys.stderr)
        return 2
    profile = load_profile()
    home = Path(argv[0]).resolve()
    created = ensure_token(profile, home, argv[1], so_pin, user_pin)
    print(
        f"{'created' if created else 'exists'}: token '{argv[1]}'; SOFTHSM2_CONF={conf_path(profile, home)}"
    )
    return 0
