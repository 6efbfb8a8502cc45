"""Loading a PKCS#11 module once per process, behind one lock.

PKCS#11 allows one C_Initialize per process, and SoftHSM2 is not safe to
enter from two threads at once as python-pkcs11 initializes it, so this is
the one piece of process-wide state the token layer keeps: a registry of
loaded modules, each with the lock every token call takes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import pkcs11

from meter.errors import ConfigurationError, TokenUnavailable
from meter.token._errors import translated

__all__ = ["Pkcs11Module", "load_module"]


class Pkcs11Module:
    """A loaded PKCS#11 library and the lock that serializes every call into it."""

    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.env = dict(env)
        self.open_sessions = 0
        os.environ.update(self.env)
        if not os.path.exists(path):
            raise ConfigurationError(
                f"PKCS#11 module {path} does not exist (is the HSM software installed?)"
            )
        try:
            self.lib = pkcs11.lib(path)
        except pkcs11.PKCS11Error as exc:
            # python-pkcs11 raises a bare PKCS11Error when dlopen or the symbol lookup fails.
            if "C_GetFunctionList" in str(exc) or "OS exception" in str(exc):
                raise ConfigurationError(
                    f"{path} is not a PKCS#11 module (cannot load it, or it has no "
                    f"C_GetFunctionList): {exc}"
                ) from exc
            with translated(f"module {path}", "load"):
                raise

    def use_env(self, env: Mapping[str, str]) -> None:
        """Point the module at other settings (e.g. another SOFTHSM2_CONF), if nothing is open."""
        if dict(env) == self.env:
            return
        with self.lock:
            if self.open_sessions:
                raise TokenUnavailable(
                    f"module {self.path}: {self.open_sessions} session(s) open under other "
                    "settings; close them before opening another home's tokens"
                )
            with translated(f"module {self.path}", "finalize"):
                self.lib.finalize()
            for key in self.env:
                os.environ.pop(key, None)
            os.environ.update(env)
            self.env = dict(env)
            with translated(f"module {self.path}", "initialize"):
                self.lib.initialize()

    def has_token(self, label: str) -> bool:
        with self.lock:
            return any(True for _ in self.lib.get_tokens(token_label=label))

    def token_in_slot(self, slot: int) -> pkcs11.Token:
        """The token in slot number ``slot`` (openCryptoki's soft token: 3)."""
        with self.lock, translated(f"slot {slot} of module {self.path}", "find token"):
            for candidate in self.lib.get_slots(token_present=True):
                if candidate.slot_id == slot:
                    return candidate.get_token()
        raise ConfigurationError(f"module {self.path}: no token in slot {slot}")

    def get_token(self, label: str) -> pkcs11.Token:
        with self.lock, translated(f"token '{label}' in module {self.path}", "find token"):
            return self.lib.get_token(token_label=label)


_registry: dict[str, Pkcs11Module] = {}
_registry_lock = threading.Lock()


def load_module(path: str, env: Mapping[str, str] | None = None) -> Pkcs11Module:
    """The process's one instance of the module at ``path``, using ``env`` (e.g. SOFTHSM2_CONF)."""
    env = env or {}
    with _registry_lock:
        module = _registry.get(path)
        if module is None:
            module = _registry[path] = Pkcs11Module(path, env)
        else:
            module.use_env(env)
        return module
