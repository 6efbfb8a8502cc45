"""A ceremony's transcript: what was done, by whom, when, on which device, with which keys
and shares (by fingerprint, never by words), and how it ended; and its offline check.

The host builds the body step by step; the device adds the time it recorded it, signs it
with its audit key (domain ``meter.ceremony.transcript.v1``, canonical JSON) and appends it
to its audit log, the way the DNSSEC root key ceremonies publish signed scripts.
`verify_transcript` checks a transcript file against the audit key's public half (from
Export Audit Key) without a device.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meter.custody.shares import CustodyShare, Policy
from meter.durable import write_atomically
from meter.errors import CustodyError

if TYPE_CHECKING:
    from meter.custody.ceremony import Place
    from meter.host import DeviceClient

__all__ = ["TRANSCRIPT_FORMAT", "Transcript", "unsigned", "verify_transcript", "write_json"]

TRANSCRIPT_FORMAT = "meter-ceremony-transcript/1"
_DOMAIN = b"meter.ceremony.transcript.v1\x00"  # as the device signs it (services_custody)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class Transcript:
    ceremony: str
    purpose: str
    policy: dict[str, Any] | None
    started_at: str
    host: str
    device: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    shares: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)
    outcome: str = "incomplete"  # "completed" or "failed"
    reason: str | None = None  # why it failed

    @classmethod
    def begin(
        cls, ceremony: str, purpose: str, policy: Policy | None, client: DeviceClient
    ) -> Transcript:
        described = None
        if policy is not None:
            described = {
                "rule": policy.describe(),
                "group_threshold": policy.group_threshold,
                "groups": [
                    {"name": g.name, "threshold": g.threshold, "count": g.count}
                    for g in policy.groups
                ],
            }
        return cls(
            ceremony, purpose, described, _now(), socket.gethostname(), str(client.socket_path)
        )

    def step(self, step: str, user_id: str, role: str) -> None:
        self.steps.append({"step": step, "user": user_id, "role": role, "at": _now()})

    def step_failed(self, step: str, error: str) -> None:
        self.steps.append({"step": step, "failed": error, "at": _now()})

    def exported(self, bundle: dict[str, Any], check: bytes) -> None:
        self.keys = {
            "kcvs": {k["label"]: k["kcv"] for k in bundle.get("keys", [])},
            "bundle_sha256": hashlib.sha256(canonical(bundle)).hexdigest(),
            "device_serial": bundle.get("device", {}).get("device_serial"),
            "share_check_value": check.hex(),
        }

    def imported(
        self, result: dict[str, Any], used: tuple[str, ...], spare: tuple[str, ...]
    ) -> None:
        self.keys = {
            "kcvs": result.get("kcvs_verified"),
            "device_serial": result.get("device_serial"),
            "registers": result.get("registers"),
            "pairwise": result.get("pairwise"),
            "shares_used": list(used),
            "shares_spare": list(spare),
        }

    def failed(self, reason: str) -> None:
        self.outcome, self.reason = "failed", reason

    # ``serial``: the card's, for a share on a card (which card got or gave it).
    def share_stored(self, share: CustodyShare, place: Place, serial: str | None = None) -> None:
        self.shares.append(self._share(share, place, serial) | {"stored_at": _now()})

    def share_presented(self, share: CustodyShare, place: Place, serial: str | None = None) -> None:
        self.shares.append(self._share(share, place, serial) | {"presented_at": _now()})

    def share_refused(self, place: Place, reason: str, serial: str | None = None) -> None:
        self.refused.append(
            {
                "custodian": place.custodian,
                "place": place.kind,
                "where": place.where,
                **({"card_serial": serial} if serial else {}),
                "reason": reason,
                "at": _now(),
            }
        )

    @staticmethod
    def _share(share: CustodyShare, place: Place, serial: str | None) -> dict[str, Any]:
        return {
            "custodian": place.custodian,
            "group": share.group,
            "member": share.member,
            "members": share.members,
            "fingerprint": share.fingerprint,
            "place": place.kind,
            "where": place.where,
            **({"card_serial": serial} if serial else {}),
        }

    def body(self) -> dict[str, Any]:
        return {
            "ceremony": self.ceremony,
            "purpose": self.purpose,
            "policy": self.policy,
            "started_at": self.started_at,
            "host": self.host,
            "device_socket": self.device,
            "steps": self.steps,
            "shares": self.shares,
            "refused": self.refused,
            "keys": self.keys,
            "outcome": self.outcome,
            **({"reason": self.reason} if self.reason is not None else {}),
            "ended_at": _now(),
        }


def unsigned(body: dict[str, Any], why: str) -> dict[str, Any]:
    """A transcript the device could not sign (no audit key yet, withdrawn, unreachable):
    written all the same, and marked so that nobody takes it for a signed one."""
    return {"format": TRANSCRIPT_FORMAT, "transcript": body, "signature": None, "unsigned": why}


def write_json(path: Path, data: object) -> None:
    """A ceremony file, whole and durable (mode 0600); a rerun replaces its own."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")


def verify_transcript(document: object, public_key_pem: bytes) -> dict[str, Any]:
    """The transcript's body if the audit key signed it; CustodyError naming what is wrong."""
    if not isinstance(document, dict) or document.get("format") != TRANSCRIPT_FORMAT:
        raise CustodyError(f"not a ceremony transcript (format {TRANSCRIPT_FORMAT} expected)")
    body, signature = document.get("transcript"), document.get("signature")
    if signature is None and document.get("unsigned"):
        raise CustodyError(f"the transcript is not signed: {document['unsigned']}")
    try:
        public = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise CustodyError(f"the audit key is not a PEM public key: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(signature, dict):
        raise CustodyError("the transcript has no body or no signature")
    try:
        value = bytes.fromhex(str(signature.get("value")))
    except ValueError as exc:
        raise CustodyError("the transcript's signature is not hex") from exc
    message = _DOMAIN + canonical(body)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey) and len(value) == 64:
            r, s = int.from_bytes(value[:32]), int.from_bytes(value[32:])
            public.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public.verify(value, message, pss, hashes.SHA256())
        else:
            raise InvalidSignature
    except InvalidSignature as exc:
        raise CustodyError(
            "the transcript's signature does not verify under this audit key: altered, or "
            "signed by another device"
        ) from exc
    return body
