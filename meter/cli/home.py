"""A meter home: the folder holding a SoftHSM2 store, exported certificates and local state.

Layout: ``softhsm2.conf`` and ``tokens/`` (postal root, provider and, on
SoftHSM2, meter tokens), ``meter-token-profile.toml`` (a copy of the HSM
profile the meter token was provisioned with: later commands use it without
``--profile``), ``token-copies/`` (verified copies of each token's ``token.object``),
``locks/``, ``meter/`` (the device's users, policy and audit log), ``run/``
(the device's socket), ``certs/`` (PEM exports), ``labels/``,
``provider/ledger.jsonl``, ``postoffice/replay/`` (the embedded replay
store). No PIN lives here: the meter's are sealed in its users' slots, the
provider's and postal root's come from the environment or a prompt.

The device process owns the home: it alone opens the meter token, and it
keeps everything but the socket's folder readable by its own account only.

Each token has its profile. The meter's is the home's ``profile``. The
development postal root and provider (other organisations' tokens in real
life) live in the home's own store: that of the meter's profile when it makes
tokens in the home (``[softhsm]``), else that of the default profile. So a
meter on openCryptoki's slot 3 sits beside a SoftHSM2 store for the lab's
provider and root.
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
    Restored,
    Token,
    ensure_conf,
    guard_token_files,
    keep_verified_copy,
    load_module,
    load_profile,
    softhsm_env,
    token_copies_dir,
)
from meter.token.profile import Durability, Selection, default_profile_path
from meter.token.softhsm import token_dir

__all__ = ["PIN_VARIABLES", "Home", "password_from_env", "pin_from_env"]

# Which environment variable holds which PIN. The meter's are in no variable: they are
# generated at provisioning and sealed into its users' slots.
PIN_VARIABLES = {
    "provider": ("PROVIDER_USER_PIN", "PROVIDER_SO_PIN"),
    "postal-root": ("POSTAL_ROOT_USER_PIN", "POSTAL_ROOT_SO_PIN"),
}
SOCKET_NAME = "meterd.sock"
PROFILE_COPY = "meter-token-profile.toml"
# A token in a fixed slot is machine-wide (openCryptoki: one soft token for the whole
# machine), so its lock is too: two homes must never run a device on the same token.
MACHINE_LOCK_DIR = Path("/run/lock")


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
    profile: HsmProfile  # the meter token's
    lab_profile: HsmProfile  # the home's own store: the development postal root and provider

    @classmethod
    def at(cls, path: Path, profile_path: Path | None = None) -> Home:
        """The home at ``path``; its meter token's profile is ``profile_path``, else the copy
        provisioning kept in the home, else the default (SoftHSM2)."""
        path = path.expanduser().resolve()
        # Unreadable is a client account's view of a device's home (0600, the device's):
        # such a client only talks to the socket and never opens a token itself.
        copy = path / PROFILE_COPY
        kept = copy.read_bytes() if os.access(copy, os.R_OK) else None
        if profile_path is None and kept is not None:
            profile_path = copy
        elif profile_path is not None and kept is not None:
            given = profile_path.read_bytes() if profile_path.exists() else b""
            if given != kept:
                raise ConfigurationError(
                    f"{path}'s meter token was provisioned with the HSM profile copied to "
                    f"{copy}, and {profile_path} differs from it: leave out --profile"
                )
        profile = load_profile(profile_path)
        lab = profile if profile.softhsm_conf is not None else load_profile(default_profile_path())
        if lab.softhsm_conf is None:
            raise ConfigurationError(
                f"the default HSM profile {lab.source} makes no tokens in a home ([softhsm]): "
                "the development postal root and provider need it"
            )
        return cls(path, profile, lab)

    def keep_profile(self) -> None:
        """Keep a copy of the meter token's profile in the home (the end of provisioning)."""
        copy = self.path / PROFILE_COPY
        if self.profile.source.resolve() != copy.resolve():
            tmp = copy.with_suffix(".tmp")
            tmp.write_bytes(self.profile.source.read_bytes())
            os.replace(tmp, copy)

    @property
    def meter_in_store(self) -> bool:
        """Is the meter token one of the home's own store (rather than a slot or partition)?"""
        return self.profile is self.lab_profile

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

    @property
    def socket(self) -> Path:
        """The device's Unix socket (in ``run/``, the one folder its clients may reach)."""
        return self.path / "run" / SOCKET_NAME

    def module(self, restored: list[Restored] | None = None) -> Pkcs11Module:
        """The PKCS#11 module over this home's own store, after putting back any token file
        a crash emptied (``restored`` collects them; without it they are reported on stderr)."""
        lab = self.lab_profile
        ensure_conf(lab, self.path)  # the home may have been moved or copied
        # Before the module reads the token files (C_Initialize).
        found = guard_token_files(
            token_dir(self.path), token_copies_dir(self.path), self.path / "locks"
        )
        if restored is not None:
            restored.extend(found)
        for entry in found if restored is None else []:
            click.echo(f"warning: token '{entry.label}': {entry.reason}", err=True)
        return load_module(lab.module, softhsm_env(lab, self.path))

    def meter_module(self, restored: list[Restored] | None = None) -> Pkcs11Module:
        """The module holding the meter token: the home's store, or the profile's module."""
        if self.meter_in_store:
            return self.module(restored)
        return load_module(self.profile.module)

    def keep_token_copy(self, party: str) -> None:
        """Refresh the verified copy of a token's file once the token has opened with it
        (SoftHSM2's file guard: only for tokens of the home's own store)."""
        if party != "meter" or self.meter_in_store:
            keep_verified_copy(
                token_dir(self.path), token_copies_dir(self.path), self.token_label(party)
            )

    def secure(self, gid: int) -> None:
        """The device's account alone reads the home; the socket's group may only pass
        through it to ``run/``. Top-level entries suffice: nobody else gets below them."""
        try:
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o710)
            for entry in self.path.iterdir():
                if entry.name == "run" or entry.is_symlink():
                    continue
                os.chmod(entry, 0o700 if entry.is_dir() else 0o600)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot give {self.path} to group {gid} with mode 0710 ({exc.strerror or exc}): "
                "the device's account must own its home and be a member of the socket's group"
            ) from exc

    def token_label(self, party: str) -> str:
        labels = (self.profile if party == "meter" else self.lab_profile).labels
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

    def open_device_token(self, restored: list[Restored] | None = None) -> Token:
        """The meter's token, opened without a PIN: logon unseals the PIN from a user's slot.

        Only the device process (and provisioning) opens it; it takes the token's lock.
        """
        self._require_home()
        # The file guard runs on the first load of the module: here, so that a token file
        # it puts back is reported to the caller (who audits it), not only on stderr.
        self.meter_module(restored)
        if not self.token_exists("meter"):
            raise ConfigurationError(
                f"{self.path} has no meter token: provision it with `meter --home {self.path} init`"
            )
        token = self._open_meter(None)
        self.keep_token_copy("meter")
        return token

    def _open_meter(self, pin: str | None, restored: list[Restored] | None = None) -> Token:
        profile = self.profile
        module = self.meter_module(restored)
        slot = profile.selection.slot if profile.selection.kind is Selection.SLOT else None
        lock_dir, lock_name = self.path / "locks", None
        if slot is not None:
            lock_dir = MACHINE_LOCK_DIR
            lock_name = f"meter-token-{Path(profile.module).stem}-slot{slot}.lock"
        return Token.open(
            module,
            self.token_label("meter"),
            pin,
            lock_dir=lock_dir,
            lock_name=lock_name,
            slot=slot,
            sync_dir=self._sync_dir("meter"),
            capabilities=profile.capabilities,
            profile_name=profile.name,
        )

    def _sync_dir(self, party: str) -> Path | None:
        """The folder whose file system is synced after a register write, where the token
        does not make its writes durable itself (the profile's [durability])."""
        profile = self.profile if party == "meter" else self.lab_profile
        if profile.durability is not Durability.SYNCFS:
            return None
        if party == "meter" and profile.sync_dir is not None:
            return Path(profile.sync_dir)
        return token_dir(self.path)

    def token_exists(self, party: str) -> bool:
        """Is there a token for ``party`` (for a meter outside the store: a provisioned one)?"""
        if party == "meter" and not self.meter_in_store:
            # A slot's token is there before any home: what counts is that provisioning
            # finished here, which it marks by keeping the profile's copy.
            return (self.path / PROFILE_COPY).exists()
        if not self._store_conf().exists():
            return False
        return self.module().has_token(self.token_label(party))

    def _store_conf(self) -> Path:
        return self.path / str(self.lab_profile.softhsm_conf)

    def _require_home(self) -> None:
        if not self._store_conf().exists():
            raise ConfigurationError(
                f"{self.path} is not a meter home yet: run `meter init` or `meter demo`"
            )

    def open_token(self, party: str, pin: str | None = None) -> Token:
        """Log in to a party's token with its user PIN (from the environment unless given).

        The meter's PIN is in no environment variable: only provisioning (which made
        it) passes it here; everything else goes through the device.
        """
        self._require_home()
        if pin is None:
            if party not in PIN_VARIABLES:
                raise ConfigurationError(
                    f"the {party} token's PIN is sealed in its users' slots: use the device "
                    f"(`meter --home {self.path} device serve`, then `meter --user ID ...`)"
                )
            variable = PIN_VARIABLES[party][0]
            pin = pin_from_env(variable, f"user PIN of the {party} token")
        if party == "meter":
            token = self._open_meter(pin)
        else:
            token = Token.open(
                self.module(),
                self.token_label(party),
                pin,
                lock_dir=self.path / "locks",
                sync_dir=self._sync_dir(party),
                capabilities=self.lab_profile.capabilities,
                profile_name=self.lab_profile.name,
            )
        self.keep_token_copy(party)
        return token
