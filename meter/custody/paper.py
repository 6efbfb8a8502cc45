"""A share on paper: its SLIP-39 words and metadata as a text sheet to print, and back.

The sheet (format ``meter-custody-paper/1``) is plain text so that any printer, or a pen,
can carry it; `from_paper` reads a sheet typed back in (the numbers before the words and
the spacing do not matter) and refuses it if its fingerprint does not match what was
typed, so a mis-typed word or field shows before the share is used. The words carry
SLIP-39's RS1024 checksum as well.
"""

from __future__ import annotations

import re

from meter.custody.shares import CustodyShare, slip39_layout
from meter.errors import CustodyError

__all__ = ["PAPER_FORMAT", "from_paper", "to_paper"]

PAPER_FORMAT = "meter-custody-paper/1"
_WORDS_PER_LINE = 4
_FIELD = re.compile(r"^\s*([a-z ]+?)\s*:\s*(.*?)\s*$")
_GROUP = re.compile(r"^(.+) \(group (\d+)\), member (\d+) of (\d+)$")


def to_paper(share: CustodyShare) -> str:
    """The printable sheet: who holds what, the rule, the numbered words, the fingerprint."""
    member_threshold, group_threshold, group_count = slip39_layout(share)
    words = share.words
    lines = [
        "METER KEY CUSTODY SHARE (SLIP-39) - SECRET: keep it where only you can reach it",
        f"format      : {PAPER_FORMAT}",
        f"ceremony    : {share.ceremony}",
        f"group       : {share.group} (group {share.group_index + 1}), member {share.member} of {share.members}",
        f"rule        : {member_threshold} of this group's shares, {group_threshold} of {group_count} groups",
        f"check       : {share.check.hex()}",
        f"fingerprint : {share.fingerprint}",
        f"words       : {len(words)}",
        "",
    ]
    for start in range(0, len(words), _WORDS_PER_LINE):
        row = words[start : start + _WORDS_PER_LINE]
        lines.append(
            "  ".join(f"{start + i + 1:>2} {word:<10}" for i, word in enumerate(row)).rstrip()
        )
    lines.append("")
    return "\n".join(lines)


def from_paper(text: str) -> CustodyShare:
    """The share a sheet (as `to_paper` printed it) was typed back in as."""
    fields: dict[str, str] = {}
    words: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("METER KEY CUSTODY SHARE"):
            continue
        match = _FIELD.match(line)
        if match:  # "name : value"; word lines hold no colon
            fields[match.group(1)] = match.group(2)
            continue
        tokens = line.split()
        for token in tokens:
            if token.isdigit():
                continue  # the word's position, printed for the custodian
            if not token.isalpha():
                raise CustodyError(f"line {number} of the sheet holds {token!r}: not a word")
            words.append(token.lower())
    missing = [
        key
        for key in ("format", "ceremony", "group", "check", "fingerprint", "words")
        if key not in fields
    ]
    if missing:
        raise CustodyError(f"the sheet lacks the field(s) {', '.join(missing)}")
    if fields["format"] != PAPER_FORMAT:
        raise CustodyError(f"the sheet is format {fields['format']!r}, not {PAPER_FORMAT}")
    group = _GROUP.match(fields["group"])
    if not group:
        raise CustodyError(
            f"the sheet's group line {fields['group']!r} is not 'NAME (group N), member M of K'"
        )
    if not fields["words"].isdigit() or int(fields["words"]) != len(words):
        raise CustodyError(
            f"the sheet says {fields['words']} words but {len(words)} were given: one is missing or extra"
        )
    try:
        check = bytes.fromhex(fields["check"])
    except ValueError:
        raise CustodyError("the sheet's check value is no hex string") from None
    share = CustodyShare(
        ceremony=fields["ceremony"],
        group=group.group(1),
        group_index=int(group.group(2)) - 1,
        member=int(group.group(3)),
        members=int(group.group(4)),
        check=check,
        mnemonic=" ".join(words),
    )
    slip39_layout(share)  # the words' own checksum first: it names the fault more exactly
    if share.fingerprint != fields["fingerprint"].lower():
        raise CustodyError(
            "the sheet's fingerprint does not match its fields and words: "
            "a field or word was mis-typed (the words' own checksum holds)"
        )
    return share
