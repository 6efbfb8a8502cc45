"""Offline verification of exported audit logs: the hash chain, the seals and their
signatures under the audit key alone, file by file, oldest archive first. The log
itself, and how it is exported, are in audit.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meter.errors import InvalidInput
from meter.psd.audit_records import (
    _GENESIS,
    _SEAL_KEYS,
    EXPORT_FORMAT,
    SEAL_SERVICE,
    AuditPublicKey,
    AuditRecord,
    _loads,
    _parse_anchor,
    audit_key_algorithm,
    audit_key_id,
    seal_message,
    verify_seal_signature,
)

__all__ = ["VerifyReport", "verify_export"]


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on exported files; ``first_bad`` is the first record that fails, if any."""

    ok: bool
    records: int
    first_bad: int | None
    reason: str
    signed_through: int


class _Broken(Exception):
    def __init__(self, index: int | None, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def verify_export(paths: Sequence[Path], public_key_pem: bytes) -> VerifyReport:
    """Check exported or archive files, in order, with the public audit key alone.

    InvalidInput for a missing file or a key that is neither ECDSA P-256 nor RSA-2048;
    everything else that is wrong with the files is a report with ok=False.
    """
    if not paths:
        raise InvalidInput("name at least one audit export or archive file")
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"the audit key is not a PEM public key: {exc}") from exc
    audit_key_algorithm(key)  # InvalidInput for any other kind of key
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    documents = [_read_document(Path(p)) for p in paths]
    checker = _Checker(key)
    try:
        for number, document in enumerate(documents, 1):
            checker.check_file(number, document)
        return checker.verdict()
    except _Broken as broken:
        return VerifyReport(False, checker.count, broken.index, broken.reason, checker.signed)


def _read_document(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such audit export file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read: {exc}") from exc
    try:
        return _loads(text)
    except ValueError as exc:
        return exc  # reported as a broken file, in order, by the checker


class _Checker:
    """Walks the chain across files; raises _Broken at the first fault."""

    def __init__(self, key: AuditPublicKey) -> None:
        self.key = key
        self.key_id = audit_key_id(key)
        self.known: dict[int, bytes] = {}  # digests checked so far, by index
        self.start = 0  # the first file's anchor
        self.count = 0
        self.highest = 0
        self.signed = 0

    def check_file(self, number: int, document: object) -> None:
        anchor_index, anchor_digest, items = _parse_file(number, document)
        if number == 1:
            self.start, self.known[anchor_index] = anchor_index, anchor_digest
        elif self.known.get(anchor_index) != anchor_digest:
            previous = number - 1
            if anchor_index > self.highest:
                raise _Broken(
                    self.highest + 1,
                    f"file {number} does not continue file {previous}: file {previous} ends at "
                    f"record {self.highest}, file {number} starts after record {anchor_index}",
                )
            raise _Broken(
                anchor_index or None,
                f"file {number} does not continue file {previous}: its anchor (record "
                f"{anchor_index}) is not the record {anchor_index} the earlier files hold",
            )
        prev_index, prev_digest = anchor_index, anchor_digest
        for position, item in enumerate(items):
            expected = prev_index + 1
            try:
                record = AuditRecord.from_json(item)
            except (ValueError, TypeError) as exc:
                raise _Broken(
                    expected,
                    f"record {expected} (entry {position + 1} of file {number}) is "
                    f"malformed: {exc}",
                ) from exc
            if record.index != expected:
                raise _Broken(*_order_fault(record.index, expected, items[position + 1 :]))
            if record.computed_digest() != record.digest:
                raise _Broken(expected, f"record {expected} was altered")
            if record.prev != prev_digest:
                if position == 0:
                    raise _Broken(
                        expected,
                        f"record {expected} does not chain to the anchor of file {number}",
                    )
                raise _Broken(
                    prev_index,
                    f"record {prev_index} was altered (record {expected} no longer chains to it)",
                )
            if self.known.setdefault(expected, record.digest) != record.digest:
                raise _Broken(expected, f"record {expected} differs between the files")
            if expected > self.highest:
                self.highest, self.count = expected, self.count + 1
            if record.kind == "seal":
                self._check_seal(record)
            prev_index, prev_digest = expected, record.digest

    def verdict(self) -> VerifyReport:
        if self.highest <= self.start:
            raise _Broken(None, "the files hold no audit records")
        if self.signed < self.highest:
            first = max(self.signed, self.start) + 1
            raise _Broken(
                first,
                f"records {first} to {self.highest} are not covered by a seal (unsigned)",
            )
        reason = "every record chains to the one before it and is covered by a valid seal"
        if self.start:
            reason += (
                f"; records 1 to {self.start} are not in these files and were not checked "
                f"(record {self.start + 1} chains from the anchor, record {self.start}, and "
                "the seals sign that chain)"
            )
        return VerifyReport(True, self.count, None, reason, self.signed)

    def _check_seal(self, record: AuditRecord) -> None:
        index, values = record.index, record.values
        try:
            if set(values) != _SEAL_KEYS:
                raise ValueError(f"values {sorted(values)} are not {sorted(_SEAL_KEYS)}")
            key_id, signature = _hex(values["key_id"]), _hex(values["signature"])
        except ValueError as exc:
            raise _Broken(index, f"seal at record {index} is malformed: {exc}") from exc
        fixed = (record.user_id, record.role, record.service, record.outcome)
        if fixed != (None, "no-role", SEAL_SERVICE, "ok"):
            raise _Broken(index, f"seal at record {index} is malformed: {fixed} are not a seal's")
        through = values["through"]
        if (
            not isinstance(through, int)
            or through != index - 1
            or values["head"] != record.prev.hex()
        ):
            raise _Broken(index, f"seal at record {index} does not seal the record before it")
        message = seal_message(record.prev, index - 1, record.at_text)
        try:
            verify_seal_signature(self.key, signature, message)
        except InvalidSignature:
            which = "" if key_id == self.key_id else f" (it names audit key {key_id.hex()}"
            which += f", not the given key {self.key_id.hex()})" if which else ""
            raise _Broken(index, f"seal at record {index} has a bad signature{which}") from None
        if key_id != self.key_id:
            raise _Broken(index, f"seal at record {index} was altered (its key id)")
        self.signed = max(self.signed, index)


def _parse_file(number: int, document: object) -> tuple[int, bytes, list[object]]:
    """The anchor (index 0 and zeros when none) and the record list of one file."""
    if isinstance(document, ValueError):
        raise _Broken(None, f"file {number} is not JSON: {document}")
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise _Broken(None, f"file {number} is not a {EXPORT_FORMAT} file")
    records = document.get("records")
    if not isinstance(records, list):
        raise _Broken(None, f"file {number} has no list of records")
    if document.get("anchor") is None:
        return 0, _GENESIS, records
    try:
        index, digest = _parse_anchor(document["anchor"])
    except ValueError as exc:
        raise _Broken(None, f"file {number} has a malformed anchor: {exc}") from exc
    return index, digest, records


def _hex(value: object) -> bytes:
    """Bytes from lowercase hex only, so that one value has one spelling."""
    if not isinstance(value, str) or bytes.fromhex(value).hex() != value:
        raise ValueError(f"{value!r} is not lowercase hex")
    return bytes.fromhex(value)


def _order_fault(found: int, expected: int, later: Sequence[object]) -> tuple[int, str]:
    """Why the index is not the next one: a reordering or a gap."""
    later_indices = {item.get("index") for item in later if isinstance(item, dict)}
    if found > expected and expected in later_indices:
        return expected, f"records out of order: record {found} comes before record {expected}"
    if found > expected:
        return expected, (
            f"record {expected} is missing (index jumps from {expected - 1} to {found})"
        )
    return found, f"records out of order: record {found} comes after record {expected - 1}"
