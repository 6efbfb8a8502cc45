"""Create Indicium for a batch: what a host sends, what the device answers, and the limits.

A batch is a list of Create Indicium requests (meter.protocol.issue) that the
device debits in one durable register write and releases together, with
consecutive piece sequences (docs/device.md, "Batches"). A host with more
pieces than one batch takes splits them (`split_batches`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from meter.errors import InvalidInput, ProtocolError
from meter.indicium import Indicium, decode
from meter.protocol.issue import IssueRequest

__all__ = [
    "MAX_BATCH_PIECES",
    "MAX_BATCH_REQUEST_BYTES",
    "BatchResult",
    "batch_body",
    "require_pieces",
    "split_batches",
]

# Pieces per device call: a batch of 1,000 takes the device about a quarter of a second,
# so other clients do not wait long behind it, and its request stays well under the limit.
MAX_BATCH_PIECES = 1000
# The body limit of the batch route only (every other route keeps 64 KiB): 1,000 pieces of
# a 3-line address are ~300 KB; this leaves each piece 4 KiB on average.
MAX_BATCH_REQUEST_BYTES = 4 * 1024 * 1024


def batch_body(requests: Sequence[IssueRequest]) -> dict[str, Any]:
    """The body of ``POST /v1/indicia/batch``."""
    return {"pieces": [r.to_json() for r in requests]}


def split_batches(
    requests: Sequence[IssueRequest], limit: int = MAX_BATCH_PIECES
) -> Iterator[tuple[int, Sequence[IssueRequest]]]:
    """Consecutive device batches of at most ``limit`` pieces whose bodies fit the request
    limit, each with the index of its first piece in ``requests``."""
    start = 0
    while start < len(requests):
        end, size = start, 0
        while end < len(requests) and end - start < limit:
            piece = len(json.dumps(requests[end].to_json(), default=str)) + 2
            if end > start and size + piece > MAX_BATCH_REQUEST_BYTES - 64:
                break
            size += piece
            end += 1
        yield start, requests[start:end]
        start = end


@dataclass(frozen=True)
class BatchResult:
    """What the device released for one batch, in order."""

    indicia: tuple[Indicium, ...]

    @property
    def first_sequence(self) -> int:
        return self.indicia[0].sequence

    @property
    def last_sequence(self) -> int:
        return self.indicia[-1].sequence

    @property
    def total_postage(self) -> int:
        return sum(i.postage for i in self.indicia)

    @classmethod
    def from_json(cls, answer: Any, asked: int) -> BatchResult:
        """The device's answer, checked: ``asked`` indicia with consecutive sequences."""
        try:
            hexes = answer["indicia_hex"]
            indicia = tuple(decode(bytes.fromhex(h)) for h in hexes)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("the device's batch answer does not decode") from exc
        if len(indicia) != asked:
            raise ProtocolError(f"the device answered {len(indicia)} indicia for {asked} pieces")
        first = indicia[0].sequence if indicia else 0
        if any(ind.sequence != first + i for i, ind in enumerate(indicia)):
            raise ProtocolError("the device's batch does not have consecutive sequences")
        return cls(indicia)


def require_pieces(count: int) -> None:
    """Refuse an empty batch or one larger than a device call takes."""
    if not 0 < count <= MAX_BATCH_PIECES:
        raise InvalidInput(
            f"a batch has 1 to {MAX_BATCH_PIECES} pieces, not {count}: split it into "
            "several batches"
        )
