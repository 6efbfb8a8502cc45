"""The reload protocol's key schedule and its encrypted channel.

Session keys: HKDF-SHA-256 (``cryptography``) with the ECDH shared secret as input
keying material, the transcript hash (SHA-256 of hello, accept and finish as sent)
as salt, and one ``info`` per direction, so the two directions never share a key.

Records: AES-256-GCM (``cryptography``); the 12-byte nonce is a 4-byte direction
tag and the record's 8-byte counter, which starts at 0 in each direction and must
arrive exactly in order: a record replayed, dropped, reordered or from another
session is refused. The record header (session id, message type, counter) is the
associated data. A refused record closes the channel: nothing after it is read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meter.errors import ProtocolError
from meter.protocol.reload_messages import Kind, Record

__all__ = ["METER_TO_PROVIDER", "PROVIDER_TO_METER", "Channel", "session_keys", "transcript_hash"]

METER_TO_PROVIDER = b"M->P"
PROVIDER_TO_METER = b"P->M"
_INFO = b"meter reload v1 "
_MAX_COUNTER = 2**64 - 1


def transcript_hash(*messages: bytes) -> bytes:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(len(message).to_bytes(4, "big"))
        digest.update(message)
    return digest.digest()


def session_keys(shared_secret: bytes, transcript: bytes) -> dict[bytes, bytes]:
    """One 256-bit key per direction, from HKDF-SHA-256(Z, salt=transcript hash)."""
    if len(shared_secret) != 32 or len(transcript) != 32:
        raise ProtocolError("session keys need a 32-byte shared secret and transcript hash")
    keys = {}
    for direction in (METER_TO_PROVIDER, PROVIDER_TO_METER):
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=transcript, info=_INFO + direction)
        keys[direction] = hkdf.derive(shared_secret)
    return keys


@dataclass
class Channel:
    """One side's view of a session's channel: what it sends and what it expects."""

    session_id: bytes
    sending: bytes  # direction tag of what this side sends
    keys: dict[bytes, bytes] = field(repr=False)
    sent: int = 0
    received: int = 0
    closed: str | None = None

    @property
    def receiving(self) -> bytes:
        return PROVIDER_TO_METER if self.sending == METER_TO_PROVIDER else METER_TO_PROVIDER

    def seal(self, kind: Kind, plaintext: bytes) -> bytes:
        self._check_open()
        if self.sent >= _MAX_COUNTER:
            raise ProtocolError("reload channel: counter exhausted")
        record = Record(self.session_id, kind, self.sent, b"")
        nonce = self.sending + self.sent.to_bytes(8, "big")
        ciphertext = AESGCM(self.keys[self.sending]).encrypt(nonce, plaintext, record.header())
        self.sent += 1
        return Record(self.session_id, kind, record.counter, ciphertext).to_bytes()

    def open(self, data: bytes, expected: Kind) -> bytes:
        """The plaintext of the next record, which must be of kind ``expected``."""
        self._check_open()
        try:
            record = Record.from_bytes(data)
            if record.session_id != self.session_id:
                raise ProtocolError(
                    f"reload record belongs to session {record.session_id.hex()}, not this "
                    f"session {self.session_id.hex()} (an old or another session's message)"
                )
            if record.counter != self.received:
                raise ProtocolError(
                    f"reload record number {record.counter} arrived where number "
                    f"{self.received} was expected (replayed, dropped or reordered)"
                )
            if record.kind != expected:
                raise ProtocolError(
                    f"expected a reload {expected.name.lower()} record, got "
                    f"{record.kind.name.lower()} (out of order)"
                )
            nonce = self.receiving + record.counter.to_bytes(8, "big")
            try:
                plaintext = AESGCM(self.keys[self.receiving]).decrypt(
                    nonce, record.ciphertext, record.header()
                )
            except InvalidTag:
                raise ProtocolError(
                    "reload record does not authenticate: altered in transit, or not sealed "
                    "with this session's keys"
                ) from None
        except ProtocolError as exc:
            self.closed = str(exc)
            raise
        self.received += 1
        return plaintext

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ProtocolError(f"reload channel is closed after an error ({self.closed})")
