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
key stops working at the next request with no restart. The registry itself
is meter/access_keys.py, which the provider's operator keys use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from meter.access_keys import AccessKey, KeyKind, KeyRegistry, KeyWording

__all__ = ["KEY_PREFIX", "Role", "Station", "StationRegistry"]

KEY_PREFIX = "pos1"


class Role(StrEnum):
    STATION = "station"  # cancels pieces, reads the books
    AUDITOR = "auditor"  # reads the books only


@dataclass(frozen=True, slots=True)
class Station(AccessKey[Role]):
    """One credential as the registry keeps it (never the key itself)."""


_KIND = KeyKind(
    prefix=KEY_PREFIX,
    file_format=1,
    list_field="stations",
    record=Station,
    roles=Role,
    wording=KeyWording(
        holder="station",
        kind="station key",
        command="meter postoffice stations add",
        file="format 1 station registry",
        taken="station {name} already has a key: revoke it first",
        revoked="the key of station {name} was revoked at {at}",
        unreadable="station registry: cannot read: {reason}",
        damaged="station registry is damaged ({reason}); no key is accepted",
    ),
)


class StationRegistry:
    """The station credentials in one file; thread-safe, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self._registry = KeyRegistry(Path(path), _KIND)

    @property
    def path(self) -> Path:
        return self._registry.path

    def stations(self) -> list[Station]:
        return self._registry.records()

    def add(self, name: str, role: Role | str = Role.STATION) -> str:
        """A new credential; returns its key, which is shown this once and kept nowhere."""
        return self._registry.add(name, role)

    def revoke(self, name: str) -> Station:
        """Revoke the active key of this station (by name or id); it fails from the next request."""
        return self._registry.revoke(name)

    def authenticate(self, key: str) -> Station:
        """The active station holding this key; AuthenticationFailed otherwise."""
        return self._registry.authenticate(key)

    def require(self, key: str, *roles: Role) -> Station:
        """authenticate(), and AccessDenied unless the station has one of the roles."""
        return self._registry.require(key, *roles)
