"""Rate tables, zone charts and postage computation: pure, no token."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meter.errors import InvalidInput
from meter.indicium import RateCategory
from meter.rates import RateTable, Weight, check_explicit, default_table, load_table, quote
from meter.rates.table import DEFAULT_TABLE_RESOURCE

LETTER, FLAT, PRIORITY = (
    RateCategory.FIRST_CLASS_LETTER,
    RateCategory.FIRST_CLASS_FLAT,
    RateCategory.PRIORITY,
)
SHIPPED = Path(__file__).parent.parent / "meter" / "rates" / DEFAULT_TABLE_RESOURCE


def _data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SHIPPED.read_text())
    return data


def _refused(data: Any, *words: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        RateTable.from_json(data, "t.json")
    message = str(caught.value)
    assert message.startswith("t.json"), message
    for word in words:
        assert word in message, message
    return message


def test_the_shipped_table_has_letters_flats_and_priority_by_zone_and_pound() -> None:
    table = default_table()
    assert set(table.categories) == {LETTER, FLAT, PRIORITY}
    letter, flat, priority = (table.categories[c] for c in (LETTER, FLAT, PRIORITY))
    assert [str(s) for s in letter.steps] == ["1", "2", "3", "3.5"]
    assert letter.unit == "oz" and letter.prices is not None
    assert flat.steps == tuple(Decimal(n) for n in range(1, 14)) and flat.unit == "oz"
    assert priority.unit == "lb" and priority.steps == tuple(Decimal(n) for n in range(1, 71))
    assert priority.zoned_prices is not None and sorted(priority.zoned_prices) == list(range(1, 10))
    # Letters and flats may be paid above the table; Priority Mail only at its price.
    assert (letter.allow_explicit, flat.allow_explicit, priority.allow_explicit) == (
        True,
        True,
        False,
    )
    # The data round-trips: what a bundle embeds is what the device loads.
    assert RateTable.from_json(table.to_json(), "again") == table
    assert load_table(SHIPPED) == table


def test_a_letter_by_the_ounce_rounded_up_to_the_next_step() -> None:
    table = default_table()
    prices = table.categories[LETTER].prices
    assert prices is not None
    cases = {"1oz": 0, "0.4 oz": 0, "1.01oz": 1, "2oz": 1, "3.2oz": 3, "3.5oz": 3}
    for text, step in cases.items():
        q = quote(table, LETTER, Weight.parse(text), "94043", "62704")
        assert q.mills == prices[step], text
        assert q.zone is None
    q = quote(table, LETTER, Weight.parse("1oz"), "94043", "62704")
    assert "First-Class Mail letter, up to 1 oz" in q.rule
    # A letter goes anywhere the chart can place, from any origin: it is not zoned.
    assert quote(table, LETTER, Weight.parse("1oz"), "30301", "62704").mills == prices[0]


def test_priority_mail_by_zone_and_pound() -> None:
    table = default_table()
    zoned = table.categories[PRIORITY].zoned_prices
    assert zoned is not None
    # Springfield IL to itself is zone 1; to San Francisco zone 8; to Guam zone 9.
    local = quote(table, PRIORITY, Weight.parse("1lb"), "62704", "62701")
    far = quote(table, PRIORITY, Weight.parse("17oz"), "62704", "94105")  # 17 oz -> 2 lb
    guam = quote(table, PRIORITY, Weight.parse("70lb"), "10001", "96910")
    assert (local.zone, local.mills) == (1, zoned[1][0])
    assert (far.zone, far.mills, far.step) == (8, zoned[8][1], Decimal(2))
    assert (guam.zone, guam.mills) == (9, zoned[9][69])
    assert "zone 8, up to 2 lb" in far.rule
    # Every zone costs at least as much as a nearer one, and a pound more always costs more.
    for pound in range(70):
        column = [zoned[z][pound] for z in range(1, 10)]
        assert column == sorted(column)
    for z in range(1, 10):
        assert all(a < b for a, b in zip(zoned[z], zoned[z][1:], strict=False))


def test_the_chart_places_every_valid_zip_from_every_origin_it_ships() -> None:
    table = default_table()
    unplaced = {p for prefixes in table.zones.unplaced.values() for p in prefixes}
    assert {"000", "213", "340", "962"} <= unplaced  # unassigned and military
    assert set(table.zones.origins) == {"940", "100", "606", "627"}
    for origin in table.zones.origins:
        for n in range(1000):
            prefix = f"{n:03d}"
            destination = f"{prefix}01"
            if prefix in unplaced:
                with pytest.raises(InvalidInput, match=f"prefix {prefix}"):
                    table.zones.zone(f"{origin}01", destination)
            else:
                assert 1 <= table.zones.zone(f"{origin}01", destination) <= 9
        # Every origin is in zone 1 of itself.
        assert table.zones.zone(f"{origin}01", f"{origin}99") == 1


@pytest.mark.parametrize(
    ("category", "weight", "origin", "destination", "words"),
    [
        (RateCategory.MEDIA, "1lb", "94043", "62704", ["media", "not in the rate table"]),
        (LETTER, "3.6oz", "94043", "62704", ["over the rate table's limit of 3.5 oz"]),
        (FLAT, "13.01oz", "94043", "62704", ["limit of 13 oz"]),
        (PRIORITY, "70.1lb", "94043", "62704", ["limit of 70 lb"]),
        (PRIORITY, "1lb", "30301", "62704", ["origin ZIP 30301", "prefix 303", "940"]),
        (PRIORITY, "1lb", "94043", "00123", ["prefix 001 is unassigned"]),
        (LETTER, "1oz", "94043", "09012", ["prefix 090 is military"]),
        (LETTER, "1oz", "94043", "6270", ["destination ZIP '6270' must be 5 digits"]),
    ],
)
def test_what_the_table_cannot_price_is_refused_by_name(
    category: RateCategory, weight: str, origin: str, destination: str, words: list[str]
) -> None:
    with pytest.raises(InvalidInput) as caught:
        quote(default_table(), category, Weight.parse(weight), origin, destination)
    for word in words:
        assert word in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    "text", ["", "1", "oz", "1 kg", "-1oz", "0oz", "0.00lb", "1e3oz", "1,5oz", "99999999oz"]
)
def test_a_weight_needs_a_positive_number_and_a_unit(text: str) -> None:
    with pytest.raises(InvalidInput, match="weight"):
        Weight.parse(text)


def test_weights_in_pounds_and_ounces_agree() -> None:
    assert Weight.parse("2lb").ounces == Weight.parse("32 OZ").ounces == Decimal(32)
    assert str(Weight.parse(" 1.5 LB ")) == "1.5lb"


def test_explicit_postage_only_where_the_table_allows_and_never_below_it() -> None:
    table = default_table()
    letter = table.categories[LETTER]
    two_ounces = quote(table, LETTER, Weight.parse("2oz"), "94043", "62704")
    check_explicit(letter, two_ounces.mills, two_ounces)
    check_explicit(letter, two_ounces.mills + 1000, two_ounces)  # "at least the table's"
    with pytest.raises(InvalidInput, match="below the rate table's"):
        check_explicit(letter, two_ounces.mills - 1, two_ounces)
    # Without a weight the floor is the category's lowest price.
    check_explicit(letter, letter.lowest, None)
    with pytest.raises(InvalidInput, match="lowest First-Class Mail letter price"):
        check_explicit(letter, letter.lowest - 1, None)
    priority = table.categories[PRIORITY]
    with pytest.raises(InvalidInput, match="does not allow an explicit postage for Priority"):
        check_explicit(priority, 10**6, None)


def test_a_table_with_a_float_or_an_unknown_member_is_refused() -> None:
    text = SHIPPED.read_text().replace('"prices": [\n    740', '"prices": [\n    740.5', 1)
    assert "740.5" in text
    with pytest.raises(InvalidInput, match="has a fraction"):
        RateTable.from_bytes(text.encode(), "t.json")
    with pytest.raises(InvalidInput, match="not JSON"):
        RateTable.from_bytes(b"{", "t.json")
    data = _data()
    data["surcharge"] = 1
    _refused(data, "unknown members ['surcharge']")


def _broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(_data())
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(format="pim-rates-v0"), ["'format'"]),
        (lambda d: d.update(currency="EUR"), ["'currency'"]),
        (lambda d: d.update(effective="2026-13-01"), ["'effective'"]),
        (lambda d: d["categories"].update(express={}), ["'express' is not a PIM-1"]),
        (
            lambda d: d["categories"]["first-class-letter"].update(unit="g"),
            ["unit 'g'"],
        ),
        (
            lambda d: d["categories"]["first-class-letter"].update(steps=["1", "3", "2", "3.5"]),
            ["steps must grow"],
        ),
        (
            lambda d: d["categories"]["first-class-letter"].update(prices=[740, 1030, 1320]),
            ["4 prices"],
        ),
        (
            lambda d: d["categories"]["first-class-letter"].update(prices=[740, 700, 1320, 1610]),
            ["heavier step is cheaper"],
        ),
        (
            lambda d: d["categories"]["first-class-letter"].update(prices=[0, 1030, 1320, 1610]),
            ["price 0"],
        ),
        (
            lambda d: d["categories"]["first-class-letter"].update(allow_explicit="yes"),
            ["allow_explicit"],
        ),
        (
            lambda d: d["categories"]["first-class-letter"].update(zoned_prices={}),
            ["exactly one of"],
        ),
        (
            lambda d: d["categories"]["priority"]["zoned_prices"].pop("9"),
            ["zones 1 to 9"],
        ),
        (
            lambda d: d["categories"]["priority"]["zoned_prices"].update(
                {"9": d["categories"]["priority"]["zoned_prices"]["1"]}
            ),
            ["farther zone is cheaper"],
        ),
        (lambda d: d["zones"]["origins"]["940"].pop(0), ["prefix 005", "neither placed"]),
        (lambda d: d["zones"]["origins"]["940"].append(["500", "500", 3]), ["overlap"]),
        (lambda d: d["zones"]["origins"]["940"][0].__setitem__(2, 10), ["zone 10"]),
        (lambda d: d["zones"]["origins"].update({"94": []}), ["'94' is not a 3-digit"]),
        (lambda d: d["zones"]["unplaced"]["military"].append("940"), ["placed and also"]),
    ],
)
def test_every_broken_rule_of_a_table_is_named(change: Any, words: list[str]) -> None:
    _refused(_broken(change), *words)
