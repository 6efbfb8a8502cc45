"""Tokens in fixed slots (openCryptoki's soft token, an HSM partition): select and initialize.

SoftHSM2 makes a new token per label in a folder of the home's own
(:mod:`meter.token.softhsm`). Most other modules instead offer a fixed set of
slots, each with one token that an administrator initializes once with the
vendor's tools. For openCryptoki's soft token the meter can do that step
itself, through PKCS#11 (C_InitToken, C_SetPIN, C_InitPIN), so that no PIN
ever reaches a process argument (``pkcsconf -I -S PIN`` would put it in
``/proc/*/cmdline``).

Initializing a token erases it, so :func:`ensure_slot_token` does it only
when the token says it is not initialized (no CKF_TOKEN_INITIALIZED).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import string
import sys

import pkcs11
from pkcs11 import TokenFlag

from meter.errors import ConfigurationError, MeterError, TokenError
from meter.token._errors import translated
from meter.token.module import Pkcs11Module, load_module

__all__ = [
    "change_pins",
    "check_pin_length",
    "ensure_slot_token",
    "find_slot",
    "is_initialized",
    "new_pins",
    "pin_length_range",
]

# The characters of a generated PIN: letters, digits, "-" and "_" (6 bits each), which every
# token tested here accepts (PKCS#11 only promises printable ASCII is allowed).
_PIN_ALPHABET = string.ascii_letters + string.digits + "-_"
# Longer PINs add nothing to 192 bits (a token that takes 255 gets 32 characters).
_PIN_MAX_GENERATED = 32


def find_slot(module: Pkcs11Module, *, slot: int | None, label: str | None) -> pkcs11.Slot:
    """The slot chosen by number, or by its token's label; a clear error if there is none."""
    if slot is None and label is None:
        raise ConfigurationError(f"module {module.path}: choose a token by slot or by label")
    with module.lock, translated(f"module {module.path}", "list slots"):
        slots = list(module.lib.get_slots(token_present=True))
        for candidate in slots:
            if slot is not None and candidate.slot_id != slot:
                continue
            if label is not None and candidate.get_token().label != label:
                continue
            return candidate
        present = ", ".join(
            f"{s.slot_id} ('{s.get_token().label}')" for s in slots
        )  # the labels help the operator choose
    chosen = f"slot {slot}" if slot is not None else f"token label '{label}'"
    raise ConfigurationError(
        f"module {module.path}: no token at {chosen} (slots with a token: {present or 'none'})"
    )


def pin_length_range(module: Pkcs11Module, slot: pkcs11.Slot) -> tuple[int, int]:
    """(ulMinPinLen, ulMaxPinLen) from C_GetTokenInfo, which python-pkcs11 does not expose."""

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]

    class _TokenInfo(ctypes.Structure):
        _fields_ = [
            ("label", ctypes.c_char * 32),
            ("manufacturerID", ctypes.c_char * 32),
            ("model", ctypes.c_char * 16),
            ("serialNumber", ctypes.c_char * 16),
            ("flags", ctypes.c_ulong),
            ("ulMaxSessionCount", ctypes.c_ulong),
            ("ulSessionCount", ctypes.c_ulong),
            ("ulMaxRwSessionCount", ctypes.c_ulong),
            ("ulRwSessionCount", ctypes.c_ulong),
            ("ulMaxPinLen", ctypes.c_ulong),
            ("ulMinPinLen", ctypes.c_ulong),
            ("ulTotalPublicMemory", ctypes.c_ulong),
            ("ulFreePublicMemory", ctypes.c_ulong),
            ("ulTotalPrivateMemory", ctypes.c_ulong),
            ("ulFreePrivateMemory", ctypes.c_ulong),
            ("hardwareVersion", _Version),
            ("firmwareVersion", _Version),
            ("utcTime", ctypes.c_char * 16),
        ]

    lib = ctypes.CDLL(module.path)  # the instance python-pkcs11 initialized
    lib.C_GetTokenInfo.argtypes = [ctypes.c_ulong, ctypes.POINTER(_TokenInfo)]
    lib.C_GetTokenInfo.restype = ctypes.c_ulong
    info = _TokenInfo()
    with module.lock:
        rv = lib.C_GetTokenInfo(slot.slot_id, ctypes.byref(info))
    if rv != 0:
        raise TokenError(f"module {module.path}: C_GetTokenInfo failed with CKR 0x{rv:08x}")
    return int(info.ulMinPinLen), int(info.ulMaxPinLen)


def check_pin_length(module: Pkcs11Module, slot: pkcs11.Slot, pin: str, what: str) -> None:
    """Refuse, before anything is changed, a PIN the token would reject for its length."""
    low, high = pin_length_range(module, slot)
    if not low <= len(pin.encode()) <= high:
        raise ConfigurationError(
            f"module {module.path}, slot {slot.slot_id}: {what} has {len(pin.encode())} "
            f"characters; this token takes {low} to {high}"
        )


def new_pins(low: int, high: int) -> dict[str, str]:
    """Random user and SO PINs as long as the token takes (at most 32 characters, 192 bits).

    openCryptoki's soft token takes 4 to 8: 8 characters, 48 bits each. That is no
    defence against an offline search of the token's own files, only against guessing
    through the token, which locks a PIN after 3 wrong ones (docs/security-policy.md).
    """
    length = min(high, _PIN_MAX_GENERATED)
    if length < low:
        raise ConfigurationError(f"a token that takes PINs of {low} to {high} characters")
    return {
        name: "".join(secrets.choice(_PIN_ALPHABET) for _ in range(length))
        for name in ("user_pin", "so_pin")
    }


def is_initialized(module: Pkcs11Module, slot: pkcs11.Slot) -> bool:
    where = f"module {module.path}, slot {slot.slot_id}"
    with module.lock, translated(where, "read token flags"):
        return bool(slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED)


def change_pins(
    module: Pkcs11Module, slot: pkcs11.Slot, old: dict[str, str], new: dict[str, str]
) -> None:
    """C_SetPIN for the user, then for the SO: the token's PINs become ``new``.

    No session of this process may be logged in meanwhile (PKCS#11 login state is
    the application's): the caller closes its token first.
    """
    for pin, what in ((new["so_pin"], "the new SO PIN"), (new["user_pin"], "the new user PIN")):
        check_pin_length(module, slot, pin, what)
    where = f"module {module.path}, slot {slot.slot_id}"
    token = slot.get_token()
    with (
        module.lock,
        translated(where, "change the user PIN"),
        token.open(rw=True, user_pin=old["user_pin"]) as session,
    ):
        session.set_pin(old["user_pin"], new["user_pin"])
    with (
        module.lock,
        translated(where, "change the SO PIN"),
        token.open(rw=True, so_pin=old["so_pin"]) as session,
    ):
        session.set_pin(old["so_pin"], new["so_pin"])


def ensure_slot_token(
    module: Pkcs11Module,
    slot: pkcs11.Slot,
    *,
    label: str,
    factory_so_pin: str,
    so_pin: str,
    user_pin: str,
) -> bool:
    """Initialize the token in ``slot`` unless it is initialized; True if it was done now.

    ``factory_so_pin`` is the SO PIN the module ships with (openCryptoki:
    87654321); the token then gets ``so_pin`` and ``user_pin``.
    """
    where = f"module {module.path}, slot {slot.slot_id}"
    with module.lock, translated(where, "read token flags"):
        flags = slot.get_token().flags
    if flags & TokenFlag.TOKEN_INITIALIZED:
        return False
    for pin, what in ((so_pin, "the SO PIN"), (user_pin, "the user PIN")):
        check_pin_length(module, slot, pin, what)
    padded = label.encode().ljust(32, b" ")
    if len(padded) > 32:
        raise ConfigurationError(f"token label '{label}' is longer than 32 bytes")
    lib = ctypes.CDLL(module.path)
    lib.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib.C_InitToken.restype = ctypes.c_ulong
    factory = factory_so_pin.encode()
    with module.lock:
        rv = lib.C_InitToken(slot.slot_id, factory, len(factory), padded)
    if rv != 0:
        raise TokenError(f"{where}: C_InitToken failed with CKR 0x{rv:08x}")
    with module.lock, translated(where, "set the SO PIN and the user PIN"):
        token = slot.get_token()
        with token.open(rw=True, so_pin=factory_so_pin) as session:
            session.set_pin(factory_so_pin, so_pin)
            session.init_pin(user_pin)
    return True


def main(argv: list[str]) -> int:
    """``python -m meter.token.slot_token MODULE SLOT LABEL``: initialize a slot's token if new.

    PINs come from the environment (SLOT_FACTORY_SO_PIN, SLOT_SO_PIN, SLOT_USER_PIN),
    never from arguments.
    """
    if len(argv) != 3 or not argv[1].isdigit():
        print("usage: python -m meter.token.slot_token MODULE SLOT LABEL", file=sys.stderr)
        return 2
    names = ("SLOT_FACTORY_SO_PIN", "SLOT_SO_PIN", "SLOT_USER_PIN")
    pins = [os.environ.get(name, "") for name in names]
    if not all(pins):
        print(f"set {', '.join(names)} in the environment", file=sys.stderr)
        return 2
    try:
        module = load_module(argv[0])
        slot = find_slot(module, slot=int(argv[1]), label=None)
        done = ensure_slot_token(
            module,
            slot,
            label=argv[2],
            factory_so_pin=pins[0],
            so_pin=pins[1],
            user_pin=pins[2],
        )
    except MeterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "initialized now" if done else "already initialized (left as it is)"
    print(f"slot {argv[1]} of {argv[0]}: token {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
