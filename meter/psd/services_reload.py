"""Download Postage Value over the reload protocol: the meter's side (docs/reload-protocol.md).

The device has no network: a host relays opaque messages between this state
machine and the provider's service, and everything it carries is authenticated.
``reload_begin`` makes the hello (an ephemeral ECDH key in the token, a fresh
nonce); ``reload_next`` takes each provider message and answers the next one:

    accept  -> finish   (provider checked; the meter's signature; session keys)
    settle  -> answers  (a signed statement for each transaction still open at the
                         provider: the stored receipt, or "not applied")
    grant   -> receipt  (the credit, durable with its transaction id in the register
                         record and its signed receipt in the token)

One session at a time, in this process's memory only, for at most
SESSION_LIFETIME; any refusal ends it. Nothing durable changes before the grant,
so a refused or abandoned session leaves nothing pending. The reload key (Authorize
PSD: generated in the token, certified by the provider) signs only handshakes and
statements; the stamp-signing key never takes part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.errors import CertificateError, DeviceLocked, InvalidInput, ProtocolError
from meter.pki.reload_certs import check_reload_certificate
from meter.protocol.reload import (
    SESSION_LIFETIME,
    check_accept,
    finish_message,
    statement_message,
)
from meter.protocol.reload_channel import (
    METER_TO_PROVIDER,
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
    Statement,
    StatementKind,
    encode_answers,
    encode_receipt,
)
from meter.psd.device import Meter
from meter.psd.firmware_core import FirmwareCore
from meter.psd.registers import NO_NONCE
from meter.psd.roles import Service
from meter.token import DataObject, KeyAlgorithm, Token
from meter.token.agreement import EphemeralKey, destroy, generate_ephemeral, shared_secret

__all__ = [
    "RECEIPT_APPLICATION",
    "RELOAD_CERT_APPLICATION",
    "RELOAD_KEY_LABEL",
    "ReloadServices",
    "keep_last_receipt",
]

RELOAD_KEY_LABEL = "reload-auth"
RELOAD_CERT_APPLICATION = "meter.reload-certificate"
RECEIPT_APPLICATION = "meter.reload-receipt"
MAX_RELOAD = 2**40 - 1


def boot_clock() -> float:
    """Seconds on CLOCK_BOOTTIME: it counts a suspended machine, so a session cannot sleep
    through its lifetime."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class _Session:
    begun: float
    amount: int
    hello: bytes
    nonce: bytes
    ephemeral: EphemeralKey
    step: Kind  # the provider message expected next
    session_id: bytes = b""
    channel: Channel | None = None


class ReloadServices(FirmwareCore):
    _reload_session: _Session | None = None
    _reload_clock = staticmethod(boot_clock)

    # -- Authorize PSD (Certificate Authority): the reload key and its certificate ----

    def reload_key(self) -> dict[str, Any]:
        """The meter's reload key (P-256, in the token, signs handshakes only): made once."""
        with self._service(Service.AUTHORIZE_PSD, step="reload-key") as out:
            meter = self._require_meter()
            self._reload_capable()
            if not self.token.has_key(RELOAD_KEY_LABEL):
                self.token.generate_signing_keypair(RELOAD_KEY_LABEL, KeyAlgorithm.ECDSA_P256)
                self.token.make_durable()
            spki = self.token.public_key_spki(RELOAD_KEY_LABEL)
            out["device_serial"] = meter.identity.device_serial
        return {"public_key_spki_hex": spki.hex(), "device_serial": meter.identity.device_serial}

    def install_reload_certificate(self, pem: bytes) -> dict[str, Any]:
        """The provider's certificate of the reload key; replaces an older one."""
        with self._service(Service.AUTHORIZE_PSD, step="reload-certificate") as out:
            meter = self._require_meter()
            certs = _certified(meter)
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError as exc:
                raise InvalidInput(f"the reload certificate is not PEM: {exc}") from exc
            self._check_reload_certificate(meter, cert, certs)
            old = self.token.data_objects(RELOAD_CERT_APPLICATION)
            self.token.create_data(
                RELOAD_CERT_APPLICATION, "reload", cert.public_bytes(serialization.Encoding.DER)
            )
            for obj in old:
                self.token.destroy(obj)
            self.token.make_durable()
            out["certificate_serial"] = cert.serial_number
        return {"certificate_serial": cert.serial_number, "module_state": "authorized"}

    def _check_reload_certificate(self, meter: Meter, cert: x509.Certificate, certs: Any) -> None:
        serial, _ = check_reload_certificate(cert, certs.provider, meter.now())
        if serial != meter.identity.device_serial:
            raise CertificateError(
                f"the reload certificate is for device {serial}, not {meter.identity.device_serial}"
            )
        if not self.token.has_key(RELOAD_KEY_LABEL):
            raise DeviceLocked("the device has no reload key yet (Authorize PSD: reload key)")
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != self.token.public_key_spki(RELOAD_KEY_LABEL):
            raise CertificateError("the reload certificate does not hold this device's reload key")

    def _reload_certificate(self, meter: Meter) -> bytes:
        found = self.token.data_objects(RELOAD_CERT_APPLICATION)
        if len(found) != 1:
            raise DeviceLocked(
                f"device {meter.identity.device_serial} has no reload certificate: a "
                "Certificate Authority user must certify its reload key first "
                "(`meter reload-certify`)"
            )
        cert = x509.load_der_x509_certificate(found[0].value)
        self._check_reload_certificate(meter, cert, _certified(meter))
        return found[0].value

    def _reload_capable(self) -> None:
        purpose = "Download Postage Value over the reload protocol (P-256 ECDH and ECDSA)"
        self.token.require("ecdh_derive", purpose)
        self.token.require("raw_ecdsa", purpose)

    # -- Download Postage Value (Provider) -----------------------------------------------

    def reload_begin(self, amount: int) -> dict[str, Any]:
        """Start a reload of ``amount`` mills: the hello to relay to the provider."""
        with self._service(
            Service.DOWNLOAD_POSTAGE_VALUE, step="reload-begin", amount=amount
        ) as out:
            if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
                raise InvalidInput(
                    f"reload amount must be a positive number of mills (got {amount})"
                )
            if amount > MAX_RELOAD:
                raise InvalidInput(f"reload amount {amount} mills is over {MAX_RELOAD}")
            meter = self._require_meter()
            self._reload_capable()
            cert = self._reload_certificate(meter)
            self._reload_drop()  # one session at a time: a new begin ends the old one
            ephemeral = generate_ephemeral(self.token, "the reload session's ECDH key")
            nonce = self.token.random(32)
            hello = Hello(meter.identity.device_serial, amount, cert, ephemeral.public_point, nonce)
            encoded = hello.to_bytes()
            self._reload_session = _Session(
                self._reload_clock(), amount, encoded, nonce, ephemeral, Kind.ACCEPT
            )
            out["nonce"] = nonce.hex()
        return {"message_hex": encoded.hex(), "done": False}

    def reload_next(self, message: bytes) -> dict[str, Any]:
        """The provider's next message in; the meter's next message (or the outcome) out."""
        with self._service(Service.DOWNLOAD_POSTAGE_VALUE, step="reload-next") as out:
            session = self._reload_session
            if session is None:
                raise ProtocolError(
                    "no reload session is open on the device (it ended, timed out, or the "
                    "device restarted): begin a new one"
                )
            try:
                age = self._reload_clock() - session.begun
                if age > SESSION_LIFETIME.total_seconds():
                    raise ProtocolError(
                        f"the reload session began {age:.0f} s ago, over its lifetime of "
                        f"{SESSION_LIFETIME.total_seconds():.0f} s: begin a new one"
                    )
                meter = self._require_meter()
                if session.step is Kind.ACCEPT:
                    answer = self._on_accept(meter, session, message, out)
                elif session.step is Kind.SETTLE:
                    answer = self._on_settle(meter, session, message, out)
                else:
                    answer = self._on_grant(meter, session, message, out)
            except BaseException:
                self._reload_drop()
                raise
        return answer

    def reload_cancel(self) -> dict[str, Any]:
        """End the open reload session (the host lost the provider): nothing stays pending."""
        with self._service(Service.DOWNLOAD_POSTAGE_VALUE, step="reload-cancel") as out:
            out["was_open"] = self._reload_session is not None
            self._reload_drop()
        return {"cancelled": out["was_open"], "pending": False}

    def _reload_drop(self) -> None:
        session, self._reload_session = self._reload_session, None
        if session is not None:
            destroy(self.token, session.ephemeral)

    # -- the steps ---------------------------------------------------------------

    def _on_accept(
        self, meter: Meter, session: _Session, message: bytes, out: dict[str, Any]
    ) -> dict[str, Any]:
        certs = _certified(meter)
        accept = Accept.from_bytes(message)
        check_accept(
            session.hello, accept, certs.root, meter.identity.authorization_id, meter.now()
        )
        z = shared_secret(self.token, session.ephemeral, accept.ephemeral)
        signature = self.token.sign(
            RELOAD_KEY_LABEL, KeyAlgorithm.ECDSA_P256, finish_message(session.hello, message)
        )
        finish = Finish(accept.session_id, signature).to_bytes()
        keys = session_keys(z, transcript_hash(session.hello, message, finish))
        session.channel = Channel(accept.session_id, METER_TO_PROVIDER, keys)
        session.session_id = accept.session_id
        session.step = Kind.SETTLE
        out["session_id"] = accept.session_id.hex()
        return {"message_hex": finish.hex(), "done": False}

    def _on_settle(
        self, meter: Meter, session: _Session, message: bytes, out: dict[str, Any]
    ) -> dict[str, Any]:
        assert session.channel is not None
        settle = Settle.from_bytes(session.channel.open(message, Kind.SETTLE))
        receipts = {obj.label: obj for obj in self.token.data_objects(RECEIPT_APPLICATION)}
        answers = [
            self._statement(meter, session, txid, receipts) for txid in settle.open_transactions
        ]
        # A receipt whose transaction the provider no longer holds open is committed there:
        # it is needed never again.
        open_labels = {txid.hex() for txid in settle.open_transactions}
        for label, obj in receipts.items():
            if label not in open_labels:
                self.token.destroy(obj)
        session.step = Kind.GRANT
        out["settled"] = {s.transaction_id.hex(): s.kind.name.lower() for s in answers}
        record = session.channel.seal(Kind.ANSWERS, encode_answers(answers))
        return {"message_hex": record.hex(), "done": False}

    def _statement(
        self, meter: Meter, session: _Session, txid: bytes, receipts: dict[str, DataObject]
    ) -> Statement:
        serial = meter.identity.device_serial
        stored = receipts.get(txid.hex())
        if stored is not None:
            receipt = Statement.from_bytes(stored.value)
            if (
                receipt.kind is StatementKind.APPLIED
                and receipt.transaction_id == txid
                and receipt.device_serial == serial
            ):
                return receipt
        registers = meter.registers
        if registers.last_credit_id == txid and txid != NO_NONCE:
            # Applied, and its receipt object not written yet when the device stopped: the
            # registers say so, and no credit came since, so the control total is its own.
            statement = Statement(
                StatementKind.APPLIED, serial, txid, registers.control_total, bytes(16)
            )
        else:
            # Not applied; and it never can be: its grant answered a session that is gone.
            statement = Statement(StatementKind.NOT_APPLIED, serial, txid, 0, session.session_id)
        return self._signed(statement)

    def _signed(self, statement: Statement) -> Statement:
        signature = self.token.sign(
            RELOAD_KEY_LABEL, KeyAlgorithm.ECDSA_P256, statement_message(statement)
        )
        return Statement(
            statement.kind,
            statement.device_serial,
            statement.transaction_id,
            statement.control_total,
            statement.session_id,
            signature,
        )

    def _on_grant(
        self, meter: Meter, session: _Session, message: bytes, out: dict[str, Any]
    ) -> dict[str, Any]:
        assert session.channel is not None
        grant = Grant.from_bytes(session.channel.open(message, Kind.GRANT))
        serial = meter.identity.device_serial
        out.update(transaction_id=grant.transaction_id.hex(), amount=grant.amount)
        if grant.device_serial != serial:
            raise ProtocolError(f"the grant is for device {grant.device_serial}, not {serial}")
        if grant.nonce != session.nonce:
            raise ProtocolError(
                "the grant does not answer this session's hello (stale or replayed)"
            )
        if grant.amount != session.amount:
            raise ProtocolError(
                f"the grant is for {grant.amount} mills; this session asked for {session.amount}"
            )
        if any(
            o.label == grant.transaction_id.hex()
            for o in self.token.data_objects(RECEIPT_APPLICATION)
        ):
            raise ProtocolError(f"transaction {grant.transaction_id.hex()} is applied already")
        # No keep_last_receipt here: the provider prepared this grant only after recording
        # its answer for every transaction it held open, the last one included.
        try:
            new = meter.registers.credit_reload(grant.amount, grant.transaction_id)
        except InvalidInput as exc:
            raise ProtocolError(f"grant {grant.transaction_id.hex()}: {exc}") from exc
        # Signed before the credit exists, as an indicium is: the receipt is kept with it.
        receipt = self._signed(
            Statement(
                StatementKind.APPLIED, serial, grant.transaction_id, new.control_total, bytes(16)
            )
        )
        self._reload_session = None  # consumed: nothing more is accepted in this session
        destroy(self.token, session.ephemeral)

        def keep_receipt() -> None:
            # After the register record (the commit point), so a receipt never exists
            # for a credit that does not.
            self.token.create_data(
                RECEIPT_APPLICATION, grant.transaction_id.hex(), receipt.to_bytes()
            )

        meter.commit_reload_credit(new, keep_receipt)
        out.update(descending=new.descending, control_total=new.control_total)
        record = session.channel.seal(Kind.RECEIPT, encode_receipt(receipt))
        return {
            "message_hex": record.hex(),
            "done": True,
            "result": {
                "transaction_id": grant.transaction_id.hex(),
                "amount": grant.amount,
                "ascending": new.ascending,
                "descending": new.descending,
                "control_total": new.control_total,
            },
        }


def keep_last_receipt(token: Token, meter: Meter) -> None:
    """Before another credit replaces the register record's last transaction id, make sure a
    reload transaction it names has its stored receipt.

    The receipt object is written just after the credit's register record; a device that
    stopped in between answers from the record (its last transaction id) until the next
    credit. A reload's grant comes only after its session settled every open transaction;
    a local signed-grant credit (Meter.apply_credit) does not, so it calls this first: the
    evidence never goes before the provider has it. A local grant's id gets a receipt
    too, which is harmless: no provider asks about it, and the next settle removes it.
    """
    txid = meter.registers.last_credit_id
    if txid == NO_NONCE or not token.has_key(RELOAD_KEY_LABEL):
        return
    if any(o.label == txid.hex() for o in token.data_objects(RECEIPT_APPLICATION)):
        return
    serial, total = meter.identity.device_serial, meter.registers.control_total
    statement = Statement(StatementKind.APPLIED, serial, txid, total, bytes(16))
    signature = token.sign(RELOAD_KEY_LABEL, KeyAlgorithm.ECDSA_P256, statement_message(statement))
    signed = Statement(statement.kind, serial, txid, total, bytes(16), signature)
    token.create_data(RECEIPT_APPLICATION, txid.hex(), signed.to_bytes())
    token.make_durable()


def _certified(meter: Meter) -> Any:
    if meter.certificates is None:
        raise DeviceLocked(
            f"device {meter.identity.device_serial} has no certificate yet (authorize it first)"
        )
    return meter.certificates
