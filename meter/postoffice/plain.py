"""An indicium's fields in plain words, for a clerk: dollars, dates, ZIP codes."""

from __future__ import annotations

from datetime import UTC

from meter.indicium import Indicium

__all__ = ["dollars", "plain_fields"]


def dollars(mills: int) -> str:
    """Mills as dollars with all three decimals: 730 -> "$0.730"."""
    return f"${mills // 1000}.{mills % 1000:03d}"


def plain_fields(indicium: Indicium) -> dict[str, str]:
    """The fields a clerk reads, in the order a page shows them."""
    d = indicium.destination
    return {
        "postage": dollars(indicium.postage),
        "date_of_mailing": indicium.date_of_mailing.isoformat(),
        "origin": indicium.origin_zip,
        "destination": f"{d[:5]}-{d[5:9]}, delivery point {d[9:]}",
        "device": f"{indicium.device_serial} ({indicium.vendor_model}, "
        f"authorization {indicium.authorization_id})",
        "sequence": str(indicium.sequence),
        "rate": indicium.rate_category.title,
        "time_of_issue": indicium.time_of_issue.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "registers": f"ascending {dollars(indicium.ascending)}, "
        f"descending {dollars(indicium.descending)}",
        "flags": _flags(indicium),
    }


def _flags(indicium: Indicium) -> str:
    words = []
    if indicium.is_specimen:
        words.append("specimen (no postage value)")
    if indicium.is_correction:
        words.append(f"correction of piece {indicium.reference_sequence}")
    return ", ".join(words) or "none"
