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
The registry itself is meter/access_keys.py, which the post office's
stations (meter/postoffice/stations.py) use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from meter.access_keys import AccessKey, KeyKind, KeyRegistry, KeyWording

__all__ = ["KEY_PREFIX", "ApiKey", "ApiKeys", "KeyRole"]

KEY_PREFIX = "prv1"


class KeyRole(StrEnum):
    OPERATOR = "operator"  # changes accounts
    AUDITOR = "auditor"  # reads them


@dataclass(frozen=True, slots=True)
class ApiKey(AccessKey[KeyRole]):
    """One key as the file keeps it (never the key itself)."""


_KIND = KeyKind(
    prefix=KEY_PREFIX,
    file_format="provider-keys-v1",
    list_field="keys",
    record=ApiKey,
    roles=KeyRole,
    wording=KeyWording(
        holder="key",
        kind="provider key",
        command="meter provider keys add",
        file="provider-keys-v1 file",
        taken="{name} has an active key already: revoke it first",
        revoked="the key {name} was revoked at {at}",
        unreadable="provider keys {path}: {reason}",
        damaged="provider keys {path} are damaged ({reason}); no key is accepted",
    ),
)


class ApiKeys:
    """The operator keys in one file; thread-safe, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._registry = KeyRegistry(self.path, _KIND)

    def records(self) -> list[ApiKey]:
        return self._registry.records()

    def add(self, name: str, role: KeyRole | str = KeyRole.OPERATOR) -> str:
        """A new key; returned this once, kept nowhere."""
        return self._registry.add(name, role)

    def revoke(self, name: str) -> ApiKey:
        return self._registry.revoke(name)

    def require(self, key: str, *roles: KeyRole) -> ApiKey:
        """The active key's record; AuthenticationFailed or AccessDenied otherwise."""
        return self._registry.require(key, *roles)
