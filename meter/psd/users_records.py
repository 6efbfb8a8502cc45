"""The user store's file format: one record per user, parsed strictly, and what may be shown.

``users.json`` is ``{"format": "meter-users-v1", "users": {id: record}}``; a record holds
the user's role, times, scrypt parameters, password verifier, sealed PIN slot and logon
failures (meter.psd.users explains the slot and the lock). Every field is checked on
read, so a hand-edited or damaged file is refused with the field named rather than
trusted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeGuard

from meter.errors import ConfigurationError
from meter.psd.passwords import MAX_LOG2_N, MIN_LOG2_N, SALT_BYTES, SCRYPT_P, SCRYPT_R
from meter.psd.roles import Role

__all__ = ["FORMAT", "UserInfo"]

FORMAT = "meter-users-v1"

_USER_ID = re.compile(r"[a-z][a-z0-9._-]{0,31}")

_USER_ID_RULE = (
    "a user id is 1 to 32 characters of a-z, 0-9, '.', '_' and '-', starting with a letter"
)

_NONCE_BYTES = 12

_VERIFIER_BYTES = 32

_TAG_BYTES = 16

_RECORD_KEYS = {
    "user_id",
    "role",
    "created",
    "modified",
    "kdf",
    "verifier",
    "slot",
    "failures",
    "locked_until",
    "last_logon",
}

_Bad = Callable[[str], ConfigurationError]


@dataclass(frozen=True)
class UserInfo:
    """What anyone with the Administrator role may see about a user: no secret, no verifier."""

    user_id: str
    role: Role
    created: datetime
    modified: datetime
    failures: int
    locked_until: datetime | None
    last_logon: datetime | None

    def to_json(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "role": self.role.value,
            "created": _iso(self.created),
            "modified": _iso(self.modified),
            "failures": self.failures,
            "locked_until": _iso(self.locked_until) if self.locked_until else None,
            "last_logon": _iso(self.last_logon) if self.last_logon else None,
        }


@dataclass(frozen=True)
class _Record:
    user_id: str
    role: Role
    created: datetime
    modified: datetime
    salt: bytes
    log2_n: int
    verifier: bytes
    nonce: bytes
    ciphertext: bytes
    failures: int
    locked_until: datetime | None
    last_logon: datetime | None

    def info(self) -> UserInfo:
        return UserInfo(
            self.user_id,
            self.role,
            self.created,
            self.modified,
            self.failures,
            self.locked_until,
            self.last_logon,
        )

    def to_json(self) -> dict[str, object]:
        info = self.info().to_json()
        return {
            "user_id": self.user_id,
            "role": self.role.value,
            "created": info["created"],
            "modified": info["modified"],
            "kdf": {"salt": self.salt.hex(), "log2_n": self.log2_n, "r": SCRYPT_R, "p": SCRYPT_P},
            "verifier": self.verifier.hex(),
            "slot": {"nonce": self.nonce.hex(), "ciphertext": self.ciphertext.hex()},
            "failures": self.failures,
            "locked_until": info["locked_until"],
            "last_logon": info["last_logon"],
        }


def _valid_user_id(user_id: object) -> TypeGuard[str]:
    return isinstance(user_id, str) and _USER_ID.fullmatch(user_id) is not None


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_record(path: Path, uid: object, obj: object) -> _Record:
    who = f"user '{uid}'" if _valid_user_id(uid) else "a user with an invalid id"

    def bad(what: str) -> ConfigurationError:
        return ConfigurationError(f"{path}: {who}: {what}")

    if not _valid_user_id(uid):
        raise bad(_USER_ID_RULE)
    if not isinstance(obj, dict) or set(obj) != _RECORD_KEYS:
        raise bad(f"a record must have exactly the keys {', '.join(sorted(_RECORD_KEYS))}")
    if obj["user_id"] != uid:
        raise bad("the record's user_id differs from its key")
    try:
        role = Role(obj["role"])
    except ValueError:
        raise bad("unknown role") from None
    if role is Role.NO_ROLE:
        raise bad("role no-role cannot belong to a user")
    kdf, slot = obj["kdf"], obj["slot"]
    if not isinstance(kdf, dict) or set(kdf) != {"salt", "log2_n", "r", "p"}:
        raise bad("kdf must have exactly salt, log2_n, r and p")
    if kdf["r"] != SCRYPT_R or kdf["p"] != SCRYPT_P:
        raise bad(f"kdf must use scrypt r = {SCRYPT_R}, p = {SCRYPT_P}")
    log2_n = kdf["log2_n"]
    if not isinstance(log2_n, int) or isinstance(log2_n, bool):
        raise bad("kdf log2_n must be an integer")
    if not MIN_LOG2_N <= log2_n <= MAX_LOG2_N:
        raise bad(f"kdf log2_n must be {MIN_LOG2_N}..{MAX_LOG2_N}")
    if not isinstance(slot, dict) or set(slot) != {"nonce", "ciphertext"}:
        raise bad("slot must have exactly nonce and ciphertext")
    failures = obj["failures"]
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        raise bad("failures must be a non-negative integer")
    return _Record(
        user_id=uid,
        role=role,
        created=_parse_time(obj["created"], "created", bad),
        modified=_parse_time(obj["modified"], "modified", bad),
        salt=_parse_hex(kdf["salt"], "kdf salt", SALT_BYTES, bad),
        log2_n=log2_n,
        verifier=_parse_hex(obj["verifier"], "verifier", _VERIFIER_BYTES, bad),
        nonce=_parse_hex(slot["nonce"], "slot nonce", _NONCE_BYTES, bad),
        ciphertext=_parse_hex(slot["ciphertext"], "slot ciphertext", None, bad),
        failures=failures,
        locked_until=_parse_optional_time(obj["locked_until"], "locked_until", bad),
        last_logon=_parse_optional_time(obj["last_logon"], "last_logon", bad),
    )


def _parse_hex(value: object, what: str, size: int | None, bad: _Bad) -> bytes:
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None:
        raise bad(f"{what} must be hexadecimal")
    if size is not None and len(data) != size:
        raise bad(f"{what} must be {size} bytes")
    if size is None and len(data) < _TAG_BYTES:
        raise bad(f"{what} is shorter than an AES-GCM tag")
    return data


def _parse_time(value: object, what: str, bad: _Bad) -> datetime:
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise bad(f"{what} must be an ISO 8601 time with a zone")
    return at.astimezone(UTC)


def _parse_optional_time(value: object, what: str, bad: _Bad) -> datetime | None:
    return None if value is None else _parse_time(value, what, bad)
