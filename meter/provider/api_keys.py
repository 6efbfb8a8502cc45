"""Operator API keys of the provider service: who may open accounts, fund them, authorize meters.

A key has a name and a role:

- ``operator``: creates customers, records payments, authorizes meters, reads accounts;
- ``auditor``: reads accounts and transactions only.

The key is shown once, when it is made (``meter provider keys add``):
``prv1_<id>_<secret>``, ``id`` 8 hex digits naming the record, ``secret``
256 random bits. The file keeps only the SHA-256 of the whole key (256 random
bits need no slow hash; a stolen file gives no key). A revoked key stays in
the file, marked with the time. The file (``HOME/provider/keys.json``, 0600)
is written whole (meter.durable) and read again whenever its modification
time or size changes, so a revoked key fails from the next request.
The same design as the post office's stations (meter/postoffice/stations.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from meter.durable import write_atomically
from meter.errors import AccessDenied, AuthenticationFailed, ConfigurationError, InvalidInput

__all__ = ["KEY_PREFIX", "ApiKey", "ApiKeys", "KeyRole"]

KEY_PREFIX = "prv1"
_FORMAT = "provider-keys-v1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})")
_FIELDS = {"id", "name", "role", "sha256", "created", "revoked"}


class KeyRole(StrEnum):
    OPERATOR = "operator"  # changes accounts
    AUDITOR = "auditor"  # reads them


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as the file keeps it (never the key itself)."""

    id: str
    name: str
    role: KeyRole
    sha256: str
    created: str
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "created": self.created,
            "revoked": self.revoked,
        }


class ApiKeys:
    """The operator keys in one file; thread-safe, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._keys: list[ApiKey] = []

    def records(self) -> list[ApiKey]:
        with self._lock:
            return list(self._current())

    def add(self, name: str, role: KeyRole | str = KeyRole.OPERATOR) -> str:
        """A new key; returned this once, kept nowhere."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(
                f"key name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        try:
            chosen = KeyRole(role)
        except ValueError:
            raise InvalidInput(
                f"role {role!r}: choose {' or '.join(r.value for r in KeyRole)}"
            ) from None
        with self._lock:
            keys = self._current()
            if any(k.name == name and k.active for k in keys):
                raise InvalidInput(f"{name!r} has an active key already: revoke it first")
            taken = {k.id for k in keys}
            ident = secrets.token_hex(4)
            while ident in taken:
                ident = secrets.token_hex(4)
            key = f"{KEY_PREFIX}_{ident}_{secrets.token_urlsafe(32)}"
            record = ApiKey(ident, name, chosen, hashlib.sha256(key.encode()).hexdigest(), _now())
            self._write([*keys, record])
        return key

    def revoke(self, name: str) -> ApiKey:
        with self._lock:
            keys = self._current()
            found = [k for k in keys if k.active and name in (k.name, k.id)]
            if not found:
                raise InvalidInput(f"no active provider key named {name!r}")
            revoked = replace(found[0], revoked=_now())
            self._write([revoked if k is found[0] else k for k in keys])
        return revoked

    def require(self, key: str, *roles: KeyRole) -> ApiKey:
        """The active key's record; AuthenticationFailed or AccessDenied otherwise."""
        match = _KEY.fullmatch(key.strip()) if isinstance(key, str) else None
        if match is None:
            raise AuthenticationFailed(
                f"not a provider key: expected {KEY_PREFIX}_<id>_<secret> as given by "
                "'meter provider keys add'"
            )
        digest = hashlib.sha256(match.group(0).encode()).hexdigest()
        with self._lock:
            keys = self._current()
        for record in keys:
            if record.id == match.group(1) and hmac.compare_digest(record.sha256, digest):
                if not record.active:
                    raise AuthenticationFailed(
                        f"the key {record.name!r} was revoked at {record.revoked}"
                    )
                if record.role not in roles:
                    wanted = " or ".join(r.value for r in roles)
                    raise AccessDenied(
                        f"key {record.name!r} has the {record.role.value} role; this needs {wanted}"
                    )
                return record
        raise AuthenticationFailed("unknown provider key")

    def _current(self) -> list[ApiKey]:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._keys = None, []
            return self._keys
        except OSError as exc:
            raise ConfigurationError(f"provider keys {self.path}: {exc.strerror}") from exc
        seen = (info.st_mtime_ns, info.st_size)
        if seen != self._seen:
            self._keys = _parse(self.path.read_bytes(), self.path)
            self._seen = seen
        return self._keys

    def _write(self, keys: list[ApiKey]) -> None:
        body = {"format": _FORMAT, "keys": [{**asdict(k), "role": k.role.value} for k in keys]}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)
        self._seen = None
        self._keys = keys


def _parse(data: bytes, path: Path) -> list[ApiKey]:
    try:
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} file")
        keys = []
        for entry in body["keys"]:
            if not isinstance(entry, dict) or set(entry) != _FIELDS:
                raise ValueError("an entry with other fields")
            revoked = entry["revoked"]
            keys.append(
                ApiKey(
                    str(entry["id"]),
                    str(entry["name"]),
                    KeyRole(entry["role"]),
                    str(entry["sha256"]),
                    str(entry["created"]),
                    None if revoked is None else str(revoked),
                )
            )
        return keys
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # Refuse every key rather than guess: a damaged file must not let anyone in.
        raise ConfigurationError(
            f"provider keys {path} are damaged ({exc}); no key is accepted"
        ) from exc


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()
