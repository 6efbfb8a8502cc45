"""A rate table: prices in mills by rate category and weight step (and zone), loaded strictly.

The document (format ``pim-rates-v1``, JSON; meter/rates/data/us-domestic-2026.json is
the shipped one, docs/rates.md describes every member)::

    {"format": "pim-rates-v1", "name": TEXT, "effective": "YYYY-MM-DD",
     "currency": "USD mills", "zones": ZONE CHART (meter.rates.zones),
     "categories": {SLUG: {"unit": "oz" | "lb", "steps": ["1", "2", ...],
                           "prices": [mills per step]  or  "zoned_prices": {"1": [...], ..., "9": [...]},
                           "allow_explicit": true | false}}}

A category's slug is the PIM-1 rate category's command-line name
(meter.indicium.RateCategory: ``first-class-letter`` is code 0x0001), so the indicium
records the category the price came from. Steps are the weights each price covers, up
to and including the step, in the category's unit; a piece is charged at the first
step at or above its weight (USPS rounds a weight up to the next ounce or pound).
Prices never fall as the weight or the zone grows. Unknown members, wrong types and
out-of-range numbers are errors that name the file and the member; a float anywhere
is refused (mills are whole numbers, weights decimal strings).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from meter.errors import InvalidInput
from meter.indicium import MAX_POSTAGE, RateCategory
from meter.rates.zones import MAX_ZONE, ZoneChart

__all__ = [
    "DEFAULT_TABLE_RESOURCE",
    "RATES_FORMAT",
    "UNITS",
    "CategoryRates",
    "RateTable",
    "default_table",
    "load_table",
]

RATES_FORMAT = "pim-rates-v1"
CURRENCY = "USD mills"
DEFAULT_TABLE_RESOURCE = "data/us-domestic-2026.json"
UNITS = {"oz": Decimal(1), "lb": Decimal(16)}  # ounces per unit
MAX_STEPS = 200
_TABLE_MEMBERS = {"format", "name", "effective", "currency", "zones", "categories"}
_CATEGORY_MEMBERS = {"unit", "steps", "allow_explicit"}
_PRICE_MEMBERS = ("prices", "zoned_prices")


@dataclass(frozen=True)
class CategoryRates:
    """One rate category's prices: by weight step, or by zone and weight step."""

    category: RateCategory
    unit: str
    steps: tuple[Decimal, ...]
    prices: tuple[int, ...] | None
    zoned_prices: Mapping[int, tuple[int, ...]] | None
    allow_explicit: bool

    @property
    def zoned(self) -> bool:
        return self.zoned_prices is not None

    @property
    def limit(self) -> Decimal:
        """The heaviest piece the table prices, in the category's unit."""
        return self.steps[-1]

    @property
    def lowest(self) -> int:
        """The least postage any piece of this category costs (an explicit amount's floor)."""
        if self.zoned_prices is not None:
            return min(prices[0] for prices in self.zoned_prices.values())
        assert self.prices is not None
        return self.prices[0]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "unit": self.unit,
            "steps": [str(s) for s in self.steps],
            "allow_explicit": self.allow_explicit,
        }
        if self.zoned_prices is not None:
            data["zoned_prices"] = {str(z): list(p) for z, p in self.zoned_prices.items()}
        else:
            assert self.prices is not None
            data["prices"] = list(self.prices)
        return data


@dataclass(frozen=True)
class RateTable:
    name: str
    effective: date
    zones: ZoneChart
    categories: Mapping[RateCategory, CategoryRates]

    def rates_for(self, category: RateCategory) -> CategoryRates:
        rates = self.categories.get(category)
        if rates is None:
            known = ", ".join(c.slug for c in self.categories)
            raise InvalidInput(
                f"rate category {category.slug} ({category.title}) is not in the rate table "
                f"'{self.name}', which prices {known}"
            )
        return rates

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RATES_FORMAT,
            "name": self.name,
            "effective": self.effective.isoformat(),
            "currency": CURRENCY,
            "zones": self.zones.to_json(),
            "categories": {c.slug: r.to_json() for c, r in self.categories.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> RateTable:
        """Check every member; InvalidInput names ``source`` and the member at fault."""
        _members(data, _TABLE_MEMBERS, source)
        if data["format"] != RATES_FORMAT:
            raise InvalidInput(f"{source}: member 'format' must be {RATES_FORMAT!r}")
        if data["currency"] != CURRENCY:
            raise InvalidInput(f"{source}: member 'currency' must be {CURRENCY!r}")
        name = data["name"]
        if not isinstance(name, str) or not 0 < len(name) <= 200 or not name.isprintable():
            raise InvalidInput(f"{source}: member 'name' must be 1 to 200 printable characters")
        try:
            effective = date.fromisoformat(data["effective"])
        except (TypeError, ValueError):
            raise InvalidInput(f"{source}: member 'effective' must be a date YYYY-MM-DD") from None
        zones = ZoneChart.from_json(data["zones"], source)
        categories_data = data["categories"]
        if not isinstance(categories_data, dict) or not categories_data:
            raise InvalidInput(f"{source}: member 'categories' must map rate categories to prices")
        categories: dict[RateCategory, CategoryRates] = {}
        for slug, entry in categories_data.items():
            category = next((c for c in RateCategory if c.slug == slug), None)
            if category is None:
                valid = ", ".join(c.slug for c in RateCategory)
                raise InvalidInput(
                    f"{source}: category {slug!r} is not a PIM-1 rate category ({valid})"
                )
            categories[category] = _category(category, entry, f"{source}: categories.{slug}")
        return cls(name, effective, zones, categories)

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> RateTable:
        try:
            parsed = json.loads(data, parse_float=_no_float)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{source}: not JSON ({exc})") from exc
        return cls.from_json(parsed, source)


def load_table(path: Path) -> RateTable:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read rate table {path}: {exc.strerror or exc}") from exc
    return RateTable.from_bytes(data, str(path))


def default_table() -> RateTable:
    """The table shipped with the package (US domestic, 2026)."""
    data = resources.files("meter.rates").joinpath(DEFAULT_TABLE_RESOURCE).read_bytes()
    return RateTable.from_bytes(data, f"meter/rates/{DEFAULT_TABLE_RESOURCE}")


def _no_float(text: str) -> Any:
    raise InvalidInput(
        f"the number {text} has a fraction: mills are whole numbers, weights are strings"
    )


def _members(
    data: Any, required: AbstractSet[str], where: str, optional: AbstractSet[str] = frozenset()
) -> None:
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    unknown = set(data) - required - optional
    missing = required - set(data)
    if unknown or missing:
        raise InvalidInput(
            f"{where}: unknown members {sorted(unknown)}, missing members {sorted(missing)}"
        )


def _category(category: RateCategory, data: Any, where: str) -> CategoryRates:
    _members(data, _CATEGORY_MEMBERS, where, set(_PRICE_MEMBERS))
    given = [m for m in _PRICE_MEMBERS if m in data]
    if len(given) != 1:
        raise InvalidInput(f"{where} needs exactly one of 'prices' and 'zoned_prices'")
    unit = data["unit"]
    if unit not in UNITS:
        raise InvalidInput(f"{where}: unit {unit!r} must be one of {sorted(UNITS)}")
    allow = data["allow_explicit"]
    if not isinstance(allow, bool):
        raise InvalidInput(f"{where}: allow_explicit must be true or false")
    steps = _steps(data["steps"], f"{where}.steps")
    prices: tuple[int, ...] | None = None
    zoned: dict[int, tuple[int, ...]] | None = None
    if "prices" in data:
        prices = _prices(data["prices"], len(steps), f"{where}.prices")
    else:
        zoned_data = data["zoned_prices"]
        wanted = {str(z) for z in range(1, MAX_ZONE + 1)}
        if not isinstance(zoned_data, dict) or set(zoned_data) != wanted:
            raise InvalidInput(f"{where}.zoned_prices must have exactly zones 1 to {MAX_ZONE}")
        zoned = {
            z: _prices(zoned_data[str(z)], len(steps), f"{where}.zoned_prices.{z}")
            for z in range(1, MAX_ZONE + 1)
        }
        for step in range(len(steps)):
            column = [zoned[z][step] for z in range(1, MAX_ZONE + 1)]
            if any(a > b for a, b in itertools.pairwise(column)):
                raise InvalidInput(
                    f"{where}.zoned_prices: at step {steps[step]} {unit} a farther zone is "
                    "cheaper than a nearer one"
                )
    return CategoryRates(category, unit, steps, prices, zoned, allow)


def _steps(data: Any, where: str) -> tuple[Decimal, ...]:
    if not isinstance(data, list) or not 0 < len(data) <= MAX_STEPS:
        raise InvalidInput(f"{where} must be a list of 1 to {MAX_STEPS} weights")
    steps: list[Decimal] = []
    for text in data:
        if not isinstance(text, str):
            raise InvalidInput(f'{where}: step {text!r} must be a decimal string such as "3.5"')
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise InvalidInput(f"{where}: step {text!r} is not a decimal number") from None
        if not value.is_finite() or value <= 0 or str(value) != text:
            raise InvalidInput(f"{where}: step {text!r} must be a positive number written plainly")
        if steps and value <= steps[-1]:
            raise InvalidInput(f"{where}: steps must grow, but {text} follows {steps[-1]}")
        steps.append(value)
    return tuple(steps)


def _prices(data: Any, count: int, where: str) -> tuple[int, ...]:
    if not isinstance(data, list) or len(data) != count:
        raise InvalidInput(f"{where} must be a list of {count} prices, one per step")
    for price in data:
        if isinstance(price, bool) or not isinstance(price, int) or not 0 < price <= MAX_POSTAGE:
            raise InvalidInput(f"{where}: price {price!r} must be whole mills, 1 to {MAX_POSTAGE}")
    if any(a > b for a, b in itertools.pairwise(data)):
        raise InvalidInput(f"{where}: a heavier step is cheaper than a lighter one")
    return tuple(data)
