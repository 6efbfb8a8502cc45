"""HSM profiles: data files describing one kind of token, loaded strictly."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from meter.errors import ConfigurationError

__all__ = ["Durability", "HsmProfile", "KeyAlgorithm", "default_profile_path", "load_profile"]


class KeyAlgorithm(StrEnum):
    """The meter signing-key kinds PIM-1 allows (the algorithm byte 1, 2, 3)."""

    ECDSA_P256 = "ecdsa-p256"
    ED25519 = "ed25519"
    RSA_PSS_2048 = "rsa-pss-2048"


class Durability(StrEnum):
    """How a register write is made durable before an indicium is released."""

    SYNCFS = "syncfs"  # the token library does not sync: sync its folder's file system
    TOKEN = "token"  # the token's own non-volatile memory is durable on return


@dataclass(frozen=True)
class TokenLabels:
    meter: str
    provider: str
    postal_root: str


@dataclass(frozen=True)
class HsmProfile:
    name: str
    module: str
    labels: TokenLabels
    signing_algorithm: KeyAlgorithm
    softhsm_conf: str | None
    durability: Durability
    capabilities: frozenset[str]
    source: Path

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


_TOP = {"name", "module", "token", "signing", "softhsm", "durability", "capabilities"}
_TOKEN = {"meter_label", "provider_label", "postal_root_label"}


def default_profile_path() -> Path:
    """The SoftHSM2 profile shipped in the source tree's ``hsm_profiles/``."""
    return Path(__file__).resolve().parents[2] / "hsm_profiles" / "softhsm2.toml"


def _table(data: dict[str, Any], key: str, path: Path, allowed: set[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigurationError(f"{path}: [{key}] must be a table")
    unknown = set(value) - allowed
    if unknown:
        raise ConfigurationError(f"{path}: unknown key(s) in [{key}]: {', '.join(sorted(unknown))}")
    return value


def _str(
    table: dict[str, Any], key: str, path: Path, where: str, default: str | None = None
) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{path}: {where}{key} must be a non-empty string")
    return value


def load_profile(path: Path | None = None) -> HsmProfile:
    """Read an HSM profile; every unknown key or wrong type is an error naming file and key."""
    path = path or default_profile_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"HSM profile {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"HSM profile {path} is unreadable: {exc}") from exc
    unknown = set(data) - _TOP
    if unknown:
        raise ConfigurationError(f"{path}: unknown key(s): {', '.join(sorted(unknown))}")
    token = _table(data, "token", path, _TOKEN)
    signing = _table(data, "signing", path, {"algorithm"})
    softhsm = _table(data, "softhsm", path, {"conf"})
    durability = _table(data, "durability", path, {"after_register_write"})
    caps = data.get("capabilities", {})
    if not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values()):
        raise ConfigurationError(f"{path}: [capabilities] must map names to true/false")
    try:
        algorithm = KeyAlgorithm(_str(signing, "algorithm", path, "signing."))
    except ValueError as exc:
        choices = ", ".join(a.value for a in KeyAlgorithm)
        raise ConfigurationError(f"{path}: signing.algorithm must be one of {choices}") from exc
    try:
        mode = Durability(_str(durability, "after_register_write", path, "durability.", "token"))
    except ValueError as exc:
        choices = ", ".join(d.value for d in Durability)
        raise ConfigurationError(
            f"{path}: durability.after_register_write must be one of {choices}"
        ) from exc
    conf = softhsm.get("conf")
    if conf is not None and (not isinstance(conf, str) or not conf):
        raise ConfigurationError(f"{path}: softhsm.conf must be a non-empty string")
    return HsmProfile(
        name=_str(data, "name", path, ""),
        module=_str(data, "module", path, ""),
        labels=TokenLabels(
            meter=_str(token, "meter_label", path, "token.", "meter"),
            provider=_str(token, "provider_label", path, "token.", "provider"),
            postal_root=_str(token, "postal_root_label", path, "token.", "postal-root"),
        ),
        signing_algorithm=algorithm,
        softhsm_conf=conf,
        durability=mode,
        capabilities=frozenset(k for k, v in caps.items() if v),
        source=path,
    )
