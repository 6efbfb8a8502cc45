"""Rate tables: postage from rate category, weight and zone (docs/rates.md)."""

from meter.rates.compute import Quote, Weight, check_explicit, quote
from meter.rates.table import CategoryRates, RateTable, default_table, load_table
from meter.rates.zones import ZoneChart

__all__ = [
    "CategoryRates",
    "Quote",
    "RateTable",
    "Weight",
    "ZoneChart",
    "check_explicit",
    "default_table",
    "load_table",
    "quote",
]
