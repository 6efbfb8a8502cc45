"""The verdict table (spec: "Verdicts"), one indicium or a batch at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from functools import partial
from operator import attrgetter

from cryptography.exceptions import InvalidSignature

from meter.errors import MalformedIndicium, ReplayStoreError
from meter.indicium import MAX_ADVANCE_DAYS, SIGNED_LENGTH, Indicium, decode
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice.replay import Piece, ReplayStore
from meter.postoffice.verdict import Verdict, VerificationResult

MAX_DAYS_AHEAD = 1  # date of mailing at most this many days after the verifier's date
MAX_AGE_DAYS = 183  # ... and at most this many days before it

_PIECE_FIELDS = attrgetter("device_serial", "sequence", "date_of_mailing")
_new_piece: Callable[[tuple[int, int, date]], Piece] = partial(tuple.__new__, Piece)


class Verifier:
    """Judges indicia against one trust store, revocation list, replay store and date."""

    def __init__(
        self, trust: TrustStore, revocations: Revocations, replay: ReplayStore, today: date
    ) -> None:
        self._trust = trust
        self._revocations = revocations
        self._replay = replay
        self._today = today
        self._today_ordinal = today.toordinal()

    @property
    def today(self) -> date:
        return self._today

    def verify(self, data: bytes) -> VerificationResult:
        return self.verify_batch([data])[0]

    def verify_batch(
        self, items: Sequence[bytes], *, record: bool = True
    ) -> list[VerificationResult]:
        """The verdicts verify() would give in order, with one replay store call.

        With ``record=False`` the replay store is only asked (``seen``), never
        written: VALID then means "genuine and not accepted yet", and a later
        verification of the same piece can still be VALID.
        """
        outcomes = [self.judge(bytes(data)) for data in items]
        reached = [o for o in outcomes if isinstance(o, Indicium)]
        decided = iter(self.check_replay(reached, record=record) if reached else [])
        return [next(decided) if isinstance(o, Indicium) else o for o in outcomes]

    def check_replay(
        self, reached: list[Indicium], *, record: bool = True
    ) -> list[VerificationResult]:
        """The DUPLICATE and VALID rows: one check-and-set (or look) for the pieces that got there."""
        # In C: three attributes at once, and the tuple made a Piece without the
        # Python-level __new__ of a named tuple (a third of a microsecond each).
        pieces = list(map(_new_piece, map(_PIECE_FIELDS, reached)))
        try:
            seen = self._replay.check_and_set(pieces) if record else self._replay.seen(pieces)
            if len(seen) != len(pieces):
                raise ReplayStoreError(
                    f"replay store answered {len(seen)} flags for {len(pieces)} pieces"
                )
        except ReplayStoreError as exc:
            reason = f"replay store failed, piece not accepted: {exc}"
            return [VerificationResult(Verdict.ERROR, reason, i) for i in reached]
        after = _after_replay if record else _after_look
        return [after(i, old) for i, old in zip(reached, seen, strict=True)]

    def judge(self, data: bytes) -> VerificationResult | Indicium:
        """Every row before DUPLICATE; an Indicium back means it reached that row."""
        try:
            indicium = decode(data)
        except MalformedIndicium as exc:
            return VerificationResult(Verdict.MALFORMED, f"malformed: {exc}", None)
        candidates = self._trust.candidates(indicium.key_id)
        if not candidates:
            return VerificationResult(
                Verdict.UNKNOWN_DEVICE,
                f"no certificate with key id {indicium.key_id.hex()} reaches the postal root",
                indicium,
            )
        credential = candidates[0]
        serial = indicium.device_serial
        if credential.device_serial != serial:
            return _forged(
                indicium,
                f"key id {indicium.key_id.hex()} is certified for device "
                f"{credential.device_serial}, not {serial}",
            )
        if credential.authorization_id != indicium.authorization_id:
            return _forged(
                indicium,
                f"device {serial} is authorized by {credential.authorization_id}, "
                f"not {indicium.authorization_id}",
            )
        issued = indicium.time_of_issue
        if not credential.valid_from <= issued <= credential.valid_until:
            return _forged(
                indicium,
                f"time of issue {issued.isoformat()} lies outside the validity of the "
                f"certificate chain of device {serial} ({credential.valid_from.isoformat()} "
                f"to {credential.valid_until.isoformat()})",
            )
        try:
            credential.verifying_key.verify(
                indicium.algorithm, data[:SIGNED_LENGTH], indicium.signature
            )
        except InvalidSignature:
            return _forged(
                indicium,
                f"signature does not verify under the meter certificate of device {serial}",
            )
        revoked = self._revocations.revoked_at(serial)
        if revoked is not None and revoked < issued:
            return VerificationResult(
                Verdict.REVOKED,
                f"device {serial} was revoked at {revoked.isoformat()}, before the time of "
                f"issue {issued.isoformat()}",
                indicium,
            )
        return self._judge_dates(indicium)

    def _judge_dates(self, indicium: Indicium) -> VerificationResult | Indicium:
        mailing = indicium.date_of_mailing
        d = mailing.toordinal()
        t = indicium.time_of_issue.toordinal()  # the UTC calendar date of the time of issue
        v = self._today_ordinal
        if d - v > MAX_DAYS_AHEAD:
            return _not_yet_valid(
                indicium, f"date of mailing {mailing} is more than 1 day after {self._today}"
            )
        if d - t > MAX_ADVANCE_DAYS:
            return _not_yet_valid(
                indicium,
                f"date of mailing {mailing} is more than {MAX_ADVANCE_DAYS} days after the "
                f"time of issue {indicium.time_of_issue.isoformat()} (advance dating)",
            )
        if d < t:
            return _not_yet_valid(
                indicium,
                f"date of mailing {mailing} is before the time of issue "
                f"{indicium.time_of_issue.isoformat()}",
            )
        if v - d > MAX_AGE_DAYS:
            return VerificationResult(
                Verdict.EXPIRED,
                f"date of mailing {mailing} is more than {MAX_AGE_DAYS} days before {self._today}",
                indicium,
            )
        if indicium.is_specimen:
            return VerificationResult(
                Verdict.SPECIMEN, "specimen indicium: no postage value", indicium
            )
        return indicium


def _after_replay(indicium: Indicium, seen: bool) -> VerificationResult:
    if seen:
        piece = f"device {indicium.device_serial} piece {indicium.sequence}"
        return VerificationResult(Verdict.DUPLICATE, f"{piece} was already accepted", indicium)
    return VerificationResult(Verdict.VALID, "every check passed", indicium)


def _after_look(indicium: Indicium, seen: bool) -> VerificationResult:
    if seen:
        return _after_replay(indicium, seen)
    return VerificationResult(
        Verdict.VALID, "every check passed; not accepted yet (nothing was recorded)", indicium
    )


def _forged(indicium: Indicium, reason: str) -> VerificationResult:
    return VerificationResult(Verdict.FORGED, reason, indicium)


def _not_yet_valid(indicium: Indicium, reason: str) -> VerificationResult:
    return VerificationResult(Verdict.NOT_YET_VALID, reason, indicium)
