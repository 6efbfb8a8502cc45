"""PIM-1 byte layout: one field table that the encoder and the decoder both read.

The decoder reports MALFORMED exactly when the spec's list says so; the
encoder refuses, with InvalidInput, anything that would decode as MALFORMED
or does not fit its width, so a meter can never print a malformed indicium.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import Enum, IntEnum
from typing import Any, NamedTuple

from meter.errors import InvalidInput, MalformedIndicium
from meter.indicium.rates import RateCategory


class Algorithm(IntEnum):
    """The algorithm byte; it fixes the signature's length."""

    ECDSA_P256 = 1
    ED25519 = 2
    RSA_PSS_2048 = 3

    @property
    def signature_length(self) -> int:
        """Signature bytes that follow the signed part."""
        return 256 if self is Algorithm.RSA_PSS_2048 else 64


VERSION = 0x01
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
SIGNED_LENGTH = 84
FLAG_CORRECTION = 0x01
FLAG_SPECIMEN = 0x02
MAX_POSTAGE = 2**24 - 1
MAX_REGISTER = 2**40 - 1
MAX_ADVANCE_DAYS = 10
FIRST_YEAR = 2020
LAST_YEAR = 2155

_FLAGS_DEFINED = FLAG_CORRECTION | FLAG_SPECIMEN
_UPPER_AND_DIGITS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_DIGITS = b"0123456789"
# Plain dict lookups: calling an Enum class costs more on the hot path.
_RATES = {int(category): category for category in RateCategory}
_ALGORITHMS = {int(algorithm): algorithm for algorithm in Algorithm}
_TOTAL_LENGTHS = {algorithm: SIGNED_LENGTH + algorithm.signature_length for algorithm in Algorithm}
_EPOCH_SECONDS = int(EPOCH.timestamp())
_from_timestamp = datetime.fromtimestamp
_new_object = object.__new__


class _Kind(Enum):
    UINT = "unsigned big-endian integer"
    ASCII = "ASCII characters"
    RAW = "bytes"


class _Field(NamedTuple):
    name: str
    offset: int
    length: int
    kind: _Kind


# The spec's "Byte layout" table, offsets and lengths as printed there.
LAYOUT: tuple[_Field, ...] = (
    _Field("version", 0, 1, _Kind.UINT),
    _Field("algorithm", 1, 1, _Kind.UINT),
    _Field("authorization_id", 2, 4, _Kind.UINT),
    _Field("vendor_model", 6, 4, _Kind.ASCII),
    _Field("device_serial", 10, 8, _Kind.UINT),
    _Field("key_id", 18, 8, _Kind.RAW),
    _Field("sequence", 26, 4, _Kind.UINT),
    _Field("ascending", 30, 5, _Kind.UINT),
    _Field("descending", 35, 5, _Kind.UINT),
    _Field("postage", 40, 3, _Kind.UINT),
    _Field("rate_category", 43, 2, _Kind.UINT),
    _Field("date_of_mailing", 45, 4, _Kind.UINT),
    _Field("time_of_issue", 49, 4, _Kind.UINT),
    _Field("origin_zip", 53, 5, _Kind.ASCII),
    _Field("destination", 58, 11, _Kind.ASCII),
    _Field("address_digest", 69, 8, _Kind.RAW),
    _Field("software_id", 77, 2, _Kind.UINT),
    _Field("flags", 79, 1, _Kind.UINT),
    _Field("reference_sequence", 80, 4, _Kind.UINT),
)

_NATIVE_UINT = {1: "B", 2: "H", 4: "I", 8: "Q"}
# 3- and 5-byte integers have no struct code: they travel as bytes and are
# converted with int.from_bytes / int.to_bytes.
_ODD_UINT_NAMES = tuple(
    f.name for f in LAYOUT if f.kind is _Kind.UINT and f.length not in _NATIVE_UINT
)
_SIGNED = struct.Struct(
    ">"
    + "".join(
        _NATIVE_UINT[f.length]
        if f.kind is _Kind.UINT and f.length in _NATIVE_UINT
        else f"{f.length}s"
        for f in LAYOUT
    )
)
_NAMES = tuple(f.name for f in LAYOUT)

_Wire = dict[str, Any]
# The fields the MALFORMED rules read (the keyword arguments of _malformation).
_RULE_FIELDS = (
    "vendor_model",
    "origin_zip",
    "destination",
    "date_of_mailing",
    "rate_category",
    "flags",
    "sequence",
    "reference_sequence",
    "postage",
)


@dataclass(frozen=True)
class Indicium:
    """One PIM-1 indicium, decoded; amounts in mills, times in UTC."""

    algorithm: Algorithm
    authorization_id: int
    vendor_model: str
    device_serial: int
    key_id: bytes
    sequence: int
    ascending: int
    descending: int
    postage: int
    rate_category: RateCategory
    date_of_mailing: date
    time_of_issue: datetime
    origin_zip: str
    destination: str
    address_digest: bytes
    software_id: int
    flags: int
    reference_sequence: int
    signature: bytes = b""

    @property
    def is_correction(self) -> bool:
        return bool(self.flags & FLAG_CORRECTION)

    @property
    def is_specimen(self) -> bool:
        return bool(self.flags & FLAG_SPECIMEN)

    def signed_part(self) -> bytes:
        """The 84 bytes the meter signs; InvalidInput if they would be malformed."""
        wire = _to_wire(self)
        problem = _malformation(**{name: wire[name] for name in _RULE_FIELDS})
        if problem is not None:
            raise InvalidInput(f"indicium would be malformed: {problem}")
        return _pack(wire)

    def to_bytes(self) -> bytes:
        """Signed part and signature, as printed in the barcode."""
        signed = self.signed_part()  # first: it vouches for the algorithm too
        algorithm = Algorithm(self.algorithm)
        if len(self.signature) != algorithm.signature_length:
            raise InvalidInput(
                f"signature is {len(self.signature)} bytes; {algorithm.name} "
                f"needs exactly {algorithm.signature_length}"
            )
        return signed + bytes(self.signature)

    def with_signature(self, signature: bytes) -> Indicium:
        return dataclasses.replace(self, signature=bytes(signature))

    def fields(self) -> dict[str, object]:
        """JSON-ready fields, the shape of a vector's "fields" (no signature)."""
        return {name: _json_value(getattr(self, name)) for name in _NAMES[1:]}


def decode(data: bytes) -> Indicium:
    """Decode an indicium; MalformedIndicium names the rule it breaks."""
    # This is the verifier's hot path: the usual indicium passes one quick test
    # of every rule, and only one that fails it goes through _envelope and
    # _malformation, which check the rules one by one in the spec's order and
    # say which one it breaks.
    algorithm = _ALGORITHMS.get(data[1]) if len(data) > 1 and data[0] == VERSION else None
    if algorithm is None or len(data) != _TOTAL_LENGTHS[algorithm]:
        algorithm = _envelope(data)
    # Unpacked by position in LAYOUT order.
    (
        _version,
        _algorithm,
        authorization_id,
        vendor_model,
        device_serial,
        key_id,
        sequence,
        ascending,
        descending,
        postage,
        rate_category,
        date_of_mailing,
        time_of_issue,
        origin_zip,
        destination,
        address_digest,
        software_id,
        flags,
        reference_sequence,
    ) = _SIGNED.unpack_from(data)
    postage = int.from_bytes(postage)
    rate = _RATES.get(rate_category)
    year = date_of_mailing // 10000
    try:
        day: date | None = date(year, date_of_mailing // 100 % 100, date_of_mailing % 100)
    except ValueError:
        day = None
    # The quick test: passing it implies _malformation finds nothing (bytes.isdigit
    # is ASCII digits only, and the fields are never empty); failing it, that
    # function decides.
    if not (
        day is not None
        and FIRST_YEAR <= year <= LAST_YEAR
        and rate is not None
        and not vendor_model.translate(None, _UPPER_AND_DIGITS)
        and origin_zip.isdigit()
        and destination.isdigit()
        and not flags & ~_FLAGS_DEFINED
        and sequence
        and (
            0 < reference_sequence < sequence
            if flags & FLAG_CORRECTION
            else reference_sequence == 0
        )
        and not (flags & FLAG_SPECIMEN and postage)
    ):
        problem = _malformation(
            vendor_model=vendor_model,
            origin_zip=origin_zip,
            destination=destination,
            date_of_mailing=date_of_mailing,
            rate_category=rate_category,
            flags=flags,
            sequence=sequence,
            reference_sequence=reference_sequence,
            postage=postage,
        )
        if problem is not None:
            raise MalformedIndicium(problem)
        raise AssertionError(f"the quick test refused an indicium the rules accept: {data.hex()}")
    # Filled in directly rather than through the frozen __init__ (19 calls of
    # object.__setattr__): every value has just been checked. A test compares
    # the result with Indicium(...).
    indicium = _new_object(Indicium)
    indicium.__dict__.update(
        algorithm=algorithm,
        authorization_id=authorization_id,
        vendor_model=vendor_model.decode("ascii"),
        device_serial=device_serial,
        key_id=key_id,
        sequence=sequence,
        ascending=int.from_bytes(ascending),
        descending=int.from_bytes(descending),
        postage=postage,
        rate_category=rate,
        date_of_mailing=day,
        # A quarter faster than EPOCH + timedelta(seconds=...), and the same value
        # (whole seconds, UTC).
        time_of_issue=_from_timestamp(_EPOCH_SECONDS + time_of_issue, UTC),
        origin_zip=origin_zip.decode("ascii"),
        destination=destination.decode("ascii"),
        address_digest=address_digest,
        software_id=software_id,
        flags=flags,
        reference_sequence=reference_sequence,
        signature=bytes(data[SIGNED_LENGTH:]),
    )
    return indicium


def _envelope(data: bytes) -> Algorithm:
    """Version, algorithm and total length: the rules checked before any field."""
    if not data:
        raise MalformedIndicium("empty: no version byte")
    if data[0] != VERSION:
        raise MalformedIndicium(f"version 0x{data[0]:02x} is not 0x{VERSION:02x}")
    if len(data) < 2:
        raise MalformedIndicium("length 1: no algorithm byte")
    algorithm = _ALGORITHMS.get(data[1])
    if algorithm is None:
        raise MalformedIndicium(f"algorithm 0x{data[1]:02x} is not 0x01, 0x02 or 0x03")
    expected = _TOTAL_LENGTHS[algorithm]
    if len(data) != expected:
        raise MalformedIndicium(
            f"length {len(data)} does not match algorithm {algorithm.name} ({expected} bytes)"
        )
    return algorithm


def _pack(wire: _Wire) -> bytes:
    return _SIGNED.pack(
        *(
            wire[f.name].to_bytes(f.length) if f.name in _ODD_UINT_NAMES else wire[f.name]
            for f in LAYOUT
        )
    )


def _malformation(
    *,
    vendor_model: bytes,
    origin_zip: bytes,
    destination: bytes,
    date_of_mailing: int,
    rate_category: int,
    flags: int,
    sequence: int,
    reference_sequence: int,
    postage: int,
) -> str | None:
    """The spec's field rules for MALFORMED, in its order; None when none holds."""
    if vendor_model.translate(None, _UPPER_AND_DIGITS):
        return f"vendor and model {_show(vendor_model)} is not 4 of A-Z and 0-9"
    if origin_zip.translate(None, _DIGITS):
        return f"origin ZIP {_show(origin_zip)} is not 5 ASCII digits"
    if destination.translate(None, _DIGITS):
        return f"destination {_show(destination)} is not 11 ASCII digits"
    if not _is_calendar_date(date_of_mailing):
        return (
            f"date of mailing {date_of_mailing} is not a calendar date YYYYMMDD "
            f"in {FIRST_YEAR}-{LAST_YEAR}"
        )
    if rate_category not in _RATES:
        return f"rate category 0x{rate_category:04x} is not in the table"
    if flags & ~_FLAGS_DEFINED:
        return f"flags 0x{flags:02x} set a reserved bit 2-7"
    if sequence == 0:
        return "piece sequence is 0"
    if flags & FLAG_CORRECTION:
        if not 0 < reference_sequence < sequence:
            return (
                f"correction's reference sequence {reference_sequence} is not in 1 to "
                f"piece sequence {sequence} - 1"
            )
    elif reference_sequence != 0:
        return f"reference sequence {reference_sequence} is set but the correction flag is clear"
    if flags & FLAG_SPECIMEN and postage != 0:
        return f"specimen carries postage {postage} (must be 0)"
    return None


def _show(raw: bytes) -> str:
    return repr(raw.decode("ascii", "backslashreplace"))


def _is_calendar_date(value: int) -> bool:
    year, month, day = value // 10000, value // 100 % 100, value % 100
    if not FIRST_YEAR <= year <= LAST_YEAR:
        return False
    try:
        date(year, month, day)
    except ValueError:
        return False
    return True


def _to_wire(indicium: Indicium) -> _Wire:
    """Typed fields to wire values, refusing any that do not fit their width."""
    try:
        algorithm = Algorithm(indicium.algorithm)
    except ValueError:
        raise InvalidInput(f"algorithm {indicium.algorithm!r} is not 1, 2 or 3") from None
    when = indicium.time_of_issue
    if not isinstance(when, datetime):
        raise InvalidInput(f"time of issue {when!r} is not a datetime")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidInput(f"time of issue {when.isoformat()} has no time zone")
    if when.microsecond:
        raise InvalidInput(f"time of issue {when.isoformat()} is not whole seconds")
    day = indicium.date_of_mailing
    if not isinstance(day, date):
        raise InvalidInput(f"date of mailing {day!r} is not a date")
    wire: _Wire = {
        "version": VERSION,
        "algorithm": int(algorithm),
        "authorization_id": indicium.authorization_id,
        "vendor_model": _ascii("vendor and model", indicium.vendor_model),
        "device_serial": indicium.device_serial,
        "key_id": indicium.key_id,
        "sequence": indicium.sequence,
        "ascending": indicium.ascending,
        "descending": indicium.descending,
        "postage": indicium.postage,
        "rate_category": indicium.rate_category,
        "date_of_mailing": day.year * 10000 + day.month * 100 + day.day,
        "time_of_issue": (when - EPOCH) // timedelta(seconds=1),
        "origin_zip": _ascii("origin ZIP", indicium.origin_zip),
        "destination": _ascii("destination", indicium.destination),
        "address_digest": indicium.address_digest,
        "software_id": indicium.software_id,
        "flags": indicium.flags,
        "reference_sequence": indicium.reference_sequence,
    }
    for field in LAYOUT:
        value = wire[field.name]
        if field.kind is _Kind.UINT:
            limit = 2 ** (8 * field.length)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise InvalidInput(
                    f"{field.name} {value!r} does not fit {field.length} bytes (0 to {limit - 1})"
                )
        elif not isinstance(value, bytes) or len(value) != field.length:
            raise InvalidInput(f"{field.name} must be exactly {field.length} {field.kind.value}")
    return wire


def _ascii(what: str, text: str) -> bytes:
    try:
        return text.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        raise InvalidInput(f"{what} {text!r} is not ASCII text") from None


def _json_value(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value
