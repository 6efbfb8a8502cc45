"""PIM-1 indicia: encode and decode, address digests, signatures. Pure: no I/O."""

from meter.indicium.address import address_digest, normalize_address
from meter.indicium.codec import (
    EPOCH,
    FLAG_CORRECTION,
    FLAG_SPECIMEN,
    MAX_ADVANCE_DAYS,
    MAX_POSTAGE,
    MAX_REGISTER,
    SIGNED_LENGTH,
    Algorithm,
    Indicium,
    decode,
)
from meter.indicium.rates import RateCategory
from meter.indicium.signature import VerifyingKey, key_id, verify_signature

__all__ = [
    "EPOCH",
    "FLAG_CORRECTION",
    "FLAG_SPECIMEN",
    "MAX_ADVANCE_DAYS",
    "MAX_POSTAGE",
    "MAX_REGISTER",
    "SIGNED_LENGTH",
    "Algorithm",
    "Indicium",
    "RateCategory",
    "VerifyingKey",
    "address_digest",
    "decode",
    "key_id",
    "normalize_address",
    "verify_signature",
]
