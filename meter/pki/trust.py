"""Which meter certificates reach the postal root (spec: "Certificates").

Every chain check happens once, when the store is built; verification then
looks a key id up in a dict and reads precomputed keys and validity bounds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from meter.errors import CertificateError
from meter.indicium import VerifyingKey
from meter.indicium import key_id as key_id_of

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class MeterCredential:
    """A meter certificate whose chain reaches the root, with its provider."""

    meter: x509.Certificate
    provider: x509.Certificate
    root: x509.Certificate
    device_serial: int
    authorization_id: int
    key_id: bytes
    # Derived once here so that verifying an indicium parses nothing.
    verifying_key: VerifyingKey = field(init=False, repr=False, compare=False)
    valid_from: datetime = field(init=False, repr=False, compare=False)
    valid_until: datetime = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chain = (self.meter, self.provider, self.root)
        object.__setattr__(self, "verifying_key", VerifyingKey(self.meter.public_key()))
        object.__setattr__(self, "valid_from", max(c.not_valid_before_utc for c in chain))
        object.__setattr__(self, "valid_until", min(c.not_valid_after_utc for c in chain))

    def valid_at(self, instant: datetime) -> bool:
        """All three certificates are valid at the instant (bounds inclusive)."""
        return self.valid_from <= instant <= self.valid_until


class TrustStore:
    """The postal root and the meter credentials whose chains reach it."""

    def __init__(self, root: x509.Certificate, certificates: Iterable[x509.Certificate]) -> None:
        _check_root(root)
        self._root = root
        known = list(dict.fromkeys(c for c in certificates if c != root))  # de-duplicated
        ca = {c: _is_ca(c) for c in known}
        providers: dict[x509.Name, list[x509.Certificate]] = {}
        for c in known:
            if ca[c] is True and _issued_by(c, root):
                providers.setdefault(c.subject, []).append(c)
        by_key: dict[bytes, list[MeterCredential]] = {}
        for meter in (c for c in known if ca[c] is False):
            # Names alone prove nothing: the chain goes through the first
            # provider that carries the issuer name and verifies the signature.
            same_name = providers.get(meter.issuer, [])
            provider = next((p for p in same_name if _issued_by(meter, p)), None)
            if provider is None:
                continue
            credential = MeterCredential(
                meter=meter,
                provider=provider,
                root=root,
                device_serial=_subject_serial(meter),
                authorization_id=_subject_serial(provider),
                key_id=key_id_of(meter.public_key()),
            )
            by_key.setdefault(credential.key_id, []).append(credential)
        self._by_key = {k: tuple(v) for k, v in by_key.items()}

    @classmethod
    def from_pem(cls, root_pem: bytes, certs_pem: bytes) -> TrustStore:
        """Root PEM (one certificate) and any number of provider and meter certificates."""
        roots = _load_pem(root_pem, "postal root PEM")
        if len(roots) != 1:
            raise CertificateError(f"postal root PEM holds {len(roots)} certificates, not 1")
        return cls(roots[0], _load_pem(certs_pem, "certificates PEM"))

    @classmethod
    def from_files(cls, root_path: Path, certs_path: Path | Sequence[Path]) -> TrustStore:
        paths = [certs_path] if isinstance(certs_path, Path) else list(certs_path)
        roots = _load_pem(_read(root_path), str(root_path))
        if len(roots) != 1:
            raise CertificateError(f"{root_path} holds {len(roots)} certificates, not 1")
        certificates = [c for p in paths for c in _load_pem(_read(p), str(p))]
        return cls(roots[0], certificates)

    @property
    def root(self) -> x509.Certificate:
        return self._root

    @property
    def credentials(self) -> tuple[MeterCredential, ...]:
        """Every meter credential that reaches the root, in load order per key id."""
        return tuple(c for group in self._by_key.values() for c in group)

    def candidates(self, key_id: bytes) -> Sequence[MeterCredential]:
        """Credentials for the key id; the spec judges an indicium by the first."""
        return self._by_key.get(key_id, ())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate file {path}: {exc.strerror}") from exc


def _load_pem(data: bytes, source: str) -> list[x509.Certificate]:
    certificates = []
    for number, match in enumerate(_PEM_BLOCK.finditer(data), start=1):
        kind = match.group(1).decode("ascii")
        if kind != "CERTIFICATE":
            raise CertificateError(f"{source}: PEM block {number} is a {kind}, not a CERTIFICATE")
        try:
            certificates.append(x509.load_pem_x509_certificate(match.group(0)))
        except ValueError as exc:
            raise CertificateError(f"{source}: certificate {number} is unreadable: {exc}") from exc
    if not certificates and data.strip():
        raise CertificateError(f"{source}: no PEM certificate in it")
    return certificates


def _check_root(root: x509.Certificate) -> None:
    name = root.subject.rfc4514_string()
    if _is_ca(root) is not True:
        raise CertificateError(f"postal root {name!r} lacks basic constraints ca=True")
    if not _issued_by(root, root):
        raise CertificateError(f"postal root {name!r} is not self-signed")


def _is_ca(certificate: x509.Certificate) -> bool | None:
    """The basic-constraints ca flag; None when the extension is absent."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        name = certificate.subject.rfc4514_string()
        raise CertificateError(f"certificate {name!r} has unreadable extensions: {exc}") from exc
    return extension.value.ca


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Issuer name equals the issuer's subject and the signature verifies under its key."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _subject_serial(certificate: x509.Certificate) -> int:
    """The subject's serialNumber attribute as an integer (device serial or authorization id)."""
    values = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    if (
        len(values) == 1
        and isinstance(values[0], str)
        and values[0].isascii()
        and values[0].isdigit()
    ):
        return int(values[0])
    name = certificate.subject.rfc4514_string()
    raise CertificateError(
        f"certificate {name!r} reaches the postal root but its subject serialNumber "
        f"{values!r} is not one decimal number"
    )
