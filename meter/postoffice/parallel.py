"""Batch verification on every core: decode and judge in forked workers, replay in the parent.

Each window of input goes to a pool of worker processes that read it (hex,
label image path, raw bytes or image bytes), decode barcodes with zxing-cpp
and run Verifier.judge (every verdict row before DUPLICATE; pure, no store).
The parent then makes one replay-store call for the window's pieces that got
that far, records the genuine ones in the register ledger, and yields the
results in input order. While the parent does that, the workers already work
on the next window.

Workers are forked when the engine is entered: enter it before opening any
replay store, ledger or network client, so that no worker holds a copy of
their file descriptors or locks (and before starting threads).
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Self, TypeAlias

from meter.errors import BarcodeError, MalformedIndicium
from meter.indicium import Indicium, decode
from meter.label import decode_image
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice.reconcile import RegisterLedger
from meter.postoffice.replay import MemoryReplayStore, ReplayStore
from meter.postoffice.verdict import Verdict, VerificationResult
from meter.postoffice.verifier import Verifier

__all__ = ["BatchEngine", "Item", "LabelImage", "Verified", "read_item"]

DEFAULT_WINDOW = 2048  # items per replay-store call (one fsync) and per hand-out to workers

_HEX = re.compile(r"[0-9a-fA-F\s]*")


@dataclass(frozen=True, slots=True)
class LabelImage:
    """The encoded bytes of a label image (PNG, JPEG...), e.g. an upload."""

    data: bytes


# A line of text (hex indicium or the path of a label image), indicium bytes, the path
# of a label image, or an image's bytes.
Item: TypeAlias = str | bytes | Path | LabelImage


@dataclass(frozen=True, slots=True)
class Verified:
    """One input item and its verdict."""

    item: Item
    result: VerificationResult


def read_item(item: Item) -> bytes | VerificationResult:
    """The indicium bytes an item holds, or the verdict for input that holds none.

    A line that is neither hexadecimal nor the path of a file is MALFORMED; a
    file or image without a readable barcode is ERROR with the reason (it is
    not an indicium that could be judged, and it changes no store).
    """
    if isinstance(item, bytes):
        return item
    if isinstance(item, LabelImage):
        return _decode_label(item.data)
    if isinstance(item, Path):
        return _decode_label(item)
    text = item.strip()
    if _HEX.fullmatch(text):
        compact = "".join(text.split())
        if len(compact) % 2:
            return VerificationResult(
                Verdict.MALFORMED, "malformed: odd number of hexadecimal digits", None
            )
        return bytes.fromhex(compact)
    path = Path(text)
    if not path.is_file():
        return VerificationResult(
            Verdict.MALFORMED,
            "malformed: neither hexadecimal nor the path of a label image file",
            None,
        )
    return _decode_label(path)


def _decode_label(source: Path | bytes) -> bytes | VerificationResult:
    try:
        return decode_image(source)
    except BarcodeError as exc:  # the message names the image
        return VerificationResult(Verdict.ERROR, str(exc), None)


# What judging one item gives: a verdict, or a piece that reached the DUPLICATE row as
# its bytes and, when judged in this process, its decoded form (a worker sends only
# the bytes: cheaper to send, and decoding again is quick).
_Outcome: TypeAlias = VerificationResult | tuple[bytes, Indicium | None]

_worker_judge: Verifier | None = None  # set in each worker process by _start_worker


def _start_worker(judge: Verifier) -> None:
    global _worker_judge
    _worker_judge = judge


def _judge_in_worker(item: Item) -> _Outcome:
    assert _worker_judge is not None, "worker started without a verifier"
    data = read_item(item)
    if isinstance(data, VerificationResult):
        return data
    outcome = _worker_judge.judge(data)
    return (bytes(data), None) if isinstance(outcome, Indicium) else outcome


class BatchEngine:
    """Verifies streams of items on ``workers`` processes (1: in this process)."""

    def __init__(
        self,
        trust: TrustStore,
        revocations: Revocations,
        today: date,
        workers: int | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self._trust = trust
        self._revocations = revocations
        self._today = today
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.window = window
        # judge() never touches the replay store: a memory one stands in.
        self._judge = Verifier(trust, revocations, MemoryReplayStore(), today)
        self._pool: Executor | None = None

    def __enter__(self) -> Self:
        if self.workers > 1 and self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(self._judge,),
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def verify(
        self,
        items: Iterable[Item],
        replay: ReplayStore,
        ledger: RegisterLedger | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Verified]:
        """Every item's verdict, in input order; one replay-store call per window.

        A window's genuine pieces go to the ledger after its results have been
        yielded (a verdict is never held back by the ledger; a piece the
        ledger then misses is a gap, which reconciliation allows). Consume
        the iterator to the end. ``progress`` gets the count of each window done.
        """
        checker = Verifier(self._trust, self._revocations, replay, self._today)
        pending: tuple[list[Item], Callable[[], list[_Outcome]]] | None = None
        for window in _windows(items, self.window):
            submitted = (window, self._submit(window))  # workers start on it now
            if pending is not None:
                yield from self._finish(*pending, checker, ledger, progress)
            pending = submitted
        if pending is not None:
            yield from self._finish(*pending, checker, ledger, progress)

    def _submit(self, window: list[Item]) -> Callable[[], list[_Outcome]]:
        if self._pool is None:
            return lambda: [self._judge_here(item) for item in window]
        chunk = max(1, len(window) // (self.workers * 4))
        results = self._pool.map(_judge_in_worker, window, chunksize=chunk)
        return lambda: list(results)

    def _judge_here(self, item: Item) -> _Outcome:
        data = read_item(item)
        if isinstance(data, VerificationResult):
            return data
        outcome = self._judge.judge(data)
        return (data, outcome) if isinstance(outcome, Indicium) else outcome

    def _finish(
        self,
        window: list[Item],
        outcomes_of: Callable[[], list[_Outcome]],
        checker: Verifier,
        ledger: RegisterLedger | None,
        progress: Callable[[int], None] | None,
    ) -> Iterator[Verified]:
        outcomes = outcomes_of()
        raw = [o[0] if isinstance(o, tuple) else None for o in outcomes]
        decided = [_as_indicium(o) for o in outcomes]
        reached = [o for o in decided if isinstance(o, Indicium)]
        replayed = iter(checker.check_replay(reached) if reached else [])
        results = [next(replayed) if isinstance(o, Indicium) else o for o in decided]
        for item, result in zip(window, results, strict=True):
            yield Verified(item, result)
        if progress is not None:
            progress(len(window))
        if ledger is not None:
            ledger.record(results, raw)


def _as_indicium(outcome: _Outcome) -> VerificationResult | Indicium:
    if not isinstance(outcome, tuple):
        return outcome
    data, indicium = outcome
    if indicium is not None:
        return indicium
    try:
        return decode(data)
    except MalformedIndicium as exc:  # a worker decoded these very bytes: cannot happen
        return VerificationResult(Verdict.MALFORMED, f"malformed: {exc}", None)


def _windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Non-blank items in lists of ``size``; blank lines are skipped."""
    window: list[Item] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window
