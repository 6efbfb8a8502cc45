"""Bearer keys kept as hashes in one file: the one copy of what the provider's operator keys
(meter/provider/api_keys.py) and the post office's stations (meter/postoffice/stations.py) share.

A key is ``<prefix>_<id>_<secret>``: ``id`` is 8 hex digits naming the record,
``secret`` 256 random bits (43 URL-safe base64 characters). It is returned
once, when it is made, and kept nowhere. The file keeps, for each key, its
record: id, name, role, the SHA-256 of the whole key, when it was made and
when it was revoked. 256 random bits need no slow hash, since nobody can
guess them, and a stolen file gives no key. A revoked key stays in the file,
marked with the time, so that who did what keeps its names.

The file is JSON, ``{"format": F, "<list>": [record, ...]}``, written whole
(meter.durable, mode 0600) and read again whenever its modification time or
size changes, so a revoked key fails from the next request with no restart.
It is parsed strictly: a damaged file admits nobody. Keys are compared in
constant time.

Stdlib only, like meter/durable.py, so that services which must not import
each other can both use it. Each user keeps its own record class, role enum,
file format and words (`KeyWording`).
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
from typing import Any, Generic, TypeVar

from meter.durable import write_atomically
from meter.errors import AccessDenied, AuthenticationFailed, ConfigurationError, InvalidInput

__all__ = ["AccessKey", "KeyKind", "KeyRegistry", "KeyWording"]

RoleT = TypeVar("RoleT", bound=StrEnum)
KeyT = TypeVar("KeyT", bound="AccessKey[Any]")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FIELDS = {"id", "name", "role", "sha256", "created", "revoked"}


@dataclass(frozen=True, slots=True)
class AccessKey(Generic[RoleT]):
    """One key as the file keeps it (never the key itself)."""

    id: str
    name: str
    role: RoleT
    sha256: str  # of the whole key, hex
    created: str  # ISO 8601, UTC
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, Any]:
        """What a listing shows: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "created": self.created,
            "revoked": self.revoked,
        }


@dataclass(frozen=True, slots=True)
class KeyWording:
    """The words each registry's refusals use, so that every message names its own thing.

    Templates are filled with ``str.format``: ``{name}``, ``{at}``, ``{path}``, ``{reason}``.
    """

    holder: str  # "station": "station name 'x': ...", "station 'x' has the ... role"
    kind: str  # "station key": "not a station key", "no active station key named 'x'"
    command: str  # the command that makes keys, named when a key has the wrong form
    file: str  # what a file of the wrong format is not: "not a format 1 station registry"
    taken: str  # an active key of that name exists
    revoked: str  # the key was revoked
    unreadable: str  # the file cannot be looked at
    damaged: str  # the file cannot be parsed


@dataclass(frozen=True, slots=True)
class KeyKind(Generic[KeyT]):
    """What makes one registry's keys and file its own."""

    prefix: str  # of every key: "pos1"
    file_format: str | int  # the file's "format" value
    list_field: str  # the file's key holding the records
    record: type[KeyT]
    roles: type[StrEnum]
    wording: KeyWording


class KeyRegistry(Generic[KeyT]):
    """The keys of one kind in one file; thread-safe, re-read when the file changes."""

    def __init__(self, path: Path, kind: KeyKind[KeyT]) -> None:
        self._path = Path(path)
        self._kind = kind
        self._pattern = re.compile(
            rf"{re.escape(kind.prefix)}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})"
        )
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of what was read
        self._records: list[KeyT] = []

    @property
    def path(self) -> Path:
        return self._path

    def records(self) -> list[KeyT]:
        with self._lock:
            return list(self._current())

    def add(self, name: str, role: StrEnum | str) -> str:
        """A new key; returned this once, kept nowhere."""
        words = self._kind.wording
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(
                f"{words.holder} name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        roles = self._kind.roles
        try:
            chosen = roles(role)
        except ValueError:
            raise InvalidInput(
                f"role {role!r}: choose {' or '.join(r.value for r in roles)}"
            ) from None
        with self._lock:
            records = self._current()
            if any(r.name == name and r.active for r in records):
                raise InvalidInput(words.taken.format(name=repr(name)))
            taken = {r.id for r in records}
            ident = secrets.token_hex(4)
            while ident in taken:
                ident = secrets.token_hex(4)
            key = f"{self._kind.prefix}_{ident}_{secrets.token_urlsafe(32)}"
            record = self._kind.record(ident, name, chosen, _sha256(key), _now())
            self._write([*records, record])
        return key

    def revoke(self, name: str) -> KeyT:
        """Revoke the active key named so (by name or id); it fails from the next request."""
        with self._lock:
            records = self._current()
            found = [r for r in records if r.active and name in (r.name, r.id)]
            if not found:
                raise InvalidInput(f"no active {self._kind.wording.kind} named {name!r}")
            revoked = replace(found[0], revoked=_now())
            self._write([revoked if r is found[0] else r for r in records])
        return revoked

    def authenticate(self, key: str) -> KeyT:
        """The active record of this key; AuthenticationFailed otherwise."""
        words = self._kind.wording
        match = self._pattern.fullmatch(key.strip()) if isinstance(key, str) else None
        if match is None:
            raise AuthenticationFailed(
                f"not a {words.kind}: expected {self._kind.prefix}_<id>_<secret> as given by "
                f"'{words.command}'"
            )
        digest = _sha256(match.group(0))
        with self._lock:
            records = self._current()
        for record in records:
            if record.id == match.group(1) and hmac.compare_digest(record.sha256, digest):
                if not record.active:
                    raise AuthenticationFailed(
                        words.revoked.format(name=repr(record.name), at=record.revoked)
                    )
                return record
        raise AuthenticationFailed(f"unknown {words.kind}")

    def require(self, key: str, *roles: StrEnum) -> KeyT:
        """authenticate(), and AccessDenied unless the key has one of the roles."""
        record = self.authenticate(key)
        if record.role not in roles:
            wanted = " or ".join(r.value for r in roles)
            raise AccessDenied(
                f"{self._kind.wording.holder} {record.name!r} has the {record.role.value} role; "
                f"this needs {wanted}"
            )
        return record

    def _current(self) -> list[KeyT]:
        """The file's records, read again if it changed; under the lock."""
        try:
            info = os.stat(self._path)
        except FileNotFoundError:
            self._seen, self._records = None, []
            return self._records
        except OSError as exc:
            raise ConfigurationError(
                self._kind.wording.unreadable.format(path=self._path, reason=exc.strerror)
            ) from exc
        seen = (info.st_mtime_ns, info.st_size)
        if seen != self._seen:
            self._records = self._parse(self._path.read_bytes())
            self._seen = seen
        return self._records

    def _write(self, records: list[KeyT]) -> None:
        body = {
            "format": self._kind.file_format,
            self._kind.list_field: [{**asdict(r), "role": r.role.value} for r in records],
        }
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self._path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)
        self._seen = None  # read back at the next look, with the new mtime
        self._records = records

    def _parse(self, data: bytes) -> list[KeyT]:
        kind = self._kind
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("format") != kind.file_format:
                raise ValueError(f"not a {kind.wording.file}")
            records = []
            for entry in body[kind.list_field]:
                if not isinstance(entry, dict):
                    raise ValueError("an entry that is not an object")
                if set(entry) != _FIELDS:
                    raise ValueError(f"an entry with fields {sorted(entry)}")
                revoked = entry["revoked"]
                records.append(
                    kind.record(
                        id=str(entry["id"]),
                        name=str(entry["name"]),
                        role=kind.roles(entry["role"]),
                        sha256=str(entry["sha256"]),
                        created=str(entry["created"]),
                        revoked=None if revoked is None else str(revoked),
                    )
                )
            return records
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # Refuse every key rather than guess: a damaged file must not let anyone in.
            raise ConfigurationError(
                kind.wording.damaged.format(path=self._path, reason=exc)
            ) from exc


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()
