"""What the verification service runs on; apart from service.py so that reading it
does not import the web framework (the ``meter`` command starts faster)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from meter.errors import InvalidInput

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD",
    "ServiceConfig",
    "Timeouts",
]

DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024
DEFAULT_MAX_BATCH = 10_000
# meter.label.DEFAULT_MAX_PIXELS, repeated so that this module does not import the image
# libraries (tests/test_service_exposed.py checks they agree).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Timeouts:
    """How long one connection may take for each part of its work, in seconds."""

    header: float = 10.0  # from connecting (or the end of the last response) to a whole head
    body: float = 30.0  # from the head to the whole body
    idle: float = 5.0  # keep-alive: an open connection with no request
    max_connections: int = 512  # open connections at once; more are answered 503 and closed

    def __post_init__(self) -> None:
        for name in ("header", "body", "idle"):
            if not 0 < getattr(self, name) <= 3600:
                raise InvalidInput(f"{name} timeout {getattr(self, name)} s: give 0 to 3600 s")
        if self.max_connections < 1:
            raise InvalidInput(f"max connections {self.max_connections} is below 1")


@dataclass(frozen=True)
class ServiceConfig:
    """Certificates, replay store, ledger, credentials and limits of one verification service."""

    cert_dir: Path
    store: str | Path  # an embedded store's path, or a redis:// URL
    ledger: Path
    # Station credentials (meter postoffice stations); None: the file beside the ledger.
    stations: Path | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD  # bytes of one request body
    max_batch: int = DEFAULT_MAX_BATCH  # items of one batch request
    max_pixels: int = DEFAULT_MAX_PIXELS  # of one label image, read from its header
    image_workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # decoded at once
    image_queue: int = 8  # images waiting for a worker; more are answered 503
    # Names the clients may use for this server (the Host header): a defence
    # against DNS rebinding, where a hostile page's own name points here.
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    # Origins, besides the server's own, whose pages may post here (e.g. a
    # counter application on another host): "https://counter.example".
    allowed_origins: tuple[str, ...] = ()
    redis_replicas: int = 0  # replicas that must have a piece before it is answered VALID
    timeouts: Timeouts = field(default_factory=Timeouts)
    today: date | None = None  # the verifier's date; None: the UTC date of each request

    def __post_init__(self) -> None:
        if self.max_upload < 1024:
            raise InvalidInput(f"max upload {self.max_upload} bytes is below 1024")
        if self.max_batch < 1:
            raise InvalidInput(f"max batch {self.max_batch} is below 1")
        if self.max_pixels < 10_000:
            raise InvalidInput(f"max pixels {self.max_pixels} is below 10000")
        if self.image_workers < 1 or self.image_queue < 0:
            raise InvalidInput("image workers must be 1 or more, the image queue 0 or more")
        if not self.allowed_hosts:
            raise InvalidInput("allowed hosts is empty: no client could reach the service")
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise InvalidInput(f"allowed origin {origin!r}: give scheme://host[:port], no path")
        if self.redis_replicas < 0:
            raise InvalidInput(f"redis replicas {self.redis_replicas} is below 0")

    @property
    def stations_file(self) -> Path:
        return self.stations or self.ledger.parent / "stations.json"
