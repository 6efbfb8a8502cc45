"""What the provider service runs on; apart from http.py so that reading it imports no web
framework (the ``meter`` command starts faster)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meter.errors import InvalidInput
from meter.postoffice.service_config import DEFAULT_ALLOWED_HOSTS, ServiceConfig, Timeouts

__all__ = ["DEFAULT_PORT", "ProviderConfig"]

DEFAULT_PORT = 8418
_MAX_BODY = 64 * 1024  # a request of this service is a few hundred bytes


@dataclass(frozen=True)
class ProviderConfig:
    """Ledger location, operator keys and the request limits of one provider service."""

    ledger: str  # a SQLite file's path or a postgresql:// URL
    keys: Path  # the operator keys' file (meter provider keys)
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS  # Host header names (DNS rebinding)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides its own that may post
    max_body: int = _MAX_BODY
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if not self.allowed_hosts:
            raise InvalidInput("allowed hosts is empty: no client could reach the service")
        if not 1024 <= self.max_body <= 16 * 1024 * 1024:
            raise InvalidInput(f"max body {self.max_body} bytes: give 1024 to 16 MiB")
        self.guard_config()  # the origins' checks

    def guard_config(self) -> ServiceConfig:
        """The same checks the post office runs (RequestGuard reads its Host, Origin and body
        limits from a post office ServiceConfig; the other members are not used by it)."""
        return ServiceConfig(
            cert_dir=Path("."),
            store="",
            ledger=Path("."),
            max_upload=self.max_body,
            allowed_hosts=self.allowed_hosts,
            allowed_origins=self.allowed_origins,
            timeouts=self.timeouts,
        )
