"""One piece's checks and its unsigned indicium, shared by Create Indicium and its batches.

Everything here is pure: it reads the request, the meter's clock and registers,
and changes nothing, so a batch can check all its pieces before any is debited
(meter.psd.device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from meter.errors import InvalidInput
from meter.indicium import (
    EPOCH,
    FLAG_CORRECTION,
    FLAG_SPECIMEN,
    MAX_ADVANCE_DAYS,
    MAX_POSTAGE,
    Algorithm,
    Indicium,
    address_digest,
)
from meter.protocol.issue import IssueRequest
from meter.psd.identity import DeviceIdentity
from meter.psd.registers import PieceRegisters, Registers
from meter.rates import RateTable, Weight, check_explicit, quote
from meter.token import KeyAlgorithm

__all__ = [
    "Checked",
    "Issuer",
    "SignedBatch",
    "check_request",
    "price_request",
    "unsigned_indicium",
]

_ZIP5 = re.compile(r"[0-9]{5}")
_ALGORITHM_BYTE = {
    KeyAlgorithm.ECDSA_P256: Algorithm.ECDSA_P256,
    KeyAlgorithm.ED25519: Algorithm.ED25519,
    KeyAlgorithm.RSA_PSS_2048: Algorithm.RSA_PSS_2048,
}


@dataclass(frozen=True)
class Checked:
    """What the checks of one request establish, for its indicium."""

    mailing: date
    destination: str
    flags: int
    reference: int
    postage: int  # the request's, or the one the rate table computed (`price_request`)


@dataclass(frozen=True)
class Issuer:
    """The meter's own fields of every indicium it issues."""

    identity: DeviceIdentity
    key_id: bytes
    software_id: int  # the installed update bundle's release number, else the identity's


@dataclass(frozen=True)
class SignedBatch:
    """A batch as the device releases it: each piece's indicium as printed, in order."""

    encoded: tuple[bytes, ...]  # signed part and signature of each piece
    postages: tuple[int, ...]
    first_sequence: int
    registers: Registers  # the generation the batch committed

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + len(self.encoded) - 1


def check_request(request: IssueRequest, now: datetime, current: Registers) -> Checked:
    """Every check of one request that does not depend on its debit."""
    if now < EPOCH:
        raise InvalidInput(f"meter clock {now.isoformat()} is before 2020")
    today = now.date()
    mailing = request.date_of_mailing or today
    if mailing < today:
        raise InvalidInput(f"date of mailing {mailing} is before the meter's date {today}")
    if mailing > today + timedelta(days=MAX_ADVANCE_DAYS):
        raise InvalidInput(
            f"date of mailing {mailing} is more than {MAX_ADVANCE_DAYS} days after {today} "
            "(advance-dating limit)"
        )
    if not _ZIP5.fullmatch(request.origin_zip):
        raise InvalidInput(f"origin ZIP '{request.origin_zip}' must be 5 digits")
    destination = request.destination()
    postage = request.postage
    if postage is None:
        if not request.specimen:
            raise InvalidInput(
                "the request gives no postage: give the postage, or the weight for the meter "
                "to compute it from its rate table"
            )
        postage = 0
    if request.specimen:
        if postage != 0:
            raise InvalidInput("a specimen indicium carries no postage: postage must be 0")
    elif not 0 < postage <= MAX_POSTAGE:
        raise InvalidInput(f"postage {postage} mills must be between 1 and {MAX_POSTAGE} mills")
    flags, reference = 0, 0
    if request.specimen:
        flags |= FLAG_SPECIMEN
    if request.correction_of is not None:
        if not 0 < request.correction_of <= current.sequence:
            raise InvalidInput(
                f"correction refers to piece {request.correction_of}, but this meter has "
                f"issued pieces 1..{current.sequence}"
            )
        flags |= FLAG_CORRECTION
        reference = request.correction_of
    return Checked(mailing, destination, flags, reference, postage)


def unsigned_indicium(
    issuer: Issuer, request: IssueRequest, now: datetime, after: PieceRegisters, checked: Checked
) -> Indicium:
    """The indicium of one piece, carrying ``after``: its registers once it is debited."""
    identity = issuer.identity
    return Indicium(
        algorithm=_ALGORITHM_BYTE[identity.algorithm],
        authorization_id=identity.authorization_id,
        vendor_model=identity.vendor_model,
        device_serial=identity.device_serial,
        key_id=issuer.key_id,
        sequence=after.sequence,
        ascending=after.ascending,
        descending=after.descending,
        postage=checked.postage,
        rate_category=request.rate_category,
        date_of_mailing=checked.mailing,
        time_of_issue=now,
        origin_zip=request.origin_zip,
        destination=checked.destination,
        address_digest=address_digest(request.address),
        software_id=issuer.software_id,
        flags=checked.flags,
        reference_sequence=checked.reference,
    )


def price_request(request: IssueRequest, table: RateTable | None) -> IssueRequest:
    """The request with its postage from the installed rate table, or refused (docs/rates.md).

    Specimens carry none and corrections pay a shortfall the customer states, so
    neither is priced. Without a table only an explicit postage is possible. With
    one, the category must be in it; a weight prices the piece, and an explicit
    postage must be allowed for the category and at least the table's amount.
    """
    if request.specimen or request.correction_of is not None:
        if request.weight is not None:
            what = "a specimen" if request.specimen else "a correction (it pays a shortfall)"
            raise InvalidInput(f"{what} is not priced by weight: leave the weight out")
        return request
    if table is None:
        if request.weight is not None:
            raise InvalidInput(
                "this meter has no rate table installed (Update PSC installs one): give the "
                "postage explicitly"
            )
        return request
    rates = table.rates_for(request.rate_category)
    computed = None
    if request.weight is not None:
        weight = Weight.parse(request.weight)
        computed = quote(
            table, request.rate_category, weight, request.origin_zip, request.destination_zip
        )
    if request.postage is None:
        if computed is None:
            raise InvalidInput(
                "the request gives neither postage nor weight: give the weight for the meter "
                "to compute the postage"
            )
        return replace(request, postage=computed.mills)
    check_explicit(rates, request.postage, computed)
    return request
