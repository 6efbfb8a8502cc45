"""The reload protocol's messages: one table of fields per message, one strict codec.

Every message is ``MAGIC || type || fields``; each field is a 4-byte big-endian
length and its bytes, and a message has exactly its type's fields, each of its
declared length (or any length up to `MAX_FIELD` for the variable ones). Nothing
else is accepted: no trailing bytes, no unknown type. The transcript hashes the
exact bytes sent, so the encoding needs no canonical form beyond being strict.
docs/reload-protocol.md lists every field and why it is there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from meter.errors import ProtocolError

__all__ = [
    "MAGIC",
    "MAX_FIELD",
    "MAX_MESSAGE",
    "Accept",
    "Finish",
    "Grant",
    "Hello",
    "Kind",
    "Record",
    "Settle",
    "Statement",
    "StatementKind",
    "decode_answers",
    "decode_receipt",
    "encode_answers",
    "encode_receipt",
]

MAGIC = b"MRL1"  # meter reload, version 1
MAX_FIELD = 8192  # a certificate is ~600 bytes
MAX_MESSAGE = 64 * 1024
MAX_OPEN = 64  # open transactions settled in one message
_LEN = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Kind(IntEnum):
    HELLO = 1  # meter -> provider, plaintext
    ACCEPT = 2  # provider -> meter, plaintext, signed by the provider
    FINISH = 3  # meter -> provider, plaintext, signed by the meter
    RECORD = 16  # either way: AES-256-GCM around one of the kinds below
    SETTLE = 33  # provider -> meter: the meter's open transactions
    ANSWERS = 34  # meter -> provider: a signed statement for each
    GRANT = 35  # provider -> meter: the credit, PREPARED at the provider
    RECEIPT = 36  # meter -> provider: the signed receipt of the applied credit


_NAMES = {k: k.name.lower() for k in Kind}


def _pack(kind: Kind, fields: list[bytes]) -> bytes:
    out = [MAGIC, bytes([kind])]
    for value in fields:
        out.append(_LEN.pack(len(value)))
        out.append(value)
    return b"".join(out)


def _unpack(data: bytes, kind: Kind, lengths: list[int | None]) -> list[bytes]:
    """The fields of a ``kind`` message; None in ``lengths`` is a variable-length field."""
    name = _NAMES[kind]
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"reload {name} message is {len(data)} bytes, over {MAX_MESSAGE}")
    if len(data) < 5 or data[:4] != MAGIC:
        raise ProtocolError(f"not a reload protocol message (expected a version-1 {name})")
    if data[4] != kind:
        got = _NAMES.get(Kind(data[4]), "?") if data[4] in _NAMES else f"type {data[4]}"
        raise ProtocolError(f"expected a reload {name} message, got {got} (out of order?)")
    fields, offset = [], 5
    for number, expected in enumerate(lengths, 1):
        if offset + 4 > len(data):
            raise ProtocolError(f"reload {name} message is truncated (field {number})")
        (length,) = _LEN.unpack_from(data, offset)
        offset += 4
        limit = MAX_FIELD if expected is None else expected
        if (expected is not None and length != expected) or length > limit:
            raise ProtocolError(
                f"reload {name} message: field {number} has {length} bytes"
                + (f", expected {expected}" if expected is not None else f", over {limit}")
            )
        if offset + length > len(data):
            raise ProtocolError(f"reload {name} message is truncated (field {number})")
        fields.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ProtocolError(f"reload {name} message has {len(data) - offset} trailing bytes")
    return fields


def _u64(value: int) -> bytes:
    return _U64.pack(value)


def _int(raw: bytes) -> int:
    return int(_U64.unpack(raw)[0])


POINT = 65
NONCE = 32
SESSION_ID = 16
TXID = 16
SIGNATURE = 64


@dataclass(frozen=True)
class Hello:
    """Meter -> provider: who it is, what it asks for, its ephemeral key and nonce."""

    device_serial: int
    amount: int  # mills asked for
    reload_certificate: bytes  # DER, issued by the provider to the meter's reload key
    ephemeral: bytes  # the meter's ephemeral P-256 point, made in its token
    nonce: bytes  # 32 random bytes from the meter's token

    def to_bytes(self) -> bytes:
        fields = [_u64(self.device_serial), _u64(self.amount), self.reload_certificate]
        return _pack(Kind.HELLO, [*fields, self.ephemeral, self.nonce])

    @classmethod
    def from_bytes(cls, data: bytes) -> Hello:
        serial, amount, cert, point, nonce = _unpack(data, Kind.HELLO, [8, 8, None, POINT, NONCE])
        return cls(_int(serial), _int(amount), cert, point, nonce)


@dataclass(frozen=True)
class Accept:
    """Provider -> meter: the session id, the provider's chain and fresh status, its
    ephemeral key and nonce, and its signature over the hello and all of this."""

    session_id: bytes
    provider_certificate: bytes  # DER, issued by the postal root
    provider_status: bytes  # the postal root's signed, dated "this certificate is good"
    ephemeral: bytes
    nonce: bytes
    signature: bytes = b""

    def _fields(self) -> list[bytes]:
        return [
            self.session_id,
            self.provider_certificate,
            self.provider_status,
            self.ephemeral,
            self.nonce,
        ]

    def unsigned_part(self) -> bytes:
        return _pack(Kind.ACCEPT, [*self._fields(), b""])

    def to_bytes(self) -> bytes:
        if len(self.signature) != SIGNATURE:
            raise ProtocolError("reload accept message is not signed")
        return _pack(Kind.ACCEPT, [*self._fields(), self.signature])

    @classmethod
    def from_bytes(cls, data: bytes) -> Accept:
        lengths = [SESSION_ID, None, None, POINT, NONCE, SIGNATURE]
        return cls(*_unpack(data, Kind.ACCEPT, lengths))


@dataclass(frozen=True)
class Finish:
    """Meter -> provider: the meter's signature over the transcript so far."""

    session_id: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return _pack(Kind.FINISH, [self.session_id, self.signature])

    @classmethod
    def from_bytes(cls, data: bytes) -> Finish:
        return cls(*_unpack(data, Kind.FINISH, [SESSION_ID, SIGNATURE]))


@dataclass(frozen=True)
class Record:
    """One encrypted channel message: its header is the AEAD's associated data."""

    session_id: bytes
    kind: Kind  # of the plaintext inside
    counter: int
    ciphertext: bytes

    def header(self) -> bytes:
        return _pack(Kind.RECORD, [self.session_id, bytes([self.kind]), _u64(self.counter)])

    def to_bytes(self) -> bytes:
        fields = [self.session_id, bytes([self.kind]), _u64(self.counter), self.ciphertext]
        return _pack(Kind.RECORD, fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        session, kind, counter, ciphertext = _unpack(data, Kind.RECORD, [SESSION_ID, 1, 8, None])
        if kind[0] not in (Kind.SETTLE, Kind.ANSWERS, Kind.GRANT, Kind.RECEIPT):
            raise ProtocolError(f"reload record carries an unknown message type {kind[0]}")
        return cls(session, Kind(kind[0]), _int(counter), ciphertext)


@dataclass(frozen=True)
class Settle:
    """Provider -> meter: every transaction of this meter still open at the provider."""

    open_transactions: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        if len(self.open_transactions) > MAX_OPEN:
            raise ProtocolError(f"more than {MAX_OPEN} open transactions in one settle message")
        return _pack(Kind.SETTLE, [b"".join(self.open_transactions)])

    @classmethod
    def from_bytes(cls, data: bytes) -> Settle:
        (joined,) = _unpack(data, Kind.SETTLE, [None])
        if len(joined) % TXID or len(joined) // TXID > MAX_OPEN:
            raise ProtocolError("reload settle message: the transaction list is malformed")
        ids = tuple(joined[i : i + TXID] for i in range(0, len(joined), TXID))
        if len(set(ids)) != len(ids):
            raise ProtocolError("reload settle message names a transaction twice")
        return cls(ids)


class StatementKind(IntEnum):
    APPLIED = 1  # the receipt: the meter applied the transaction
    NOT_APPLIED = 2  # the meter did not apply it, and no longer can


_STATEMENT = struct.Struct(">4sBQ16sQ16s")  # magic, kind, serial, txid, control total, session
STATEMENT_LENGTH = _STATEMENT.size + SIGNATURE


@dataclass(frozen=True)
class Statement:
    """What the meter signs (its reload key, in its token) about one transaction.

    APPLIED: the receipt, with the control total once the credit was in (``session_id``
    all zero: it stays true, and the meter can answer it again at any later contact).
    NOT_APPLIED: bound to the session that asked, whose begin made the grant unappliable.
    """

    kind: StatementKind
    device_serial: int
    transaction_id: bytes
    control_total: int
    session_id: bytes
    signature: bytes = b""

    def signed_part(self) -> bytes:
        return _STATEMENT.pack(
            b"MRS1",
            self.kind,
            self.device_serial,
            self.transaction_id,
            self.control_total,
            self.session_id,
        )

    def to_bytes(self) -> bytes:
        if len(self.signature) != SIGNATURE:
            raise ProtocolError("reload statement is not signed")
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> Statement:
        if len(data) != STATEMENT_LENGTH:
            raise ProtocolError(
                f"reload statement has {len(data)} bytes, expected {STATEMENT_LENGTH}"
            )
        magic, kind, serial, txid, total, session = _STATEMENT.unpack(data[: _STATEMENT.size])
        if magic != b"MRS1" or kind not in (1, 2):
            raise ProtocolError("not a version-1 reload statement")
        return cls(StatementKind(kind), serial, txid, total, session, data[_STATEMENT.size :])


def encode_answers(answers: list[Statement]) -> bytes:
    return _pack(Kind.ANSWERS, [b"".join(s.to_bytes() for s in answers)])


def decode_answers(data: bytes) -> list[Statement]:
    (joined,) = _unpack(data, Kind.ANSWERS, [None])
    if len(joined) % STATEMENT_LENGTH or len(joined) // STATEMENT_LENGTH > MAX_OPEN:
        raise ProtocolError("reload answers message: the statement list is malformed")
    return [
        Statement.from_bytes(joined[i : i + STATEMENT_LENGTH])
        for i in range(0, len(joined), STATEMENT_LENGTH)
    ]


@dataclass(frozen=True)
class Grant:
    """Provider -> meter, inside the channel: the credit the provider PREPARED."""

    transaction_id: bytes
    device_serial: int
    amount: int
    nonce: bytes  # the meter's hello nonce: the grant answers that session only

    def to_bytes(self) -> bytes:
        fields = [self.transaction_id, _u64(self.device_serial), _u64(self.amount), self.nonce]
        return _pack(Kind.GRANT, fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> Grant:
        txid, serial, amount, nonce = _unpack(data, Kind.GRANT, [TXID, 8, 8, NONCE])
        return cls(txid, _int(serial), _int(amount), nonce)


def encode_receipt(receipt: Statement) -> bytes:
    return _pack(Kind.RECEIPT, [receipt.to_bytes()])


def decode_receipt(data: bytes) -> Statement:
    (raw,) = _unpack(data, Kind.RECEIPT, [STATEMENT_LENGTH])
    return Statement.from_bytes(raw)
