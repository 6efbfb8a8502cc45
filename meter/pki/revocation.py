"""The revocation list: device serials and the instant each was revoked."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from meter.errors import CertificateError

_KEYS = frozenset({"device_serial", "revoked_at"})


class Revocations:
    """Revoked devices; an indicium issued strictly after the instant is REVOKED."""

    def __init__(self, revoked: Mapping[int, datetime]) -> None:
        self._revoked = dict(revoked)

    @classmethod
    def empty(cls) -> Revocations:
        return cls({})

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "revocation list") -> Revocations:
        """A JSON list of {"device_serial": N, "revoked_at": ISO-8601 with offset}."""
        try:
            entries = json.loads(data)
        except ValueError as exc:
            raise CertificateError(f"{source}: not JSON: {exc}") from exc
        if not isinstance(entries, list):
            raise CertificateError(f"{source}: must be a JSON list of revocations")
        revoked: dict[int, datetime] = {}
        for number, entry in enumerate(entries, start=1):
            serial, instant = _entry(entry, f"{source}: entry {number}")
            # A device listed twice stands revoked from its earliest instant.
            revoked[serial] = min(instant, revoked.get(serial, instant))
        return cls(revoked)

    @classmethod
    def from_file(cls, path: Path) -> Revocations:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CertificateError(f"cannot read revocation list {path}: {exc.strerror}") from exc
        return cls.from_json(data, str(path))

    def revoked_at(self, device_serial: int) -> datetime | None:
        return self._revoked.get(device_serial)

    def __len__(self) -> int:
        return len(self._revoked)


def _entry(entry: object, where: str) -> tuple[int, datetime]:
    if not isinstance(entry, dict) or set(entry) != _KEYS:
        raise CertificateError(f"{where}: must be an object with exactly {sorted(_KEYS)}")
    serial, text = entry["device_serial"], entry["revoked_at"]
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 2**64:
        raise CertificateError(
            f"{where}: device_serial {serial!r} is not an 8-byte unsigned integer"
        )
    if not isinstance(text, str):
        raise CertificateError(f"{where}: revoked_at {text!r} is not an ISO-8601 string")
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise CertificateError(f"{where}: revoked_at {text!r} is not ISO-8601") from None
    if instant.utcoffset() is None:
        raise CertificateError(f"{where}: revoked_at {text!r} has no UTC offset")
    return serial, instant
