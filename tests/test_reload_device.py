"""The reload protocol between the real firmware and the real provider side, on SoftHSM2:
what works, and what a hostile host, peer or user tries.

In one process for speed (the firmware over the meter's token, the provider's
`ReloadServer` over its token and the SQLite ledger); tests/test_reload_e2e.py runs the
same through the device process, the provider's HTTP service and the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meter.cli.home import Home
from meter.cli.reload_cli import ProviderUnreachable, relay_reload
from meter.errors import (
    AccessDenied,
    CertificateError,
    ConfigurationError,
    InsufficientFunds,
    InvalidInput,
    MeterError,
    ProtocolError,
)
from meter.pki.reload_certs import ProviderStatus, ProviderStatusKind, make_reload_certificate
from meter.protocol.reload_messages import Finish, Kind, Record
from meter.provider import PostalRoot, Provider
from meter.provider.ledger import TransactionState
from meter.provider.ledger_sql import SqlLedger
from meter.provider.ledger_sqlite import SqliteLedger
from meter.provider.reload_server import ReloadServer
from meter.psd.firmware import PSD
from meter.psd.services_reload import RECEIPT_APPLICATION, RELOAD_KEY_LABEL
from meter.token import Token, ensure_token
from meter.token.agreement import generate_ephemeral, shared_secret
from tests._reload_harness import AUTHORITY_USER, CUSTOMER, PROVIDER_USER, Lab, prepare_lab
from tests._reload_lab import meter_and_provider
from tests.conftest import ROLE_USERS

pytestmark = pytest.mark.softhsm


@pytest.fixture
def lab(device_home: Home) -> Lab:
    return prepare_lab(device_home)


class InProcessDevice:
    """The firmware behind DeviceClient's reload calls (what the socket would carry)."""

    def __init__(self, psd: PSD) -> None:
        self.psd = psd
        self.sent: list[bytes] = []  # what the meter sent, as the host saw it

    def reload_begin(self, amount: int) -> dict[str, Any]:
        answer = self.psd.reload_begin(amount)
        self.sent.append(bytes.fromhex(answer["message_hex"]))
        return answer

    def reload_next(self, message: bytes) -> dict[str, Any]:
        answer = self.psd.reload_next(message)
        self.sent.append(bytes.fromhex(answer["message_hex"]))
        return answer

    def reload_cancel(self) -> dict[str, Any]:
        return self.psd.reload_cancel()


@dataclass
class Parties:
    psd: PSD
    device: InProcessDevice
    server: ReloadServer
    ledger: SqlLedger
    received: list[bytes]  # what the provider sent, as the host saw it

    def send(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        message = bytes.fromhex(body["message_hex"])
        if path.endswith("/hello"):
            step = self.server.hello(message)
        else:
            step = self.server.next(bytes.fromhex(body["session_id"]), message)
        if step.message is not None:
            self.received.append(step.message)
        return step.to_json()

    def reload(self, amount: int) -> dict[str, Any]:
        return relay_reload(self.device, self.send, amount)  # type: ignore[arg-type]

    def registers(self) -> Any:
        return self.psd._require_meter().registers


@contextmanager
def parties(
    lab: Lab, status: bytes | None = None, user: tuple[str, str] = PROVIDER_USER
) -> Iterator[Parties]:
    with meter_and_provider(lab, status=status, user=user) as (psd, server, ledger):
        yield Parties(psd, InProcessDevice(psd), server, ledger, [])


def test_a_reload_credits_the_meter_and_commits_at_the_provider(lab: Lab) -> None:
    with parties(lab) as p:
        result = p.reload(25_000)
        assert result["provider_settled"] is True
        assert result["control_total"] == lab.baseline + 25_000
        assert p.registers().control_total == lab.baseline + 25_000
        txid = bytes.fromhex(result["transaction_id"])
        assert p.registers().last_credit_id == txid
        done = p.ledger.transaction(txid)
        assert done is not None and done.state is TransactionState.COMMITTED
        assert p.ledger.account(CUSTOMER).available == lab.funded - 25_000
        # The stored receipt is kept until the provider's next settle shows it committed.
        assert [o.label for o in p.psd.token.data_objects(RECEIPT_APPLICATION)] == [txid.hex()]
        second = p.reload(1_000)
        assert [o.label for o in p.psd.token.data_objects(RECEIPT_APPLICATION)] == [
            second["transaction_id"]
        ]
        assert p.ledger.credited(lab.serial) == 26_000


def test_the_provider_messages_are_encrypted_and_the_keys_stay_in_the_tokens(lab: Lab) -> None:
    with parties(lab) as p:
        p.reload(12_345)
        grant_record = Record.from_bytes(p.received[2])
        assert grant_record.kind is Kind.GRANT
        assert (12_345).to_bytes(8, "big") not in grant_record.ciphertext
        attributes = p.psd.token.key_attributes(RELOAD_KEY_LABEL, "private")
        assert attributes["sensitive"] and not attributes["extractable"]


def test_a_recorded_session_replayed_into_a_new_session_does_nothing(lab: Lab) -> None:
    with parties(lab) as p:
        p.reload(5_000)
        recorded = list(p.received)  # accept, settle, grant of the finished session
        before = p.registers()
        p.psd.reload_begin(5_000)
        with pytest.raises(ProtocolError, match="handshake signature does not verify"):
            p.psd.reload_next(recorded[0])
        p.psd.reload_begin(5_000)
        with pytest.raises(
            ProtocolError, match=r"not a reload protocol message|expected a reload accept"
        ):
            p.psd.reload_next(recorded[2])  # the old grant, where an accept belongs
        assert p.registers() == before
        # and the meter's recorded messages replayed to the provider get nowhere
        hello, finish = p.device.sent[0], p.device.sent[1]
        step = p.server.hello(hello)  # anyone may say hello; it proves nothing
        with pytest.raises(ProtocolError, match="belongs to another session"):
            p.server.next(step.session_id, finish)
        step = p.server.hello(hello)
        relabelled = Finish(step.session_id, Finish.from_bytes(finish).signature).to_bytes()
        with pytest.raises(ProtocolError, match="meter's handshake signature does not verify"):
            p.server.next(step.session_id, relabelled)
        assert p.ledger.open_transactions(lab.serial) == []


def test_an_altered_grant_is_refused_and_settled_as_not_applied(lab: Lab) -> None:
    with parties(lab) as p:
        begun = p.psd.reload_begin(4_000)
        step = p.server.hello(bytes.fromhex(begun["message_hex"]))
        finish = p.psd.reload_next(step.message or b"")
        settle = p.server.next(step.session_id, bytes.fromhex(finish["message_hex"]))
        answers = p.psd.reload_next(settle.message or b"")
        grant = p.server.next(step.session_id, bytes.fromhex(answers["message_hex"]))
        assert grant.message is not None
        altered = bytearray(grant.message)
        altered[-3] ^= 0x40
        before = p.registers()
        with pytest.raises(ProtocolError, match="does not authenticate"):
            p.psd.reload_next(bytes(altered))
        assert p.registers() == before
        with pytest.raises(ProtocolError, match="no reload session is open"):
            p.psd.reload_next(grant.message)  # the session ended with the refusal
        (prepared,) = p.ledger.open_transactions(lab.serial)
        p.reload(1_000)  # the next contact
        aborted = p.ledger.transaction(prepared.transaction_id)
        assert aborted is not None and aborted.state is TransactionState.ABORTED
        assert p.ledger.credited(lab.serial) == 1_000 == p.registers().control_total - lab.baseline


def test_an_amount_above_the_funds_is_refused_and_changes_nothing(lab: Lab) -> None:
    with parties(lab) as p:
        before = p.registers()
        with pytest.raises(InsufficientFunds):
            p.reload(lab.funded + 1)
        assert p.registers() == before
        assert p.ledger.open_transactions(lab.serial) == []
        assert p.ledger.account(CUSTOMER).available == lab.funded
        with pytest.raises(ProtocolError, match="no reload session is open"):
            p.psd.reload_next(b"")  # the relay cancelled it: nothing pending


@pytest.mark.parametrize("amount", [0, -5, True])
def test_a_zero_or_negative_amount_is_refused_before_anything(lab: Lab, amount: int) -> None:
    with parties(lab) as p:
        before = p.registers()
        with pytest.raises(InvalidInput, match="positive number of mills"):
            p.reload(amount)
        assert p.registers() == before


def test_an_unreachable_provider_is_reported_and_nothing_is_pending(lab: Lab) -> None:
    from meter.cli.reload_cli import ProviderLink

    with parties(lab) as p:
        before = p.registers()
        link = ProviderLink("http://127.0.0.1:9", timeout=2)  # discard port: nobody listens
        with pytest.raises(ProviderUnreachable, match=r"unreachable.*nothing is pending"):
            relay_reload(p.device, link.post, 5_000)  # type: ignore[arg-type]
        assert p.registers() == before
        status = p.psd.request_status()
        assert status["registers"]["control_total"] == before.control_total
        with pytest.raises(ProtocolError, match="no reload session is open"):
            p.psd.reload_next(b"")


def test_a_revoked_provider_is_refused_by_the_meter(lab: Lab) -> None:
    home = lab.home
    with home.open_token("postal-root") as token, home.open_token("provider") as ptoken:
        root = PostalRoot.open(token)
        provider = Provider.open(ptoken, home.ledger)
        revoked = ProviderStatus.issue(
            provider.certificate, ProviderStatusKind.REVOKED, root.signer(), datetime.now(UTC)
        ).to_bytes()
        stale = ProviderStatus.issue(
            provider.certificate,
            ProviderStatusKind.GOOD,
            root.signer(),
            datetime.now(UTC) - timedelta(days=30),
        ).to_bytes()
    for status, message in ((revoked, "revoked by the postal root"), (stale, "stale")):
        with parties(lab, status) as p:
            before = p.registers()
            with pytest.raises(CertificateError, match=message):
                p.reload(5_000)
            assert p.registers() == before
            assert p.ledger.open_transactions(lab.serial) == []


def test_a_meter_not_authorized_at_the_provider_is_refused(lab: Lab) -> None:
    other = lab.home.path / "other.sqlite"
    ledger = SqliteLedger(other)
    ledger.create_customer("OTHER-1", "Somebody Else", datetime.now(UTC))
    ledger.fund("OTHER-1", 10**6, "lab", datetime.now(UTC))
    ledger.close()
    wrong = Lab(lab.home, str(other), lab.status, lab.serial, lab.baseline, lab.funded)
    with parties(wrong) as p:
        with pytest.raises(AccessDenied, match="not authorized to any customer"):
            p.reload(5_000)
        assert p.ledger.open_transactions(lab.serial) == []


def test_a_hello_naming_another_meter_is_refused(lab: Lab) -> None:
    with parties(lab) as p:
        hello = bytearray(bytes.fromhex(p.psd.reload_begin(5_000)["message_hex"]))
        hello[9:17] = (lab.serial + 1).to_bytes(8, "big")  # the serial field
        with pytest.raises(CertificateError, match="the hello claims"):
            p.server.hello(bytes(hello))


def test_only_the_provider_role_reloads(lab: Lab) -> None:
    with (
        parties(lab, user=ROLE_USERS["customer"]) as p,
        pytest.raises(AccessDenied, match="Download Postage Value is not allowed"),
    ):
        p.reload(5_000)


def test_a_stamp_certificate_or_another_key_is_no_reload_certificate(lab: Lab) -> None:
    home = lab.home
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(*AUTHORITY_USER)
        with home.open_token("provider") as token:
            provider = Provider.open(token, home.ledger)
            other = ec.generate_private_key(ec.SECP256R1()).public_key()
            spki = other.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            now = datetime.now(UTC).replace(microsecond=0)
            foreign = make_reload_certificate(
                spki, lab.serial, provider.certificate, provider.signer(), now
            )
        stamp = psd._require_meter().certificates.meter  # type: ignore[union-attr]
        pem = serialization.Encoding.PEM
        with pytest.raises(CertificateError, match="does not hold this device's reload key"):
            psd.install_reload_certificate(foreign.public_bytes(pem))
        with pytest.raises(CertificateError, match="not a reload certificate"):
            psd.install_reload_certificate(stamp.public_bytes(pem))
        with pytest.raises(InvalidInput, match="not PEM"):
            psd.install_reload_certificate(b"garbage")


def test_ephemeral_ecdh_in_the_token_agrees_with_cryptography(home: Home) -> None:
    ensure_token(home.profile, home.path, "agreement", "so-pin-0001", "user-pin-0001")
    with Token.open(home.module(), "agreement", "user-pin-0001", lock_dir=home.path / "locks") as t:
        mine = generate_ephemeral(t, "test")
        peer = ec.generate_private_key(ec.SECP256R1())
        point = peer.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        z = shared_secret(t, mine, point)
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), mine.public_point)
        assert z == peer.exchange(ec.ECDH(), public)
        with pytest.raises(ProtocolError, match="derives once only"):
            shared_secret(t, mine, point)
        bad = generate_ephemeral(t, "test")
        with pytest.raises(ProtocolError, match="refused by the token"):
            shared_secret(t, bad, b"\x04" + bytes(64))  # not on the curve
        assert not t.data_objects("anything")  # nothing was stored in the token


def test_a_token_without_ecdh_refuses_reload_clearly(home: Home) -> None:
    ensure_token(home.profile, home.path, "no-ecdh", "so-pin-0001", "user-pin-0001")
    with (
        Token.open(
            home.module(),
            "no-ecdh",
            "user-pin-0001",
            lock_dir=home.path / "locks",
            capabilities=frozenset({"raw_ecdsa", "rsa_pss"}),
            profile_name="opencryptoki-like",
        ) as t,
        pytest.raises(ConfigurationError, match="needs capability ecdh_derive"),
    ):
        generate_ephemeral(t, "Download Postage Value over the reload protocol")


def test_every_refusal_is_a_meter_error() -> None:
    for kind in (ProviderUnreachable,):
        assert issubclass(kind, MeterError)


def test_a_receipt_lost_in_a_crash_survives_a_later_local_credit(lab: Lab) -> None:
    """The device stopped between the credit's register record and its receipt object, and
    the receipt never reached the provider; a local signed-grant credit then replaces the
    record's last transaction id. The receipt is kept first, so the next contact commits."""
    with parties(lab) as p:
        begun = p.psd.reload_begin(6_000)
        step = p.server.hello(bytes.fromhex(begun["message_hex"]))
        message = step.message
        for _ in range(3):  # accept -> finish, settle -> answers, grant -> receipt
            answer = p.psd.reload_next(message or b"")
            if answer["done"]:
                break
            message = p.server.next(step.session_id, bytes.fromhex(answer["message_hex"])).message
        txid = bytes.fromhex(answer["result"]["transaction_id"])
        for obj in p.psd.token.data_objects(RECEIPT_APPLICATION):
            p.psd.token.destroy(obj)  # as if the device had stopped before writing it
        provider = p.server._provider
        p.psd.download_postage_value(
            lambda request: provider.grant_credit(request, 500, datetime.now(UTC))
        )
        assert p.registers().last_credit_id != txid
        p.reload(1_000)
        committed = p.ledger.transaction(txid)
        assert committed is not None and committed.state is TransactionState.COMMITTED
        applied = p.registers().control_total - lab.baseline - 500
        assert p.ledger.credited(lab.serial) == applied == 7_000


def test_a_session_past_its_lifetime_or_unknown_is_refused(lab: Lab) -> None:
    with parties(lab) as p:
        begun = p.psd.reload_begin(5_000)
        step = p.server.hello(bytes.fromhex(begun["message_hex"]))
        started = p.psd._reload_session.begun  # type: ignore[union-attr]
        p.psd._reload_clock = lambda: started + 121
        with pytest.raises(ProtocolError, match="over its lifetime of 120 s"):
            p.psd.reload_next(step.message or b"")
        with pytest.raises(ProtocolError, match=r"no reload session .* at the provider"):
            p.server.next(bytes(16), b"")
        assert p.ledger.open_transactions(lab.serial) == []
