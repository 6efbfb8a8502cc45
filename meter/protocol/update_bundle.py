"""The update bundle (Update PSC): software id and version, rate table, watchdog thresholds,
revocations, signed by the provider's code-signing key.

The document is canonical JSON (sorted keys, no white space, ASCII), format
``pim-psc-bundle-v1``::

    {"body": {"format": "pim-psc-bundle-v1", "software_id": N, "vendor_model": "PM01",
              "version": "1.1.0", "issued_at": ISO-8601, "rates": RATE TABLE,
              "watchdog": {"warn_days": 90, "stop_days": 120},
              "revocations": [{"device_serial": N, "revoked_at": ISO-8601}, ...]},
     "signature": HEX r || s, "certificate": PEM}

The signature is ECDSA P-256 over SHA-256 of the canonical JSON of ``body``, by the
key of ``certificate``: a code-signing certificate issued by the postal root
(meter.pki.codesign). The bundle's identity, pinned by the device and shown in its
status, is the SHA-256 of the whole canonical document.

`verify_update` is every check a meter makes before it installs one; each failure is
an error that names what failed (docs/updates.md lists them).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meter.errors import CertificateError, InvalidInput, ProtocolError
from meter.indicium import Algorithm, VerifyingKey
from meter.pki.codesign import verify_code_signing_certificate
from meter.pki.revocation import Revocations
from meter.protocol.watchdog import WatchdogThresholds
from meter.rates.table import RateTable

__all__ = [
    "BUNDLE_FORMAT",
    "MAX_BUNDLE_BYTES",
    "BundleContents",
    "Installed",
    "UpdateBundle",
    "parse_version",
    "verify_update",
]

BUNDLE_FORMAT = "pim-psc-bundle-v1"
MAX_BUNDLE_BYTES = 48 * 1024  # the shipped table makes about 12 KB
_VERSION = re.compile(r"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})")
_VENDOR_MODEL = re.compile(r"[A-Z0-9]{4}")
_DOCUMENT = {"body", "signature", "certificate"}
_BODY = {
    "format",
    "software_id",
    "vendor_model",
    "version",
    "issued_at",
    "rates",
    "watchdog",
    "revocations",
}
_SIGNATURE_LENGTH = Algorithm.ECDSA_P256.signature_length


def parse_version(text: str) -> tuple[int, int, int]:
    """MAJOR.MINOR.PATCH as numbers, for "is it newer"; InvalidInput otherwise."""
    match = _VERSION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(f"software version {text!r} must be MAJOR.MINOR.PATCH (e.g. 1.2.0)")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class BundleContents:
    """What the provider signs."""

    software_id: int  # the release number every indicium prints (PIM-1 offset 77)
    vendor_model: str  # the device family (lineage) the software is built for
    version: str
    issued_at: datetime
    rates: RateTable
    watchdog: WatchdogThresholds
    revocations: tuple[tuple[int, str], ...] = ()  # (device serial, revoked_at ISO-8601)

    def __post_init__(self) -> None:
        if isinstance(self.software_id, bool) or not isinstance(self.software_id, int):
            raise InvalidInput("software id must be a whole number")
        if not 0 <= self.software_id < 2**16:
            raise InvalidInput(f"software id {self.software_id} must fit in 2 bytes (0-65535)")
        if not isinstance(self.vendor_model, str) or not _VENDOR_MODEL.fullmatch(self.vendor_model):
            raise InvalidInput(
                f"vendor and model {self.vendor_model!r} must be 4 characters A-Z or 0-9"
            )
        parse_version(self.version)
        if self.issued_at.tzinfo is None:
            raise InvalidInput("issued_at must carry a time zone")
        entries = [{"device_serial": s, "revoked_at": t} for s, t in self.revocations]
        try:
            Revocations.from_json(json.dumps(entries), "revocations")
        except CertificateError as exc:
            raise InvalidInput(str(exc)) from exc

    def body(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "software_id": self.software_id,
            "vendor_model": self.vendor_model,
            "version": self.version,
            "issued_at": self.issued_at.isoformat(),
            "rates": self.rates.to_json(),
            "watchdog": self.watchdog.to_json(),
            "revocations": [{"device_serial": s, "revoked_at": t} for s, t in self.revocations],
        }

    def signed_part(self) -> bytes:
        return canonical(self.body())

    def signed_by(
        self, sign: Callable[[bytes], bytes], certificate: x509.Certificate
    ) -> UpdateBundle:
        """The bundle signed by ``sign`` (ECDSA P-256, r || s), the key of ``certificate``."""
        return UpdateBundle(self, sign(self.signed_part()), certificate)

    def revoked_at(self, device_serial: int) -> datetime | None:
        instants = [datetime.fromisoformat(t) for s, t in self.revocations if s == device_serial]
        return min(instants) if instants else None


@dataclass(frozen=True)
class UpdateBundle:
    contents: BundleContents
    signature: bytes
    certificate: x509.Certificate

    def to_bytes(self) -> bytes:
        pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return canonical(
            {"body": self.contents.body(), "signature": self.signature.hex(), "certificate": pem}
        )

    @property
    def sha256(self) -> str:
        """The bundle's identity: SHA-256 of its canonical document, hex."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "update bundle") -> UpdateBundle:
        """Parse strictly; InvalidInput (shape), ProtocolError (unsigned) or CertificateError
        (certificate) names ``source`` and the member at fault. Nothing is verified yet."""
        if len(data) > MAX_BUNDLE_BYTES:
            raise InvalidInput(f"{source}: {len(data)} bytes, more than {MAX_BUNDLE_BYTES}")
        try:
            document = json.loads(data, parse_float=_no_float)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{source}: not JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise InvalidInput(f"{source}: an update bundle is a JSON object")
        if "body" in document and not {"signature", "certificate"} & set(document):
            raise ProtocolError(
                f"{source}: the bundle is not signed (no signature, no certificate): a meter "
                "installs only bundles signed by its provider's code-signing key"
            )
        _members(document, _DOCUMENT, source)
        signature = document["signature"]
        try:
            raw = bytes.fromhex(signature) if isinstance(signature, str) else b""
        except ValueError:
            raw = b""
        if not raw:
            raise ProtocolError(f"{source}: the bundle is not signed (empty signature)")
        if len(raw) != _SIGNATURE_LENGTH:
            raise ProtocolError(f"{source}: 'signature' must be {_SIGNATURE_LENGTH} bytes of hex")
        pem = document["certificate"]
        try:
            certificate = x509.load_pem_x509_certificate(str(pem).encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise CertificateError(f"{source}: 'certificate' is not a PEM certificate") from exc
        return cls(_contents(document["body"], source), raw, certificate)


@dataclass(frozen=True)
class Installed:
    """What a meter runs now: the baseline an update must be newer than."""

    software_id: int
    version: str
    vendor_model: str
    authorization_id: int  # the provider that certified the meter


def verify_update(
    bundle: UpdateBundle, root: x509.Certificate, at: datetime, installed: Installed
) -> None:
    """Every check before an install; raises (never returns False) naming what failed:
    the certificate (issued by ``root`` for code signing, valid ``at``, of the meter's own
    provider), the signature, the lineage, and that the bundle is newer than ``installed``."""
    authorization_id = verify_code_signing_certificate(bundle.certificate, root, at)
    if authorization_id != installed.authorization_id:
        raise CertificateError(
            f"the bundle is signed by provider {authorization_id}'s code-signing key, but this "
            f"meter was authorized by provider {installed.authorization_id}"
        )
    try:
        VerifyingKey(bundle.certificate.public_key()).verify(
            Algorithm.ECDSA_P256, bundle.contents.signed_part(), bundle.signature
        )
    except InvalidSignature as exc:
        raise ProtocolError(
            "the bundle's signature does not verify under its code-signing certificate: it "
            "was altered after signing, or signed by another key"
        ) from exc
    contents = bundle.contents
    if contents.vendor_model != installed.vendor_model:
        raise ProtocolError(
            f"the bundle is software for {contents.vendor_model} meters, this one is a "
            f"{installed.vendor_model}"
        )
    if parse_version(contents.version) <= parse_version(installed.version):
        raise ProtocolError(
            f"version {contents.version} is not newer than the installed {installed.version}: "
            "a downgrade or a replay is refused"
        )
    if contents.software_id <= installed.software_id:
        raise ProtocolError(
            f"software id {contents.software_id} is not above the installed "
            f"{installed.software_id}: each release has its own, higher id"
        )


def _no_float(text: str) -> Any:
    raise InvalidInput(f"the number {text} has a fraction: an update bundle holds none")


def _members(data: Any, wanted: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    unknown, missing = set(data) - wanted, wanted - set(data)
    if unknown or missing:
        raise InvalidInput(
            f"{where}: unknown members {sorted(unknown)}, missing members {sorted(missing)}"
        )


def _contents(body: Any, source: str) -> BundleContents:
    where = f"{source}: body"
    _members(body, _BODY, where)
    if body["format"] != BUNDLE_FORMAT:
        raise InvalidInput(f"{where}: 'format' must be {BUNDLE_FORMAT!r}")
    try:
        issued_at = datetime.fromisoformat(body["issued_at"])
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: 'issued_at' is not an ISO-8601 time") from None
    revocations = body["revocations"]
    if not isinstance(revocations, list) or not all(
        isinstance(e, dict) and set(e) == {"device_serial", "revoked_at"} for e in revocations
    ):
        raise InvalidInput(f"{where}: 'revocations' must be a list of device_serial, revoked_at")
    try:
        return BundleContents(
            software_id=body["software_id"],
            vendor_model=body["vendor_model"],
            version=body["version"],
            issued_at=issued_at,
            rates=RateTable.from_json(body["rates"], f"{where}.rates"),
            watchdog=WatchdogThresholds.from_json(body["watchdog"], f"{where}.watchdog"),
            revocations=tuple((e["device_serial"], e["revoked_at"]) for e in revocations),
        )
    except InvalidInput as exc:
        message = str(exc)
        raise InvalidInput(message if message.startswith(where) else f"{where}: {message}") from exc
