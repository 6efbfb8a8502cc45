"""What a host asks the device for when it wants a piece stamped: Create Indicium's request.

The host sends it over the device's socket (meter.host); the device checks
every field again before it debits anything (meter.psd.device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from meter.errors import InvalidInput
from meter.indicium import RateCategory

__all__ = ["IssueRequest"]


@dataclass(frozen=True)
class IssueRequest:
    """What a customer asks for; amounts in mills (1/10 cent).

    ``postage`` None with a ``weight`` ("1oz", "2.5lb"): the device computes the postage
    from its installed rate table (meter.rates, docs/rates.md). Both given: an explicit
    postage the table must allow for the category, at least its amount.
    """

    postage: int | None
    rate_category: RateCategory
    origin_zip: str
    destination_zip: str
    address: Sequence[str] | str
    destination_plus4: str = "0000"
    delivery_point: str = "00"
    date_of_mailing: date | None = None
    specimen: bool = False
    correction_of: int | None = None
    weight: str | None = None

    def destination(self) -> str:
        for name, value, width in (
            ("destination ZIP", self.destination_zip, 5),
            ("ZIP+4", self.destination_plus4, 4),
            ("delivery point", self.delivery_point, 2),
        ):
            if len(value) != width or not value.isascii() or not value.isdigit():
                raise InvalidInput(f"{name} '{value}' must be {width} digits")
        return self.destination_zip + self.destination_plus4 + self.delivery_point

    def address_lines(self) -> list[str]:
        address = [self.address] if isinstance(self.address, str) else list(self.address)
        return [line for text in address for line in text.splitlines() if line.strip()]

    def to_json(self) -> dict[str, Any]:
        """The body of the device's ``POST /v1/indicia``."""
        return {
            "postage": self.postage,
            "rate_category": self.rate_category.slug,
            "origin_zip": self.origin_zip,
            "destination_zip": self.destination_zip,
            "destination_plus4": self.destination_plus4,
            "delivery_point": self.delivery_point,
            "address": [self.address] if isinstance(self.address, str) else list(self.address),
            "date_of_mailing": self.date_of_mailing.isoformat() if self.date_of_mailing else None,
            "specimen": self.specimen,
            "correction_of": self.correction_of,
            "weight": self.weight,
        }
