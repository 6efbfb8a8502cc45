"""The lab PINs of homes whose meter token is not one of their own (openCryptoki's slot 3).

A module of its own because pytest imports tests/conftest.py as ``conftest`` while test
files import it as ``tests.conftest``: two module objects, two dicts. Both import this one.
"""

from __future__ import annotations

from pathlib import Path

LAB_METER_PINS: dict[Path, dict[str, str]] = {}
