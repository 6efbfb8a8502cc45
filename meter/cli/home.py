"""A meter home: the folder holding a SoftHSM2 store, exported certificates and local state.

Layout: ``softhsm2.conf`` and ``tokens/`` (postal root, provider and meter
tokens), ``locks/``, ``certs/`` (PEM exports), ``labels/``,
``provider/ledger.jsonl``, ``postoffice/replay/`` (the embedded replay
store). PINs never live here: they come from the environment or a prompt.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from meter.errors import ConfigurationError
from meter.token import (
    HsmProfile,
    Pkcs11Module,
    Token,
    ensure_conf,
    load_module,
    load_profile,
    softhsm_env,
)
from meter.token.profile import Durability
from meter.token.softhsm import token_dir

__all__ = ["PIN_VARIABLES", "Home", "password_from_env", "pin_from_env"]

# Which environment variable holds which PIN.
PIN_VARIABLES = {
    "meter": ("METER_USER_PIN", "METER_SO_PIN"),
    "provider": ("PROVIDER_USER_PIN", "PROVIDER_SO_PIN"),
    "postal-root": ("POSTAL_ROOT_USER_PIN", "POSTAL_ROOT_SO_PIN"),
}


def pin_from_env(variable: str, what: str) -> str:
    """A PIN from the environment, or from a hidden prompt on a terminal; never from a file."""
    value = os.environ.get(variable)
    if value:
        return value
    if sys.stdin.isatty():
        return str(click.prompt(f"{what} ({variable})", hide_input=True))
    raise ConfigurationError(f"{what} is needed: set {variable} in the environment")


def password_from_env(variable: str, what: str, *, confirm: bool = False) -> str:
    """A user's password from the environment, or a hidden prompt; never an argument or file."""
    value = os.environ.get(variable)
    if value:
        return value
    if sys.stdin.isatty():
        return str(click.prompt(what, hide_input=True, confirmation_prompt=confirm))
    raise ConfigurationError(
        f"{what} is needed: set {variable} in the environment or use a terminal"
    )


@dataclass(frozen=True)
class Home:
    path: Path
    profile: HsmProfile

    @classmethod
    def at(cls, path: Path, profile_path: Path | None = None) -> Home:
        return cls(path.expanduser().resolve(), load_profile(profile_path))

    @property
    def certs(self) -> Path:
        return self.path / "certs"

    @property
    def labels(self) -> Path:
        return self.path / "labels"

    @property
    def ledger(self) -> Path:
        return self.path / "provider" / "ledger.jsonl"

    @property
    def replay_store(self) -> Path:
        return self.path / "postoffice" / "replay"

    @property
    def revocations(self) -> Path:
        return self.path / "postoffice" / "revoked.json"

    def module(self) -> Pkcs11Module:
        if self.profile.softhsm_conf is not None:
            ensure_conf(self.profile, self.path)  # the home may have been moved or copied
        return load_module(self.profile.module, softhsm_env(self.profile, self.path))

    def token_label(self, party: str) -> str:
        labels = self.profile.labels
        return {
            "meter": labels.meter,
            "provider": labels.provider,
            "postal-root": labels.postal_root,
        }[party]

    @property
    def device(self) -> Path:
        """The meter firmware's own files: users.json (password hashes, sealed PIN slots),
        policy.toml (the host's password policy), audit/ (the audit log)."""
        return self.path / "meter"

    def open_device_token(self) -> Token:
        """The meter's token, opened without a PIN: logon unseals the PIN from a user's slot."""
        self._require_home()
        sync = token_dir(self.path) if self.profile.durability is Durability.SYNCFS else None
        return Token.open(
            self.module(),
            self.token_label("meter"),
            None,
            lock_dir=self.path / "locks",
            sync_dir=sync,
        )

    def token_exists(self, party: str) -> bool:
        """Is there a token for ``party`` in this home's SoftHSM2 store?"""
        if (
            self.profile.softhsm_conf is None
            or not (self.path / self.profile.softhsm_conf).exists()
        ):
            return False
        return self.module().has_token(self.token_label(party))

    def _require_home(self) -> None:
        if (
            self.profile.softhsm_conf is not None
            and not (self.path / self.profile.softhsm_conf).exists()
        ):
            raise ConfigurationError(
                f"{self.path} is not a meter home yet: run `meter init` or `meter demo`"
            )

    def open_token(self, party: str, pin: str | None = None) -> Token:
        """Log in to a party's token with its user PIN (from the environment unless given)."""
        self._require_home()
        variable = PIN_VARIABLES[party][0]
        pin = pin or pin_from_env(variable, f"user PIN of the {party} token")
        sync = token_dir(self.path) if self.profile.durability is Durability.SYNCFS else None
        return Token.open(
            self.module(), self.token_label(party), pin, lock_dir=self.path / "locks", sync_dir=sync
        )
