"""What the verification service runs on; apart from service.py so that reading it
does not import the web framework (the ``meter`` command starts faster)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from meter.errors import InvalidInput

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_UPLOAD", "ServiceConfig"]

DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024
DEFAULT_MAX_BATCH = 10_000


@dataclass(frozen=True)
class ServiceConfig:
    """Certificates, replay store, ledger and limits of one verification service."""

    cert_dir: Path
    store: str | Path  # an embedded store's path, or a redis:// URL
    ledger: Path
    max_upload: int = DEFAULT_MAX_UPLOAD  # bytes of one request body
    max_batch: int = DEFAULT_MAX_BATCH  # items of one verify-batch request
    today: date | None = None  # the verifier's date; None: the UTC date of each request

    def __post_init__(self) -> None:
        if self.max_upload < 1024:
            raise InvalidInput(f"max upload {self.max_upload} bytes is below 1024")
        if self.max_batch < 1:
            raise InvalidInput(f"max batch {self.max_batch} is below 1")
