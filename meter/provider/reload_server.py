"""Download Postage Value over the reload protocol: the provider's side (docs/reload-protocol.md).

A state machine per session, over the accounts ledger's two-phase interface:

    hello   -> accept   (the meter's reload certificate checked; ephemeral ECDH in the
                         provider's token; the transcript signed by the provider's key)
    finish  -> settle   (the meter's signature checked; every transaction of this meter
                         still open in the ledger, to be settled before anything new)
    answers -> grant    (each open one COMMITTED on its receipt or ABORTED on the meter's
                         signed "not applied"; then the new credit PREPARED, durably)
    receipt -> outcome  (the meter's signed receipt; COMMITTED)

The provider never retries a grant: a transaction whose receipt did not come stays
PREPARED until the meter's next contact answers for it. Sessions live in memory; a
provider that restarts loses them, and the ledger's open transactions carry over.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.errors import AccessDenied, CertificateError, ConfigurationError, ProtocolError
from meter.pki.reload_certs import ProviderStatus
from meter.pki.revocation import Revocations
from meter.protocol.reload import (
    PREPARE_TIMEOUT,
    SESSION_LIFETIME,
    MeterIdentity,
    accept_message,
    check_finish,
    check_hello,
    check_statement,
)
from meter.protocol.reload_channel import (
    PROVIDER_TO_METER,
    Channel,
    session_keys,
    transcript_hash,
)
from meter.protocol.reload_messages import (
    Accept,
    Finish,
    Grant,
    Hello,
    Kind,
    Settle,
    StatementKind,
    decode_answers,
    decode_receipt,
)
from meter.provider.ledger import Ledger, TransactionState
from meter.provider.service import Provider
from meter.token.agreement import generate_ephemeral, shared_secret

__all__ = ["ReloadServer", "ReloadStep"]

Clock = Callable[[], datetime]
MAX_SESSIONS = 1024


@dataclass
class _Session:
    started: datetime
    hello: Hello
    hello_bytes: bytes
    accept_bytes: bytes
    meter: MeterIdentity
    customer: str
    shared: bytes
    step: Kind
    channel: Channel | None = None
    open_ids: tuple[bytes, ...] = ()
    granted: bytes | None = None


@dataclass(frozen=True)
class ReloadStep:
    """What the provider answers a relayed message with."""

    session_id: bytes
    message: bytes | None  # the next message for the meter; None once done
    done: bool
    result: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id.hex(),
            "message_hex": None if self.message is None else self.message.hex(),
            "done": self.done,
            "result": self.result,
        }


class ReloadServer:
    """The provider's reload sessions over its token, its certificate and its ledger."""

    def __init__(
        self,
        provider: Provider,
        ledger: Ledger,
        status: bytes,
        *,
        revocations: Revocations | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._provider = provider
        self._certificate: x509.Certificate = provider.certificate
        self._ledger = ledger
        self._status = ProviderStatus.from_bytes(status).to_bytes()
        self._revocations: Revocations | None = revocations or Revocations.empty()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._sessions: dict[bytes, _Session] = {}
        # One step at a time: the token is serialized anyway, and a meter's open
        # transactions must not be settled by two sessions at once.
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return self._clock().astimezone(UTC)

    def set_status(self, status: bytes) -> None:
        """Staple the postal root's newer status from now on (it is renewed before it goes
        stale: docs/reload-protocol.md); sessions under way keep the one they were sent."""
        parsed = ProviderStatus.from_bytes(status)
        if parsed.certificate_serial != self._certificate.serial_number:
            raise CertificateError(
                "the provider status is about another certificate than this provider's"
            )
        with self._lock:
            self._status = parsed.to_bytes()

    def set_revocations(self, revocations: Revocations | None) -> None:
        """The provider's revocation list from now on (serve rereads its file when it
        changes). None while the file is unreadable: no new session starts meanwhile, so
        a meter revoked in the damaged list gets no credit; sessions under way finish."""
        with self._lock:
            self._revocations = revocations

    # -- the steps -----------------------------------------------------------

    def hello(self, message: bytes) -> ReloadStep:
        with self._lock:
            return self._hello(message)

    def next(self, session_id: bytes, message: bytes) -> ReloadStep:
        with self._lock:
            self._expire_sessions()
            session = self._sessions.get(session_id)
            if session is None:
                raise ProtocolError(
                    f"no reload session {session_id.hex()} at the provider (it ended, timed "
                    "out, or the provider restarted): begin a new one"
                )
            try:
                if session.step is Kind.FINISH:
                    return self._on_finish(session_id, session, message)
                if session.step is Kind.ANSWERS:
                    return self._on_answers(session_id, session, message)
                return self._on_receipt(session_id, session, message)
            except BaseException:
                self._sessions.pop(session_id, None)
                raise

    def _hello(self, message: bytes) -> ReloadStep:
        now = self.now()
        self._expire_sessions()
        if len(self._sessions) >= MAX_SESSIONS:
            raise ProtocolError("the provider has too many reload sessions open; retry later")
        hello = Hello.from_bytes(message)
        meter = check_hello(hello, self._certificate, now)
        if self._revocations is None:
            raise ConfigurationError(
                "the provider's revocation list is unreadable: no reload starts until an "
                "operator repairs it (meter provider serve's error output says why)"
            )
        revoked = self._revocations.revoked_at(meter.device_serial)
        if revoked is not None and revoked <= now:
            raise CertificateError(
                f"device {meter.device_serial} is revoked (since {revoked.isoformat()}): "
                "no credit for it"
            )
        customer = self._ledger.customer_of(meter.device_serial)
        if customer is None:
            raise AccessDenied(
                f"device {meter.device_serial} is not authorized to any customer at this provider"
            )
        token = self._provider.token
        ephemeral = generate_ephemeral(token, "the provider's reload session ECDH key")
        z = shared_secret(token, ephemeral, hello.ephemeral)
        session_id = secrets.token_bytes(16)
        accept = Accept(
            session_id,
            _der(self._certificate),
            self._status,
            ephemeral.public_point,
            secrets.token_bytes(32),
        )
        signature = self._provider.signer()(accept_message(message, accept))
        signed = Accept(*_accept_fields(accept), signature=signature).to_bytes()
        self._sessions[session_id] = _Session(
            now, hello, message, signed, meter, customer, z, Kind.FINISH
        )
        return ReloadStep(session_id, signed, False, {"device_serial": meter.device_serial})

    def _on_finish(self, session_id: bytes, session: _Session, message: bytes) -> ReloadStep:
        finish = Finish.from_bytes(message)
        if finish.session_id != session_id:
            raise ProtocolError("the finish message belongs to another session")
        check_finish(session.hello_bytes, session.accept_bytes, finish, session.meter)
        keys = session_keys(
            session.shared, transcript_hash(session.hello_bytes, session.accept_bytes, message)
        )
        session.shared = b""
        session.channel = Channel(session_id, PROVIDER_TO_METER, keys)
        open_ids = tuple(
            t.transaction_id for t in self._ledger.open_transactions(session.meter.device_serial)
        )
        session.open_ids = open_ids
        session.step = Kind.ANSWERS
        record = session.channel.seal(Kind.SETTLE, Settle(open_ids).to_bytes())
        return ReloadStep(session_id, record, False, {"open_transactions": len(open_ids)})

    def _on_answers(self, session_id: bytes, session: _Session, message: bytes) -> ReloadStep:
        assert session.channel is not None
        statements = decode_answers(session.channel.open(message, Kind.ANSWERS))
        answered = {s.transaction_id: s for s in statements}
        if len(answered) != len(statements) or set(answered) != set(session.open_ids):
            raise ProtocolError(
                "the meter's answers do not cover exactly the open transactions it was asked about"
            )
        now = self.now()
        settled: dict[str, str] = {}
        for txid, statement in answered.items():
            kind = check_statement(statement, session.meter, session_id)
            if kind is StatementKind.APPLIED:
                self._ledger.commit(txid, statement.to_bytes(), now)
                settled[txid.hex()] = "committed"
            else:
                self._ledger.abort(txid, "the meter signed that it did not apply it", now)
                settled[txid.hex()] = "aborted"
        amount = session.hello.amount
        txid = secrets.token_bytes(16)
        # Durable before the grant leaves: raises (and records nothing) on insufficient funds.
        self._ledger.prepare(
            txid,
            session.customer,
            session.meter.device_serial,
            amount,
            now,
            now + PREPARE_TIMEOUT,
        )
        session.granted = txid
        session.step = Kind.RECEIPT
        grant = Grant(txid, session.meter.device_serial, amount, session.hello.nonce)
        record = session.channel.seal(Kind.GRANT, grant.to_bytes())
        return ReloadStep(
            session_id, record, False, {"settled": settled, "transaction_id": txid.hex()}
        )

    def _on_receipt(self, session_id: bytes, session: _Session, message: bytes) -> ReloadStep:
        assert session.channel is not None and session.granted is not None
        receipt = decode_receipt(session.channel.open(message, Kind.RECEIPT))
        if receipt.transaction_id != session.granted:
            raise ProtocolError("the meter's receipt is for another transaction")
        if check_statement(receipt, session.meter, session_id) is not StatementKind.APPLIED:
            raise ProtocolError("the meter's receipt does not say the credit was applied")
        transaction = self._ledger.commit(session.granted, receipt.to_bytes(), self.now())
        self._sessions.pop(session_id, None)
        return ReloadStep(
            session_id,
            None,
            True,
            {
                "transaction_id": session.granted.hex(),
                "amount": transaction.amount,
                "state": TransactionState.COMMITTED.value,
                "meter_control_total": receipt.control_total,
            },
        )

    def _expire_sessions(self) -> None:
        limit = self.now() - SESSION_LIFETIME
        for sid in [s for s, v in self._sessions.items() if v.started < limit]:
            del self._sessions[sid]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _accept_fields(accept: Accept) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    return (
        accept.session_id,
        accept.provider_certificate,
        accept.provider_status,
        accept.ephemeral,
        accept.nonce,
    )
