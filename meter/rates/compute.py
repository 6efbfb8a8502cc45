"""Postage from a rate table: rate category + weight + origin and destination ZIP -> mills.

Pure. The device runs it inside its boundary on the table of its installed, verified
update bundle (meter.psd.psc_store); a host may run it to preview a price, but the
price an indicium carries is always the device's.

Weights are written with their unit, ``"1oz"``, ``"3.2 oz"``, ``"2lb"``, ``"1.5 lb"``
(1 lb = 16 oz), and charged at the first step of the table at or above them: a
3.2 oz letter pays the 3.5 oz price, a 1.1 lb Priority Mail piece the 2 lb one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from meter.errors import InvalidInput
from meter.indicium import RateCategory
from meter.rates.table import UNITS, CategoryRates, RateTable

__all__ = ["MAX_WEIGHT_OZ", "Quote", "Weight", "check_explicit", "quote"]

MAX_WEIGHT_OZ = Decimal(70 * 16 * 10)  # a sanity bound far above any table's last step
_WEIGHT = re.compile(r"\s*([0-9]{1,6}(?:\.[0-9]{1,4})?)\s*(oz|lb)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Weight:
    """A piece's weight in ounces, as the customer gave it."""

    ounces: Decimal
    text: str

    @classmethod
    def parse(cls, text: str) -> Weight:
        match = _WEIGHT.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise InvalidInput(f"weight {text!r} must be a number and a unit, e.g. 1oz, 3.5oz, 2lb")
        try:
            amount = Decimal(match.group(1))
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            raise InvalidInput(f"weight {text!r} is not a number") from None
        ounces = amount * UNITS[match.group(2).lower()]
        if ounces <= 0:
            raise InvalidInput(f"weight {text!r} must be more than zero")
        if ounces > MAX_WEIGHT_OZ:
            raise InvalidInput(f"weight {text!r} is beyond any rate table")
        return cls(ounces, f"{match.group(1)}{match.group(2).lower()}")

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Quote:
    """What a piece costs and the rule of the table that says so."""

    category: RateCategory
    mills: int
    weight: Weight
    step: Decimal  # the weight step charged, in ``unit``
    unit: str
    zone: int | None
    table: str

    @property
    def rule(self) -> str:
        """In words, e.g. "Priority Mail, zone 5, up to 3 lb (US domestic ...)"."""
        zone = f", zone {self.zone}" if self.zone is not None else ""
        return f"{self.category.title}{zone}, up to {self.step} {self.unit} ({self.table})"

    def to_json(self) -> dict[str, Any]:
        return {
            "rate_category": self.category.slug,
            "postage": self.mills,
            "weight": self.weight.text,
            "step": f"{self.step}{self.unit}",
            "zone": self.zone,
            "rule": self.rule,
        }


def quote(
    table: RateTable,
    category: RateCategory,
    weight: Weight,
    origin_zip: str,
    destination_zip: str,
) -> Quote:
    """The postage for one piece; InvalidInput for an unknown category, a weight over the
    table's limit, or a ZIP the table's zone chart cannot place."""
    rates = table.rates_for(category)
    in_unit = weight.ounces / UNITS[rates.unit]
    index = next((i for i, step in enumerate(rates.steps) if in_unit <= step), None)
    if index is None:
        raise InvalidInput(
            f"weight {weight} is over the rate table's limit of {rates.limit} {rates.unit} for "
            f"{category.title}"
        )
    zone: int | None = None
    if rates.zoned_prices is not None:
        zone = table.zones.zone(origin_zip, destination_zip)
        mills = rates.zoned_prices[zone][index]
    else:
        table.zones.require_destination(destination_zip)
        assert rates.prices is not None
        mills = rates.prices[index]
    return Quote(category, mills, weight, rates.steps[index], rates.unit, zone, table.name)


def check_explicit(rates: CategoryRates, postage: int, computed: Quote | None) -> None:
    """May a customer pay ``postage`` of their own choosing for this category?

    Only where the table allows it, and never less than the table's amount: the
    computed price when the weight is known, else the category's lowest price.
    """
    title = rates.category.title
    if not rates.allow_explicit:
        raise InvalidInput(
            f"the rate table does not allow an explicit postage for {title}: give the weight "
            "and let the meter compute it"
        )
    floor = computed.mills if computed is not None else rates.lowest
    if postage < floor:
        what = computed.rule if computed is not None else f"the lowest {title} price"
        raise InvalidInput(
            f"postage {postage} mills is below the rate table's {floor} mills ({what})"
        )
