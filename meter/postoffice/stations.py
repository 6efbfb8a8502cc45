"""Station credentials: who may cancel pieces at the post office, and who may read its books.

A credential is an API key, one per sorting machine or counter station, with
a name and a role:

- ``station``: may cancel (record a piece as used) and read the books;
- ``auditor``: may read the books (reconciliation, counters, metrics) only.

The key is shown once, when it is made (``meter postoffice stations add``):
``pos1_<id>_<secret>``, where ``id`` (8 hex digits) names the record and
``secret`` is 256 random bits. The registry file keeps only the SHA-256 of
the whole key: 256 random bits need no slow hash, since nobody can guess
them, and a stolen registry file gives no key. A revoked key stays in the
file (marked, with the time) so that the audit trail of who recorded what
keeps its names.

The file (``HOME/postoffice/stations.json``, mode 0600) is written whole
(temporary file, fsync, rename). The service looks at its modification time
and size at every request and reads it again when they change, so a revoked
key stops working at the next request with no restart.
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

__all__ = ["KEY_PREFIX", "Role", "Station", "StationRegistry"]

KEY_PREFIX = "pos1"
_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})")


class Role(StrEnum):
    STATION = "station"  # cancels pieces, reads the books
    AUDITOR = "auditor"  # reads the books only


@dataclass(frozen=True, slots=True)
class Station:
    """One credential as the registry keeps it (never the key itself)."""

    id: str
    name: str
    role: Role
    sha256: str  # of the whole key, hex
    created: str  # ISO 8601, UTC
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, Any]:
        """What `stations list` shows: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "created": self.created,
            "revoked": self.revoked,
        }


class StationRegistry:
    """The station credentials in one file; thread-safe, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of what was read
        self._stations: list[Station] = []

    @property
    def path(self) -> Path:
        return self._path

    def stations(self) -> list[Station]:
        with self._lock:
            return list(self._current())

    def add(self, name: str, role: Role | str = Role.STATION) -> str:
        """A new credential; returns its key, which is shown this once and kept nowhere."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(
                f"station name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        try:
            chosen = Role(role)
        except ValueError:
            raise InvalidInput(
                f"role {role!r}: choose {' or '.join(r.value for r in Role)}"
            ) from None
        with self._lock:
            stations = self._current()
            if any(s.name == name and s.active for s in stations):
                raise InvalidInput(f"station {name!r} already has a key: revoke it first")
            taken = {s.id for s in stations}
            ident = secrets.token_hex(4)
            while ident in taken:
                ident = secrets.token_hex(4)
            key = f"{KEY_PREFIX}_{ident}_{secrets.token_urlsafe(32)}"
            station = Station(
                id=ident,
                name=name,
                role=chosen,
                sha256=hashlib.sha256(key.encode()).hexdigest(),
                created=_now(),
            )
            self._write([*stations, station])
        return key

    def revoke(self, name: str) -> Station:
        """Revoke the active key of this station (by name or id); it fails from the next request."""
        with self._lock:
            stations = self._current()
            found = [s for s in stations if s.active and name in (s.name, s.id)]
            if not found:
                raise InvalidInput(f"no active station key named {name!r}")
            revoked = replace(found[0], revoked=_now())
            self._write([revoked if s is found[0] else s for s in stations])
        return revoked

    def authenticate(self, key: str) -> Station:
        """The active station holding this key; AuthenticationFailed otherwise."""
        match = _KEY.fullmatch(key.strip()) if isinstance(key, str) else None
        if match is None:
            raise AuthenticationFailed(
                f"not a station key: expected {KEY_PREFIX}_<id>_<secret> as given by "
                "'meter postoffice stations add'"
            )
        digest = hashlib.sha256(match.group(0).encode()).hexdigest()
        with self._lock:
            stations = self._current()
        for station in stations:
            if station.id == match.group(1) and hmac.compare_digest(station.sha256, digest):
                if not station.active:
                    raise AuthenticationFailed(
                        f"the key of station {station.name!r} was revoked at {station.revoked}"
                    )
                return station
        raise AuthenticationFailed("unknown station key")

    def require(self, key: str, *roles: Role) -> Station:
        """authenticate(), and AccessDenied unless the station has one of the roles."""
        station = self.authenticate(key)
        if station.role not in roles:
            wanted = " or ".join(r.value for r in roles)
            raise AccessDenied(
                f"station {station.name!r} has the {station.role.value} role; this needs {wanted}"
            )
        return station

    def _current(self) -> list[Station]:
        """The file's stations, read again if it changed; under the lock."""
        try:
            info = os.stat(self._path)
        except FileNotFoundError:
            self._seen, self._stations = None, []
            return self._stations
        except OSError as exc:
            raise ConfigurationError(f"station registry: cannot read: {exc.strerror}") from exc
        seen = (info.st_mtime_ns, info.st_size)
        if seen != self._seen:
            self._stations = _parse(self._path.read_bytes())
            self._seen = seen
        return self._stations

    def _write(self, stations: list[Station]) -> None:
        body = {"format": _FORMAT, "stations": [_record(s) for s in stations]}
        data = (json.dumps(body, indent=2) + "\n").encode()
        write_atomically(self._path, data, mode=0o600)
        self._seen = None  # read back at the next look, with the new mtime
        self._stations = stations


def _record(station: Station) -> dict[str, Any]:
    record = asdict(station)
    record["role"] = station.role.value
    return record


def _parse(data: bytes) -> list[Station]:
    try:
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            raise ValueError(f"not a format {_FORMAT} station registry")
        stations = []
        for entry in body["stations"]:
            if set(entry) != {"id", "name", "role", "sha256", "created", "revoked"}:
                raise ValueError(f"entry with fields {sorted(entry)}")
            stations.append(
                Station(
                    id=str(entry["id"]),
                    name=str(entry["name"]),
                    role=Role(entry["role"]),
                    sha256=str(entry["sha256"]),
                    created=str(entry["created"]),
                    revoked=None if entry["revoked"] is None else str(entry["revoked"]),
                )
            )
        return stations
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # Refuse every key rather than guess: a damaged registry must not let anyone in.
        raise ConfigurationError(
            f"station registry is damaged ({exc}); no key is accepted"
        ) from exc


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()
