"""The zone chart: how far a piece travels, from its origin and destination 3-digit ZIP prefixes.

Shaped like USPS's charts: for each origin prefix it has, a list of destination
prefix ranges, each with a zone from 1 (local) to 9 (the Pacific territories and
freely associated states). The rule, which docs/rates.md states in words:

- the origin's first three digits must be one of the chart's origins;
- the destination's first three digits must fall in exactly one of that origin's
  ranges; a prefix the chart lists as unplaced (unassigned by the postal service,
  or military mail, which is zoned from its gateway) is refused by name.

Loaded strictly: every range is checked, ranges of one origin must not overlap,
and every prefix 000-999 must be either placed for every origin or listed as
unplaced, so a chart that would leave some valid ZIP without a zone is refused
when it is loaded, not when a customer mails to it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meter.errors import InvalidInput

__all__ = ["MAX_ZONE", "ZoneChart"]

MAX_ZONE = 9
_PREFIX = re.compile(r"[0-9]{3}")
_ZIP5 = re.compile(r"[0-9]{5}")
_PREFIXES = tuple(f"{n:03d}" for n in range(1000))


@dataclass(frozen=True)
class ZoneChart:
    """Origin prefix -> (first destination prefix, last destination prefix, zone) ranges."""

    origins: Mapping[str, tuple[tuple[str, str, int], ...]]
    unplaced: Mapping[str, tuple[str, ...]]  # why ("unassigned", "military") -> prefixes

    @classmethod
    def from_json(cls, data: Any, source: str) -> ZoneChart:
        where = f"{source}: zones"
        _members(data, {"origins", "unplaced"}, where)
        unplaced_data = data["unplaced"]
        if not isinstance(unplaced_data, dict):
            raise InvalidInput(f"{where}.unplaced must map a reason to a list of prefixes")
        unplaced: dict[str, tuple[str, ...]] = {}
        refused: dict[str, str] = {}
        for reason, prefixes in unplaced_data.items():
            if not isinstance(prefixes, list):
                raise InvalidInput(f"{where}.unplaced.{reason} must be a list of prefixes")
            for prefix in prefixes:
                _prefix(prefix, f"{where}.unplaced.{reason}")
                if prefix in refused:
                    raise InvalidInput(f"{where}.unplaced lists prefix {prefix} twice")
                refused[prefix] = reason
            unplaced[reason] = tuple(prefixes)
        origins_data = data["origins"]
        if not isinstance(origins_data, dict) or not origins_data:
            raise InvalidInput(f"{where}.origins must map origin prefixes to ranges")
        origins: dict[str, tuple[tuple[str, str, int], ...]] = {}
        for origin, ranges in origins_data.items():
            _prefix(origin, f"{where}.origins")
            origins[origin] = _ranges(ranges, refused, f"{where}.origins.{origin}")
        return cls(origins, unplaced)

    def to_json(self) -> dict[str, Any]:
        return {
            "origins": {o: [list(r) for r in ranges] for o, ranges in self.origins.items()},
            "unplaced": {reason: list(p) for reason, p in self.unplaced.items()},
        }

    def zone(self, origin_zip: str, destination_zip: str) -> int:
        """The zone from ``origin_zip`` to ``destination_zip``; InvalidInput names what the
        chart cannot place."""
        self.require_destination(destination_zip)
        origin = _zip_prefix(origin_zip, "origin")
        ranges = self.origins.get(origin)
        if ranges is None:
            raise InvalidInput(
                f"origin ZIP {origin_zip} (prefix {origin}) is not in the rate table's zone "
                f"chart, which has origins {', '.join(sorted(self.origins))}: no zoned price"
            )
        destination = destination_zip[:3]
        for first, last, zone in ranges:
            if first <= destination <= last:
                return zone
        raise InvalidInput(  # unreachable for a chart that loaded: coverage is checked
            f"destination ZIP {destination_zip} is in no range of origin {origin}'s zone chart"
        )

    def require_destination(self, destination_zip: str) -> None:
        """Refuse a destination the chart lists as unplaced (for unzoned categories too)."""
        destination = _zip_prefix(destination_zip, "destination")
        for reason, prefixes in self.unplaced.items():
            if destination in prefixes:
                raise InvalidInput(
                    f"destination ZIP {destination_zip}: prefix {destination} is {reason} "
                    "in the rate table's zone chart, which cannot place it"
                )


def _members(data: Any, wanted: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be an object")
    unknown, missing = set(data) - wanted, wanted - set(data)
    if unknown or missing:
        raise InvalidInput(
            f"{where}: unknown members {sorted(unknown)}, missing members {sorted(missing)}"
        )


def _prefix(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise InvalidInput(f"{where}: {value!r} is not a 3-digit ZIP prefix")
    return value


def _zip_prefix(zip_code: str, what: str) -> str:
    if not _ZIP5.fullmatch(zip_code):
        raise InvalidInput(f"{what} ZIP '{zip_code}' must be 5 digits")
    return zip_code[:3]


def _ranges(data: Any, refused: Mapping[str, str], where: str) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(data, list) or not data:
        raise InvalidInput(f"{where} must be a list of [first, last, zone] ranges")
    ranges: list[tuple[str, str, int]] = []
    for number, entry in enumerate(data, 1):
        at = f"{where} range {number}"
        if not isinstance(entry, list) or len(entry) != 3:
            raise InvalidInput(f"{at} must be [first prefix, last prefix, zone]")
        first, last = _prefix(entry[0], at), _prefix(entry[1], at)
        zone = entry[2]
        if isinstance(zone, bool) or not isinstance(zone, int) or not 1 <= zone <= MAX_ZONE:
            raise InvalidInput(f"{at}: zone {zone!r} must be a whole number 1 to {MAX_ZONE}")
        if first > last:
            raise InvalidInput(f"{at}: {first} comes after {last}")
        ranges.append((first, last, zone))
    ranges.sort()
    for (_, last, _), (first, _, _) in itertools.pairwise(ranges):
        if first <= last:
            raise InvalidInput(f"{where}: ranges overlap at prefix {first}")
    placed = {f"{n:03d}" for first, last, _ in ranges for n in range(int(first), int(last) + 1)}
    both = sorted(placed & set(refused))
    if both:
        raise InvalidInput(f"{where}: prefix {both[0]} is placed and also listed as unplaced")
    gaps = [p for p in _PREFIXES if p not in placed and p not in refused]
    if gaps:
        raise InvalidInput(
            f"{where}: prefix {gaps[0]} (and {len(gaps) - 1} more) is neither placed nor "
            "listed as unplaced: the chart must place every valid ZIP"
        )
    return tuple(ranges)
