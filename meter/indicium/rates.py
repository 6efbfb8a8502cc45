"""PIM-1 rate categories (the spec's "Rate categories" table)."""

from __future__ import annotations

from enum import IntEnum

from meter.errors import InvalidInput

# code -> (the spec's words, the CLI name)
_NAMES: dict[int, tuple[str, str]] = {
    0x0001: ("First-Class Mail letter", "first-class-letter"),
    0x0002: ("First-Class Mail large envelope (flat)", "first-class-flat"),
    0x0003: ("Ground Advantage (package)", "ground-advantage"),
    0x0004: ("Priority Mail", "priority"),
    0x0005: ("Priority Mail Express", "priority-express"),
    0x0006: ("Media Mail", "media"),
    0x0007: ("Marketing Mail", "marketing"),
    0x00FF: ("other", "other"),
}


class RateCategory(IntEnum):
    """The two-byte rate category of an indicium; any other code is malformed."""

    FIRST_CLASS_LETTER = 0x0001
    FIRST_CLASS_FLAT = 0x0002
    GROUND_ADVANTAGE = 0x0003
    PRIORITY = 0x0004
    PRIORITY_EXPRESS = 0x0005
    MEDIA = 0x0006
    MARKETING = 0x0007
    OTHER = 0x00FF

    @property
    def title(self) -> str:
        """The category as the spec names it, e.g. "First-Class Mail letter"."""
        return _NAMES[self.value][0]

    @property
    def slug(self) -> str:
        """The command-line name, e.g. "first-class-letter"."""
        return _NAMES[self.value][1]

    @classmethod
    def parse(cls, text: str) -> RateCategory:
        """Read a slug ("priority") or a code ("4", "0x0004")."""
        key = text.strip().lower()
        for category in cls:
            if category.slug == key:
                return category
        try:
            code = int(key, 16) if key.startswith("0x") else int(key, 10)
            return cls(code)
        except ValueError:
            pass
        valid = ", ".join(category.slug for category in cls)
        raise InvalidInput(f"unknown rate category {text!r}: use one of {valid} or a code")
