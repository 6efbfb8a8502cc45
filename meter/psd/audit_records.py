"""The audit log's records and seals: canonical JSON, the hash chain's digest, the seal's
signed message, and the audit key's algorithm and id.

meter.psd.audit (the log, its files and exports) documents the record format; this
module is the part that anyone checking a record or a seal needs, the device and an
offline verifier alike (meter.psd.audit_verify).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meter.errors import InvalidInput
from meter.token.profile import KeyAlgorithm

__all__ = [
    "EXPORT_FORMAT",
    "SEAL_SERVICE",
    "AuditPublicKey",
    "AuditRecord",
    "audit_key_algorithm",
    "audit_key_id",
    "seal_message",
    "verify_seal_signature",
]

EXPORT_FORMAT = "meter-audit-export-v1"
SEAL_SERVICE = "audit-seal"
_RECORD_DOMAIN = b"meter-audit-v1"
_SEAL_DOMAIN = b"meter-audit-seal-v1"
_GENESIS = bytes(32)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_RECORD_KEYS = frozenset(
    {"index", "at", "user_id", "role", "service", "outcome", "values", "kind", "prev", "digest"}
)
_SEAL_KEYS = frozenset({"through", "head", "key_id", "signature"})


def _canonical(value: object) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN and Infinity, which canonical JSON cannot write back."""
    return json.loads(text, parse_constant=_reject_constant)


def _format_time(at: datetime) -> str:
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidInput(f"audit time {at.isoformat()} has no time zone; pass an aware datetime")
    return at.astimezone(UTC).strftime(_TIME_FORMAT)


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)


def _json_values(values: Mapping[str, object]) -> dict[str, object]:
    """The values as they read back from JSON; refuses what would not round-trip."""
    if any(not isinstance(k, str) for k in values):
        raise InvalidInput("audit values must have str keys")
    try:
        text = _canonical(dict(values))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"audit values must be plain JSON (no NaN): {exc}") from exc
    loaded: dict[str, object] = _loads(text)
    if _canonical(loaded) != text:
        raise InvalidInput("audit values must be plain JSON with str keys")
    return loaded


def seal_message(head: bytes, through: int, at_text: str) -> bytes:
    """What a seal's signature covers: the head digest, its index and the seal's time."""
    return _SEAL_DOMAIN + head + through.to_bytes(8, "big") + at_text.encode("ascii")


# Signature length by audit key algorithm.
_SIGNATURE_BYTES = {KeyAlgorithm.ECDSA_P256: 64, KeyAlgorithm.RSA_PSS_2048: 256}
AuditPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def audit_key_algorithm(public_key: PublicKeyTypes) -> KeyAlgorithm:
    """The algorithm of an audit key: ECDSA P-256 or RSA-PSS-2048; InvalidInput otherwise."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return KeyAlgorithm.ECDSA_P256
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 2048:
        return KeyAlgorithm.RSA_PSS_2048
    raise InvalidInput("the audit key is neither an ECDSA P-256 nor an RSA-2048 public key")


def verify_seal_signature(public_key: AuditPublicKey, signature: bytes, message: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` is the audit key's over ``message``."""
    algorithm = audit_key_algorithm(public_key)
    if len(signature) != _SIGNATURE_BYTES[algorithm]:
        raise InvalidSignature
    if isinstance(public_key, rsa.RSAPublicKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public_key.verify(signature, message, pss, hashes.SHA256())
        return
    r, s = int.from_bytes(signature[:32]), int.from_bytes(signature[32:])
    public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))


def audit_key_id(public_key: PublicKeyTypes) -> bytes:
    """First 8 bytes of SHA-256 over the key's SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:8]


@dataclass(frozen=True)
class AuditRecord:
    """One audit record; ``digest`` chains it to ``prev`` (see the module docstring)."""

    index: int
    at: datetime
    user_id: str | None
    role: str
    service: str
    outcome: str
    values: Mapping[str, object]
    prev: bytes
    digest: bytes
    kind: str = "event"

    @property
    def at_text(self) -> str:
        return self.at.strftime(_TIME_FORMAT)

    def computed_digest(self) -> bytes:
        body = {
            "at": self.at_text,
            "index": self.index,
            "kind": self.kind,
            "outcome": self.outcome,
            "role": self.role,
            "service": self.service,
            "user_id": self.user_id,
            "values": self.values,
        }
        return hashlib.sha256(_RECORD_DOMAIN + self.prev + _canonical(body).encode()).digest()

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "at": self.at_text,
            "user_id": self.user_id,
            "role": self.role,
            "service": self.service,
            "outcome": self.outcome,
            "values": dict(self.values),
            "kind": self.kind,
            "prev": self.prev.hex(),
            "digest": self.digest.hex(),
        }

    @classmethod
    def from_json(cls, obj: object) -> AuditRecord:
        """Parse one record object; ValueError says which field is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if set(obj) != _RECORD_KEYS:
            raise ValueError(f"fields {sorted(obj)} are not {sorted(_RECORD_KEYS)}")
        index, user_id, values = obj["index"], obj["user_id"], obj["values"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 1:
            raise ValueError("index is not a positive integer")
        if user_id is not None and not isinstance(user_id, str):
            raise ValueError("user_id is neither a string nor null")
        for name in ("at", "role", "service", "outcome", "kind", "prev", "digest"):
            if not isinstance(obj[name], str):
                raise ValueError(f"{name} is not a string")
        if obj["kind"] not in ("event", "seal"):
            raise ValueError(f"kind '{obj['kind']}' is neither 'event' nor 'seal'")
        if not isinstance(values, dict):
            raise ValueError("values is not a JSON object")
        prev, digest = bytes.fromhex(obj["prev"]), bytes.fromhex(obj["digest"])
        if len(prev) != 32 or len(digest) != 32:
            raise ValueError("prev or digest is not 32 bytes of hex")
        return cls(
            index=index,
            at=_parse_time(obj["at"]),
            user_id=user_id,
            role=obj["role"],
            service=obj["service"],
            outcome=obj["outcome"],
            values=values,
            prev=prev,
            digest=digest,
            kind=obj["kind"],
        )


def _parse_anchor(obj: object) -> tuple[int, bytes]:
    if not isinstance(obj, dict) or set(obj) != {"index", "digest"}:
        raise ValueError("an anchor is {index, digest}")
    index, digest = obj["index"], bytes.fromhex(str(obj["digest"]))
    if not isinstance(index, int) or isinstance(index, bool) or index < 1 or len(digest) != 32:
        raise ValueError("anchor index or digest out of range")
    return index, digest
