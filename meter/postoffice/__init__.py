"""The post office: verdicts on indicia, replay stores, batch verification."""

from collections.abc import Iterable, Iterator
from pathlib import Path

from meter.postoffice.replay import EmbeddedReplayStore, MemoryReplayStore, Piece, ReplayStore
from meter.postoffice.replay_redis import RedisReplayStore
from meter.postoffice.verdict import Verdict, VerificationResult
from meter.postoffice.verifier import Verifier

__all__ = [
    "EmbeddedReplayStore",
    "MemoryReplayStore",
    "Piece",
    "RedisReplayStore",
    "ReplayStore",
    "Verdict",
    "VerificationResult",
    "Verifier",
    "open_replay_store",
    "verify_hex_lines",
]


def open_replay_store(location: str | Path) -> ReplayStore:
    """A redis:// (or rediss://, unix://) URL opens Redis or Redis Cluster; anything else is
    the folder of an embedded store."""
    if isinstance(location, str) and location.startswith(("redis://", "rediss://", "unix://")):
        return RedisReplayStore.from_url(location)
    return EmbeddedReplayStore.open(Path(location))


def verify_hex_lines(
    lines: Iterable[str], verifier: Verifier, batch_size: int = 512
) -> Iterator[VerificationResult]:
    """One hex indicium per line, in order; blank lines skipped, non-hex MALFORMED.

    Lines go through verify_batch in groups of batch_size: one replay store
    call (one fsync) per group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    # Each slot holds bytes to verify, or the result for a line that is not hex.
    slots: list[bytes | VerificationResult] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            slots.append(bytes.fromhex(text))
        except ValueError:
            reason = f"malformed: line {number} is not hexadecimal"
            slots.append(VerificationResult(Verdict.MALFORMED, reason, None))
        if len(slots) >= batch_size:
            yield from _flush(slots, verifier)
            slots = []
    if slots:
        yield from _flush(slots, verifier)


def _flush(
    slots: list[bytes | VerificationResult], verifier: Verifier
) -> Iterator[VerificationResult]:
    verified = iter(verifier.verify_batch([s for s in slots if isinstance(s, bytes)]))
    for slot in slots:
        yield next(verified) if isinstance(slot, bytes) else slot
