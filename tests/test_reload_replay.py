"""A reload session recorded with one meter and replayed into another: refused, nothing changes.

Meter A and meter B have the same postal root and the same provider (B's home holds copies
of A's root and provider tokens: the same keys), and both are authorized to the customer,
so nothing but the session binding stops the replay. What the provider sent A in a real
session (accept, settle, grant) is played to B, each where B's own live session with that
provider expects that message. B refuses each with a clear error; its registers, its
pending state and the provider's ledger are as they were.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from meter.cli.home import Home
from meter.errors import ProtocolError
from meter.protocol.reload_messages import Record
from meter.provider.ledger_sql import open_ledger
from meter.provider.reload_server import ReloadServer, ReloadStep
from meter.psd.services_reload import RECEIPT_APPLICATION
from tests._reload_lab import CUSTOMER, meter_and_provider, prepare_lab, second_meter

pytestmark = pytest.mark.softhsm

METER_B = 983973031310


def _to_provider(server: ReloadServer, step: ReloadStep, answer: dict[str, object]) -> ReloadStep:
    return server.next(step.session_id, bytes.fromhex(str(answer["message_hex"])))


def test_a_session_recorded_with_one_meter_is_refused_by_another(
    device_home: Home, tmp_path: Path
) -> None:
    lab = prepare_lab(device_home)
    with meter_and_provider(lab) as (psd, server, _):  # meter A's real session
        begun = psd.reload_begin(5_000)
        step = server.hello(bytes.fromhex(begun["message_hex"]))
        sent = [step.message]
        answer = psd.reload_next(step.message or b"")
        while not answer["done"]:
            reply = _to_provider(server, step, answer)
            sent.append(reply.message)
            answer = psd.reload_next(reply.message or b"")
        _to_provider(server, step, answer)  # the receipt: committed
        accept, settle, grant = (m or b"" for m in sent)

    home_b = second_meter(lab.home, tmp_path / "home-b", METER_B)
    ledger = open_ledger(lab.ledger)
    try:
        ledger.authorize_meter(CUSTOMER, METER_B, datetime.now(UTC))
        books = (ledger.totals(), ledger.account(CUSTOMER), ledger.credited_totals())
    finally:
        ledger.close()

    with meter_and_provider(lab, home_b) as (psd, server, ledger):
        registers = psd._require_meter().registers
        assert psd._require_meter().identity.device_serial == METER_B

        def live_session() -> tuple[ReloadStep, dict[str, object]]:
            """B's own session with the provider, up to the provider's settle."""
            begun = psd.reload_begin(5_000)
            step = server.hello(bytes.fromhex(begun["message_hex"]))
            return step, psd.reload_next(step.message or b"")

        # A's accept where B expects its provider's accept: signed over A's hello.
        psd.reload_begin(5_000)
        with pytest.raises(ProtocolError, match="handshake signature does not verify"):
            psd.reload_next(accept)
        # A's settle where B expects the settle (the provider's own one withheld).
        step, finish = live_session()
        _to_provider(server, step, finish)
        with pytest.raises(ProtocolError, match="belongs to session"):
            psd.reload_next(settle)
        # A's grant where B expects its grant, as recorded and relabelled with B's session
        # id: B's answers were never passed on, so the provider prepared nothing for it.
        for relabel, refusal in ((False, "belongs to session"), (True, "does not authenticate")):
            step, finish = live_session()
            b_settle = _to_provider(server, step, finish)
            psd.reload_next(b_settle.message or b"")  # B's answers: the host keeps them
            old = Record.from_bytes(grant)
            replayed = Record(step.session_id, old.kind, old.counter, old.ciphertext)
            with pytest.raises(ProtocolError, match=refusal):
                psd.reload_next(replayed.to_bytes() if relabel else grant)

        # Nothing changed on B: its registers, nothing pending, no receipt kept.
        assert psd._require_meter().registers == registers
        with pytest.raises(ProtocolError, match="no reload session is open"):
            psd.reload_next(grant)
        assert psd.token.data_objects(RECEIPT_APPLICATION) == []
        assert psd.request_status()["registers"]["control_total"] == registers.control_total
        # Nor at the provider: no transaction of B's, the books as before.
        assert ledger.open_transactions(METER_B) == []
        assert (ledger.totals(), ledger.account(CUSTOMER), ledger.credited_totals()) == books
