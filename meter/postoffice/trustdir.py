"""A post office's certificate directory, reloaded when its files change.

Layout: ``postal-root.pem`` (the postal root, exactly one certificate), any
number of other ``*.pem`` files (provider and meter certificates, bundles
allowed) and an optional ``revocations.json`` (a JSON list of
{"device_serial", "revoked_at"}). Other files are ignored.

The directory is read once at start, where anything malformed is an error.
Later, every call to current() compares each file's (name, mtime_ns, size)
with the set last loaded and reloads when they differ. A malformed change
does not take effect: the last good set keeps serving, and `problem` says
what is wrong until the directory is fixed.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from meter.durable import write_atomically
from meter.errors import CertificateError, ConfigurationError
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.protocol.revocation_export import RevocationExport

__all__ = [
    "REVOCATIONS_FILE",
    "ROOT_FILE",
    "CertificateDirectory",
    "TrustSet",
    "load_revocation_export",
]

ROOT_FILE = "postal-root.pem"
REVOCATIONS_FILE = "revocations.json"

_Snapshot = tuple[tuple[str, int, int], ...]  # (name, mtime_ns, size) of every file read


@dataclass(frozen=True)
class TrustSet:
    """One consistent load of the directory."""

    trust: TrustStore
    revocations: Revocations
    files: tuple[str, ...]  # the names it was read from, sorted


class CertificateDirectory:
    """The trust store and revocations of one directory; thread-safe."""

    def __init__(self, path: Path) -> None:
        """Load the directory; ConfigurationError or CertificateError names what is wrong."""
        self._path = Path(path)
        self._lock = threading.Lock()
        self._problem: str | None = None
        snapshot = self._snapshot()
        self._loaded = self._load(snapshot)
        self._snapshot_loaded = snapshot
        self._snapshot_failed: _Snapshot | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def problem(self) -> str | None:
        """Why the directory's present content is not in use, or None when it is."""
        with self._lock:
            return self._problem

    def current(self) -> tuple[TrustStore, Revocations]:
        """The trust store and revocations, reloaded first if any file changed."""
        loaded = self.current_set()
        return loaded.trust, loaded.revocations

    def current_set(self) -> TrustSet:
        with self._lock:
            try:
                snapshot = self._snapshot()
            except (ConfigurationError, CertificateError) as exc:
                self._problem = f"{exc}; still serving the certificates loaded before"
                return self._loaded
            if snapshot == self._snapshot_loaded:
                self._problem = None  # e.g. a bad file removed again
                return self._loaded
            if snapshot == self._snapshot_failed:
                return self._loaded
            try:
                loaded = self._load(snapshot)
            except (ConfigurationError, CertificateError) as exc:
                self._snapshot_failed = snapshot
                self._problem = f"{exc}; still serving the certificates loaded before"
                return self._loaded
            # A file that changed while it was read gets read again on the next call.
            if self._snapshot() == snapshot:
                self._snapshot_loaded, self._snapshot_failed = snapshot, None
            self._loaded, self._problem = loaded, None
            return loaded

    def _snapshot(self) -> _Snapshot:
        try:
            entries = list(os.scandir(self._path))
        except FileNotFoundError:
            raise ConfigurationError(
                f"certificate directory {self._path} does not exist: create it and put "
                f"{ROOT_FILE} in it (see `meter export-certs`)"
            ) from None
        except OSError as exc:
            raise ConfigurationError(
                f"certificate directory {self._path}: cannot list it: {exc.strerror}"
            ) from exc
        rows = []
        for entry in entries:
            if not _is_ours(entry.name):
                continue
            try:
                if not entry.is_file():
                    continue
                stat = entry.stat()
            except OSError:
                continue  # removed while listing: the next call sees the directory settled
            rows.append((entry.name, stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(rows))

    def _load(self, snapshot: _Snapshot) -> TrustSet:
        names = [name for name, _, _ in snapshot]
        if ROOT_FILE not in names:
            raise ConfigurationError(
                f"certificate directory {self._path} has no {ROOT_FILE}: put the postal root "
                "certificate there (see `meter export-certs`)"
            )
        others = [self._path / n for n in names if n.endswith(".pem") and n != ROOT_FILE]
        try:
            trust = TrustStore.from_files(self._path / ROOT_FILE, others)
        except CertificateError as exc:
            if str(self._path) in str(exc):
                raise  # it names the file already
            raise CertificateError(f"certificate directory {self._path}: {exc}") from exc
        revocations = (
            Revocations.from_file(self._path / REVOCATIONS_FILE)
            if REVOCATIONS_FILE in names
            else Revocations.empty()
        )
        return TrustSet(trust, revocations, tuple(names))


def _is_ours(name: str) -> bool:
    return name == REVOCATIONS_FILE or (name.endswith(".pem") and not name.startswith("."))


def load_revocation_export(directory: Path, data: bytes, source: str) -> int:
    """Verify a provider's signed revocation export (meter.protocol.device_audit) with that
    provider's certificate in the directory, and merge it into ``revocations.json``
    (an instant already listed earlier stands). Returns how many devices it lists.

    Refused, the file untouched: an export that does not parse or verify, from a provider
    the directory does not know, or naming a meter another provider certified.
    """
    export = RevocationExport.from_json(data, source)
    trust = CertificateDirectory(directory).current_set().trust
    providers = {c.authorization_id: c.provider for c in trust.credentials}
    provider = providers.get(export.authorization_id)
    if provider is None:
        raise CertificateError(
            f"{source}: no certificate of provider {export.authorization_id} (with a meter it "
            f"certified) in {directory}: add them first (`meter export-certs`)"
        )
    export.verify(provider)
    for credential in trust.credentials:
        if (
            credential.device_serial in export.revoked
            and credential.authorization_id != export.authorization_id
        ):
            raise CertificateError(
                f"{source}: provider {export.authorization_id} may not revoke meter "
                f"{credential.device_serial}, which provider {credential.authorization_id} "
                "certified"
            )
    path = directory / REVOCATIONS_FILE
    listed: dict[int, datetime] = {}
    if path.exists():
        Revocations.from_file(path)  # refuses a malformed list before it is merged into
        for entry in json.loads(path.read_bytes()):
            at = datetime.fromisoformat(entry["revoked_at"])
            listed[entry["device_serial"]] = min(at, listed.get(entry["device_serial"], at))
    for serial, at in export.revoked.items():
        listed[serial] = min(at, listed.get(serial, at))
    rows = [{"device_serial": s, "revoked_at": t.isoformat()} for s, t in sorted(listed.items())]
    write_atomically(path, json.dumps(rows, indent=1).encode() + b"\n", mode=0o644)
    return len(export.revoked)
