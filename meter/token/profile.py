"""HSM profiles: data files describing one kind of token, loaded strictly.

A profile says which module to load, how the meter's token is selected and
initialized, which mechanisms the meter uses on it, what the token can do
(capabilities), how the policy's eight roles map onto the device's own users,
and where each claim comes from: measured here (``tested_here``) or taken
from the vendor's documentation (``documented_in``). The device is driven by
the capabilities, never by the product's name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from meter.errors import ConfigurationError

__all__ = [
    "CAPABILITIES",
    "ROLES",
    "Durability",
    "HsmProfile",
    "KeyAlgorithm",
    "Mechanisms",
    "Selection",
    "TokenSelection",
    "default_profile_path",
    "load_profile",
    "profiles_dir",
]


class KeyAlgorithm(StrEnum):
    """The meter signing-key kinds PIM-1 allows (the algorithm byte 1, 2, 3)."""

    ECDSA_P256 = "ecdsa-p256"
    ED25519 = "ed25519"
    RSA_PSS_2048 = "rsa-pss-2048"


class Durability(StrEnum):
    """How a register write is made durable before an indicium is released."""

    SYNCFS = "syncfs"  # the token library does not sync: sync its folder's file system
    TOKEN = "token"  # the token's own non-volatile memory is durable on return


class Selection(StrEnum):
    """How the meter finds its token in the module."""

    SOFTHSM = "softhsm"  # a token per label, made by the meter in the home's own store
    SLOT = "slot"  # a fixed slot number (openCryptoki's soft token is slot 3)
    LABEL = "label"  # the token (partition) whose label is meter_label


# Every capability a profile may claim, and what it means. The probe checks each one.
CAPABILITIES: dict[str, str] = {
    "data_objects": "create and destroy private token data objects (the registers)",
    "sha256": "SHA-256 digest in the token",
    "raw_ecdsa": "P-256 key generation and CKM_ECDSA over a hash computed outside",
    "ecdsa_with_hash": "CKM_ECDSA_SHA256",
    "eddsa": "Ed25519 key generation and CKM_EDDSA",
    "rsa_pss": "RSA-2048 key generation and CKM_SHA256_RSA_PKCS_PSS",
    "hmac_sha256": "generic-secret key generation and CKM_SHA256_HMAC",
    "aes_cmac": "CKM_AES_CMAC",
    "aes_gcm": "CKM_AES_GCM encrypt and decrypt",
    "aes_cbc": "CKM_AES_CBC_PAD encrypt and decrypt",
    "aes_key_wrap": "CKM_AES_KEY_WRAP (RFC 3394)",
    "aes_key_wrap_pad": "CKM_AES_KEY_WRAP_PAD (RFC 5649)",
    "wrap_ed25519_private": "wrapping an Ed25519 private key",
    "ecdh_derive": "CKM_ECDH1_DERIVE on P-256",
    "modify_data_value": "C_SetAttributeValue on a data object's CKA_VALUE",
    "monotonic_counter": "a hardware counter object that only counts up",
    "usage_limit": "CKA_USAGE_LIMIT on keys (PKCS#11 3.0)",
}

# The security policy's roles, each mapped in every profile onto the device's own users.
ROLES = (
    "administrator",
    "auditor",
    "certificate-authority",
    "customer",
    "key-custodian",
    "provider",
    "security-officer",
    "no-role",
)

# What each purpose may use, and the capability (or capabilities) it needs.
_SIGN = {
    KeyAlgorithm.ECDSA_P256: ("CKM_ECDSA", ("raw_ecdsa",)),
    KeyAlgorithm.ED25519: ("CKM_EDDSA", ("eddsa",)),
    KeyAlgorithm.RSA_PSS_2048: ("CKM_SHA256_RSA_PKCS_PSS", ("rsa_pss",)),
}
_REGISTER_MAC: dict[str, tuple[str, ...]] = {"CKM_SHA256_HMAC": ("hmac_sha256",)}
_SEAL: dict[str, tuple[str, ...]] = {
    "CKM_AES_GCM": ("aes_gcm",),
    # Where AES-GCM is missing: AES-CBC with PKCS#7 padding, then HMAC-SHA-256 over
    # IV || ciphertext under a second key (encrypt-then-MAC, as in RFC 7518 5.2).
    "CKM_AES_CBC_PAD+CKM_SHA256_HMAC": ("aes_cbc", "hmac_sha256"),
    "none": (),
}
_WRAP: dict[str, tuple[str, ...]] = {"CKM_AES_KEY_WRAP_PAD": ("aes_key_wrap_pad",), "none": ()}
_KEY_AGREEMENT: dict[str, tuple[str, ...]] = {"CKM_ECDH1_DERIVE": ("ecdh_derive",), "none": ()}


@dataclass(frozen=True)
class TokenLabels:
    meter: str
    provider: str
    postal_root: str


@dataclass(frozen=True)
class TokenSelection:
    """How the token is found and who initializes it."""

    kind: Selection
    slot: int | None
    # The SO PIN a new token ships with, published by the vendor (openCryptoki: 87654321):
    # with it the meter can initialize an uninitialized slot itself. None: the vendor's
    # tools initialize the token and the meter only opens it.
    factory_so_pin: str | None
    pin_min: int
    pin_max: int


@dataclass(frozen=True)
class Mechanisms:
    """The PKCS#11 mechanisms the meter uses on this token, by purpose."""

    sign: str
    register_mac: str
    seal: str
    wrap: str
    key_agreement: str


@dataclass(frozen=True)
class HsmProfile:
    name: str
    module: str
    labels: TokenLabels
    selection: TokenSelection
    signing_algorithm: KeyAlgorithm
    mechanisms: Mechanisms
    softhsm_conf: str | None
    durability: Durability
    sync_dir: str | None  # for syncfs on a token that is not SoftHSM2 (its store folder)
    capabilities: frozenset[str]
    roles: dict[str, str]
    tested_here: bool
    documented_in: tuple[str, ...]
    source: Path

    def can(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}")
        return capability in self.capabilities

    def needs(self) -> list[tuple[str, str]]:
        """(capability, purpose) for everything the meter needs with this profile's choices."""
        needed = [("data_objects", "registers, identity and certificates")]
        for purpose, choice, table in self._choices():
            needed += [(cap, f"{purpose} ({choice})") for cap in table[choice]]
        return needed

    def needs_for_provisioning(self) -> list[tuple[str, str]]:
        """The subset without which a meter cannot be provisioned at all."""
        keep = ("registers", "signing", "register MAC")
        return [(cap, why) for cap, why in self.needs() if why.startswith(keep)]

    def missing(self, *, provisioning: bool = False) -> list[tuple[str, str]]:
        """Needed capabilities this profile does not claim."""
        needed = self.needs_for_provisioning() if provisioning else self.needs()
        return [(cap, why) for cap, why in needed if not self.can(cap)]

    def _choices(self) -> list[tuple[str, str, dict[str, tuple[str, ...]]]]:
        m = self.mechanisms
        sign: dict[str, tuple[str, ...]] = {m.sign: _SIGN[self.signing_algorithm][1]}
        return [
            ("signing", m.sign, sign),
            ("register MAC", m.register_mac, _REGISTER_MAC),
            ("sealing", m.seal, _SEAL),
            ("key wrap", m.wrap, _WRAP),
            ("key agreement", m.key_agreement, _KEY_AGREEMENT),
        ]

    def require_for_provisioning(self, algorithm: KeyAlgorithm | None = None) -> None:
        """Refuse, before anything is made, a meter this token cannot carry.

        ``algorithm`` overrides the profile's signing algorithm (``meter init --algorithm``).
        The error names each missing capability, what needs it, and the profile.
        """
        algorithm = algorithm or self.signing_algorithm
        needed = [("data_objects", "the registers")]
        needed += [(cap, f"signing with {algorithm}") for cap in _SIGN[algorithm][1]]
        needed += [
            (cap, f"the register MAC ({self.mechanisms.register_mac})")
            for cap in _REGISTER_MAC[self.mechanisms.register_mac]
        ]
        missing = [(cap, why) for cap, why in needed if not self.can(cap)]
        if missing:
            what = "; ".join(f"capability {cap} (for {why})" for cap, why in missing)
            usable = [a.value for a in KeyAlgorithm if all(self.can(c) for c in _SIGN[a][1])]
            raise ConfigurationError(
                f"HSM profile {self.name} ({self.source}) lacks {what}: this token cannot "
                f"carry a meter so (signing algorithms it can do: {', '.join(usable) or 'none'})"
            )

    @property
    def claims_source(self) -> str:
        if self.tested_here:
            return "tested here (meter hsm probe)"
        return "from the vendor's documentation: " + "; ".join(self.documented_in)


_TOP = {
    "name",
    "module",
    "tested_here",
    "documented_in",
    "token",
    "signing",
    "mechanisms",
    "softhsm",
    "durability",
    "capabilities",
    "roles",
}
_TOKEN = {
    "selection",
    "slot",
    "factory_so_pin",
    "pin_min",
    "pin_max",
    "meter_label",
    "provider_label",
    "postal_root_label",
}
_MECHANISMS = {"sign", "register_mac", "seal", "wrap", "key_agreement"}


def profiles_dir() -> Path:
    """The source tree's ``hsm_profiles/``."""
    return Path(__file__).resolve().parents[2] / "hsm_profiles"


def default_profile_path() -> Path:
    """The SoftHSM2 profile shipped in the source tree's ``hsm_profiles/``."""
    return profiles_dir() / "softhsm2.toml"


class _Reader:
    """Typed access to one profile's tables; every error names the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> ConfigurationError:
        return ConfigurationError(f"{self.path}: {message}")

    def table(self, data: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"[{key}] must be a table")
        unknown = set(value) - allowed
        if unknown:
            raise self.fail(f"unknown key(s) in [{key}]: {', '.join(sorted(unknown))}")
        return value

    def text(self, table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
        value = table.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{where}{key} must be a non-empty string")
        return value

    def integer(self, table: dict[str, Any], key: str, where: str, default: int) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(f"{where}{key} must be a non-negative integer")
        return value

    def choice(
        self, table: dict[str, Any], key: str, where: str, choices: list[str], default: str
    ) -> str:
        value = self.text(table, key, where, default)
        if value not in choices:
            raise self.fail(f"{where}{key} must be one of {', '.join(choices)}, not {value!r}")
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
    r = _Reader(path)
    unknown = set(data) - _TOP
    if unknown:
        raise r.fail(f"unknown key(s): {', '.join(sorted(unknown))}")
    token = r.table(data, "token", _TOKEN)
    signing = r.table(data, "signing", {"algorithm"})
    mechs = r.table(data, "mechanisms", _MECHANISMS)
    softhsm = r.table(data, "softhsm", {"conf"})
    durability = r.table(data, "durability", {"after_register_write", "sync_dir"})
    algorithm = KeyAlgorithm(
        r.choice(signing, "algorithm", "signing.", [a.value for a in KeyAlgorithm], "ecdsa-p256")
    )
    conf = softhsm.get("conf")
    if conf is not None and (not isinstance(conf, str) or not conf):
        raise r.fail("softhsm.conf must be a non-empty string")
    return HsmProfile(
        name=r.text(data, "name", ""),
        module=r.text(data, "module", ""),
        labels=TokenLabels(
            meter=r.text(token, "meter_label", "token.", "meter"),
            provider=r.text(token, "provider_label", "token.", "provider"),
            postal_root=r.text(token, "postal_root_label", "token.", "postal-root"),
        ),
        selection=_selection(r, token, conf),
        signing_algorithm=algorithm,
        mechanisms=_mechanisms(r, mechs, algorithm),
        softhsm_conf=conf,
        durability=Durability(
            r.choice(
                durability,
                "after_register_write",
                "durability.",
                [d.value for d in Durability],
                "token",
            )
        ),
        sync_dir=_optional_text(r, durability, "sync_dir", "durability."),
        capabilities=_capabilities(r, data),
        roles=_roles(r, data),
        tested_here=_tested_here(r, data),
        documented_in=_documented_in(r, data),
        source=path,
    )


def _optional_text(r: _Reader, table: dict[str, Any], key: str, where: str) -> str | None:
    return None if key not in table else r.text(table, key, where)


def _selection(r: _Reader, token: dict[str, Any], conf: str | None) -> TokenSelection:
    kind = Selection(
        r.choice(token, "selection", "token.", [s.value for s in Selection], "softhsm")
    )
    if (kind is Selection.SOFTHSM) != (conf is not None):
        raise r.fail('token.selection = "softhsm" and [softhsm] conf go together')
    slot = token.get("slot")
    if kind is Selection.SLOT:
        slot = r.integer(token, "slot", "token.", -1)
    elif slot is not None:
        raise r.fail('token.slot is only for token.selection = "slot"')
    pin_min = r.integer(token, "pin_min", "token.", 4)
    pin_max = r.integer(token, "pin_max", "token.", 255)
    if not 1 <= pin_min <= pin_max:
        raise r.fail("token.pin_min must be at least 1 and at most token.pin_max")
    return TokenSelection(
        kind=kind,
        slot=slot,
        factory_so_pin=_optional_text(r, token, "factory_so_pin", "token."),
        pin_min=pin_min,
        pin_max=pin_max,
    )


def _mechanisms(r: _Reader, mechs: dict[str, Any], algorithm: KeyAlgorithm) -> Mechanisms:
    sign_mechanism = _SIGN[algorithm][0]
    return Mechanisms(
        # The token layer signs with exactly one mechanism per algorithm (session.py).
        sign=r.choice(mechs, "sign", "mechanisms.", [sign_mechanism], sign_mechanism),
        register_mac=r.choice(
            mechs, "register_mac", "mechanisms.", list(_REGISTER_MAC), "CKM_SHA256_HMAC"
        ),
        seal=r.choice(mechs, "seal", "mechanisms.", list(_SEAL), "CKM_AES_GCM"),
        wrap=r.choice(mechs, "wrap", "mechanisms.", list(_WRAP), "CKM_AES_KEY_WRAP_PAD"),
        key_agreement=r.choice(
            mechs, "key_agreement", "mechanisms.", list(_KEY_AGREEMENT), "CKM_ECDH1_DERIVE"
        ),
    )


def _capabilities(r: _Reader, data: dict[str, Any]) -> frozenset[str]:
    caps = data.get("capabilities", {})
    if not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values()):
        raise r.fail("[capabilities] must map names to true/false")
    unknown = set(caps) - set(CAPABILITIES)
    if unknown:
        raise r.fail(
            f"unknown capability(ies): {', '.join(sorted(unknown))} "
            f"(known: {', '.join(CAPABILITIES)})"
        )
    missing = set(CAPABILITIES) - set(caps)
    if missing:  # a silent default would be a claim nobody made
        raise r.fail(f"[capabilities] must say true or false for: {', '.join(sorted(missing))}")
    return frozenset(k for k, v in caps.items() if v)


def _roles(r: _Reader, data: dict[str, Any]) -> dict[str, str]:
    roles = r.table(data, "roles", set(ROLES))
    missing = [role for role in ROLES if role not in roles]
    if missing:
        raise r.fail(f"[roles] must map every role; missing: {', '.join(missing)}")
    return {role: r.text(roles, role, "roles.") for role in ROLES}


def _tested_here(r: _Reader, data: dict[str, Any]) -> bool:
    value = data.get("tested_here")
    if not isinstance(value, bool):
        raise r.fail("tested_here must be true or false")
    return value


def _documented_in(r: _Reader, data: dict[str, Any]) -> tuple[str, ...]:
    docs = data.get("documented_in", [])
    if not isinstance(docs, list) or not all(isinstance(d, str) and d for d in docs):
        raise r.fail("documented_in must be a list of document names")
    if data.get("tested_here") is False and not docs:
        raise r.fail("a profile not tested here must name its sources in documented_in")
    return tuple(docs)
