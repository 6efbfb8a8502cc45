"""The normalized destination address and its digest (spec: "Normalized destination address")."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

from meter.errors import InvalidInput

# Every code point with the Unicode White_Space property (PropList.txt,
# unchanged since Unicode 6.3). Not str.isspace(): that also counts
# U+001C..U+001F, which are not White_Space and so stay inside a line.
WHITE_SPACE = (
    "\u0009\u000a\u000b\u000c\u000d"  # tab, LF, VT, FF, CR
    "\u0020\u0085\u00a0\u1680"  # space, next line, no-break space, ogham space mark
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"  # en quad..hair space
    "\u2028\u2029\u202f\u205f\u3000"  # line/paragraph separator, narrow nbsp, math, ideographic
)
_TO_SPACE = str.maketrans(dict.fromkeys(WHITE_SPACE, " "))

DIGEST_LENGTH = 8


def normalize_address(address: str | Sequence[str]) -> bytes:
    """The UTF-8 bytes whose SHA-256 the indicium's address digest carries."""
    lines = _split_lines(address)
    kept = []
    for line in lines:
        # NFKC, then full upper case (ß -> SS), then white space runs to one space.
        words = unicodedata.normalize("NFKC", line).upper().translate(_TO_SPACE).split(" ")
        normalized = " ".join(word for word in words if word)
        if normalized:
            kept.append(normalized)
    return "\n".join(kept).encode("utf-8")


def address_digest(address: str | Sequence[str]) -> bytes:
    """First 8 bytes of SHA-256 over the normalized address."""
    return hashlib.sha256(normalize_address(address)).digest()[:DIGEST_LENGTH]


def _split_lines(address: str | Sequence[str]) -> list[str]:
    # One text breaks at LF, CR LF or CR only; a list's elements are the
    # lines, and a break inside one is white space like any other.
    if isinstance(address, str):
        return address.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if isinstance(address, bytes | bytearray) or not all(isinstance(x, str) for x in address):
        raise InvalidInput("an address is text or a list of text lines, not bytes")
    return list(address)
