"""Register arithmetic and record format: pure, no token."""

from __future__ import annotations

import pytest

from meter.errors import InsufficientFunds, InvalidInput, RegisterCorrupt
from meter.psd.registers import NO_NONCE, RECORD_LENGTH, Registers

NONCE = bytes(range(1, 17))


def funded(amount: int = 10_000) -> Registers:
    return Registers.initial(42).with_nonce(NONCE).credit(amount, NONCE, b"t" * 16)


def test_debit_moves_postage_between_registers_and_counts_pieces() -> None:
    r = funded().debit(730)
    assert (r.ascending, r.descending, r.control_total, r.sequence) == (730, 9_270, 10_000, 1)
    r.check()


def test_debit_beyond_descending_is_refused() -> None:
    r = funded(500)
    with pytest.raises(InsufficientFunds, match="exceeds the descending register"):
        r.debit(501)


def test_specimen_debit_of_zero_still_takes_a_sequence() -> None:
    r = funded().debit(0)
    assert (r.sequence, r.ascending) == (1, 0)


def test_credit_needs_the_outstanding_nonce_and_consumes_it() -> None:
    pending = Registers.initial(42).with_nonce(NONCE)
    credited = pending.credit(5_000, NONCE, b"a" * 16)
    assert credited.credit_nonce == NO_NONCE
    with pytest.raises(InvalidInput, match="replayed"):
        credited.credit(5_000, NONCE, b"a" * 16)
    with pytest.raises(InvalidInput, match="replayed"):
        pending.credit(5_000, bytes(16 * [9]), b"a" * 16)
    with pytest.raises(InvalidInput, match="positive"):
        pending.credit(0, NONCE, b"a" * 16)


def test_every_change_is_a_new_generation() -> None:
    r0 = Registers.initial(1)
    r1 = r0.with_nonce(NONCE)
    r2 = r1.credit(10, NONCE, b"x" * 16)
    r3 = r2.debit(5)
    assert [r.generation for r in (r0, r1, r2, r3)] == [1, 2, 3, 4]


def test_record_round_trip_and_corruption() -> None:
    r = funded().debit(123)
    body = r.body()
    parsed, parsed_body, mac = Registers.parse(body + b"m" * 32)
    assert parsed == r and parsed_body == body and mac == b"m" * 32
    assert len(body) + 32 == RECORD_LENGTH
    with pytest.raises(RegisterCorrupt):
        Registers.parse(body)
    with pytest.raises(RegisterCorrupt):
        Registers.parse(b"XREG" + body[4:] + b"m" * 32)


def test_conservation_violation_is_corrupt() -> None:
    bad = Registers(1, 1, 10, 10, 25, 0)
    with pytest.raises(RegisterCorrupt, match="control total"):
        bad.check()
