"""A verifier's verdicts (spec: "Verdicts") and the result it returns."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from meter.indicium import Indicium


class Verdict(StrEnum):
    """The spec's verdicts, in its order, and ERROR for a failed replay store.

    ERROR is not in the spec: it is what a piece gets when it passed every
    check but the replay store could not say whether it was seen before (or
    could not record it). Such a piece is never VALID; check it again once
    the store works.
    """

    MALFORMED = "MALFORMED"
    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
    FORGED = "FORGED"
    REVOKED = "REVOKED"
    NOT_YET_VALID = "NOT_YET_VALID"
    EXPIRED = "EXPIRED"
    SPECIMEN = "SPECIMEN"
    DUPLICATE = "DUPLICATE"
    VALID = "VALID"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """One verdict, the rule that decided it, and the decoded indicium if any."""

    verdict: Verdict
    reason: str
    indicium: Indicium | None

    def to_json(self) -> dict[str, object]:
        result: dict[str, object] = {"verdict": self.verdict.value, "reason": self.reason}
        if self.indicium is not None:
            result["fields"] = self.indicium.fields()
        return result
