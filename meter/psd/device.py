"""The meter's records and its cryptographic work: provisioning, certificates, credit, issuing.

Every value that leaves the meter is checked first; an indicium leaves only
once its debit is durable in the token, so a crash may lose the one piece (or
the one batch: one register write debits it whole) in flight but never creates
postage or reuses a sequence.

Everything that decides what the device does lives in private token
objects under the register MAC: the registers, the device state (pinned by
generation in the register record) and the certificate chain (its postal
root pinned by digest). See meter.psd.registers and meter.psd.device_state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.errors import (
    CertificateError,
    DeviceLocked,
    IndiciumError,
    InvalidInput,
    ProtocolError,
    RegisterCorrupt,
)
from meter.indicium import (
    Indicium,
    key_id,
)
from meter.protocol.credit import CreditGrant, CreditRequest, verify_provider_certificate
from meter.protocol.issue import IssueRequest
from meter.protocol.update_bundle import Installed, UpdateBundle, verify_update
from meter.psd.device_state import DeviceState, DeviceStateStore
from meter.psd.identity import DeviceIdentity, load_identity, store_identity
from meter.psd.pieces import Issuer, SignedBatch, check_request, price_request, unsigned_indicium
from meter.psd.psc_store import load_installed, retire, stage
from meter.psd.register_store import MAC_KEY_LABEL, RegisterStore
from meter.psd.registers import NO_ROOT, Registers
from meter.rates import RateTable
from meter.token import Token

__all__ = ["CERT_APPLICATION", "SIGNING_KEY_LABEL", "IssueRequest", "Meter", "SignedBatch"]

SIGNING_KEY_LABEL = "indicium-signing"
CERT_APPLICATION = "meter.certificate"
_CERT_LABELS = ("meter", "provider", "postal-root")

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Certificates:
    meter: x509.Certificate
    provider: x509.Certificate
    root: x509.Certificate


class Meter:
    """One provisioned device over its open token."""

    def __init__(
        self,
        token: Token,
        identity: DeviceIdentity,
        registers: RegisterStore,
        state: DeviceStateStore,
        clock: Clock,
        certificates: Certificates | None,
        bundle: UpdateBundle | None = None,
    ) -> None:
        self.token = token
        self.identity = identity
        self._registers = registers
        self._state = state
        self._clock = clock
        self.certificates = certificates
        self._public_key_spki = _signing_spki(token, state.current, certificates)
        self.key_id = key_id(serialization.load_der_public_key(self._public_key_spki))
        self.bundle = bundle  # the installed update bundle (Update PSC), verified at install
        self._issuer = Issuer(identity, self.key_id, self._software_id())

    # -- lifetime ---------------------------------------------------------

    @classmethod
    def provision(
        cls, token: Token, identity: DeviceIdentity, clock: Clock = system_clock
    ) -> Meter:
        """Generate the signing key and register MAC key in the token; registers at zero."""
        # Exportable where the token can wrap them, only under a trusted key (custodians'
        # ceremonies, docs/custody.md); on other tokens they never leave it.
        token.generate_signing_keypair(SIGNING_KEY_LABEL, identity.algorithm, exportable=True)
        token.generate_hmac_key(MAC_KEY_LABEL, exportable=True)
        state = DeviceStateStore.create(token)
        RegisterStore.create(token, identity.device_serial, state.current.generation)
        store_identity(token, identity)
        return cls.open(token, clock)

    @classmethod
    def open(cls, token: Token, clock: Clock = system_clock) -> Meter:
        """Open the records, each checked against what the register record pins."""
        identity = load_identity(token)
        registers = RegisterStore.open(token, identity.device_serial)
        pinned = registers.current
        state = DeviceStateStore.open(token, pinned.state_generation)
        certificates = _load_certificates(token, pinned.root_digest)
        bundle = load_installed(token, state.current.psc_bundle_sha256)
        return cls(token, identity, registers, state, clock, certificates, bundle)

    @property
    def registers(self) -> Registers:
        return self._registers.current

    @property
    def state(self) -> DeviceState:
        return self._state.current

    def commit_state(self, new: DeviceState) -> None:
        """Make ``new`` (the next generation) the device's state: the state object first,
        then the register record that pins it (the commit point), then retire the old."""
        staged = self._state.stage(new)
        self._registers.commit(self._registers.current.pinning(state_generation=new.generation))
        self._state.committed(new, staged)

    @property
    def public_key_spki(self) -> bytes:
        return self._public_key_spki

    def now(self) -> datetime:
        return self._clock().astimezone(UTC).replace(microsecond=0)

    # -- certificates (Authorize PSD) -------------------------------------

    def install_certificates(
        self, meter_cert: x509.Certificate, provider: x509.Certificate, root: x509.Certificate
    ) -> None:
        """Load the meter's certificate chain after checking it names this device and key."""
        if self.certificates is not None:
            raise CertificateError(f"device {self.identity.device_serial} has certificates already")
        auth_id = _checked_provider(provider, root, self.now())
        if auth_id != self.identity.authorization_id:
            raise CertificateError(
                f"provider certificate is for authorization id {auth_id}, the device for "
                f"{self.identity.authorization_id}"
            )
        spki = meter_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != self._public_key_spki:
            raise CertificateError("meter certificate does not hold this device's signing key")
        serials = meter_cert.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
        if [str(a.value) for a in serials] != [str(self.identity.device_serial)]:
            raise CertificateError("meter certificate does not name this device's serial")
        try:
            meter_cert.verify_directly_issued_by(provider)
        except Exception as exc:
            raise CertificateError("meter certificate is not issued by the provider") from exc
        for label, cert in zip(_CERT_LABELS, (meter_cert, provider, root), strict=True):
            self.token.create_data(
                CERT_APPLICATION, label, cert.public_bytes(serialization.Encoding.DER)
            )
        self.token.make_durable()
        # The commit point: the register record pins the postal root from now on.
        digest = _root_digest(root)
        self._registers.commit(self._registers.current.pinning(root_digest=digest))
        self.certificates = Certificates(meter_cert, provider, root)

    def _require_certified(self) -> Certificates:
        if self.certificates is None:
            raise DeviceLocked(
                f"device {self.identity.device_serial} has no certificate yet (authorize it first)"
            )
        return self.certificates

    # -- credit -----------------------------------------------------------

    def request_credit(self) -> CreditRequest:
        """Start a credit: a fresh nonce, durable in the registers, answered by one grant only."""
        self._require_certified()
        current = self._registers.current
        nonce = self.token.random(16)
        self._registers.commit(current.with_nonce(nonce))
        r = self._registers.current
        return CreditRequest(
            self.identity.authorization_id,
            self.identity.device_serial,
            nonce,
            r.ascending,
            r.descending,
            r.control_total,
            r.sequence,
        )

    def apply_credit(self, grant: CreditGrant) -> Registers:
        """Verify a provider's grant and add its amount; a replayed or altered grant changes nothing."""
        certs = self._require_certified()
        _checked_provider(certs.provider, certs.root, self.now())
        grant.verify(certs.provider)
        if grant.device_serial != self.identity.device_serial:
            raise ProtocolError(
                f"credit grant is for device {grant.device_serial}, not {self.identity.device_serial}"
            )
        if grant.authorization_id != self.identity.authorization_id:
            raise ProtocolError(
                f"credit grant comes from authorization id {grant.authorization_id}"
            )
        current = self._registers.current
        try:
            new = current.credit(grant.amount, grant.nonce, grant.transaction_id)
        except InvalidInput as exc:
            raise ProtocolError(f"credit grant {grant.transaction_id.hex()}: {exc}") from exc
        self._registers.commit(new)
        return new

    def commit_reload_credit(self, new: Registers, before_sync: Callable[[], None]) -> None:
        """Make a reload credit (``Registers.credit_reload`` of the current record) durable;
        ``before_sync`` runs once its record is in the token (meter.psd.services_reload
        keeps the signed receipt there), and is durable with it."""
        self._require_certified()
        current = self._registers.current
        if new != current.credit_reload(
            new.control_total - current.control_total, new.last_credit_id
        ):
            raise InvalidInput("a reload credit must be the current registers plus one credit")
        self._registers.commit(new, before_sync=before_sync)

    # -- software: Update PSC ----------------------------------------------

    @property
    def rate_table(self) -> RateTable | None:
        """The installed bundle's rate table: the only one the device prices pieces by."""
        return self.bundle.contents.rates if self.bundle is not None else None

    def _software_id(self) -> int:
        return self.state.psc_software_id or self.identity.software_id

    def install_update(self, bundle: UpdateBundle) -> None:
        """Verify an update bundle against this device's pinned postal root, provider, lineage
        and installed release, then install it: its object first, then the state that pins
        it (the commit point), then the old object goes (meter.psd.psc_store)."""
        certs = self._require_certified()
        state = self.state
        installed = Installed(
            self._software_id(),
            state.psc_version,
            self.identity.vendor_model,
            self.identity.authorization_id,
        )
        verify_update(bundle, certs.root, self.now(), installed)
        contents = bundle.contents
        stage(self.token, bundle)
        self.commit_state(
            state.next(
                psc_version=contents.version,
                psc_history=(*state.psc_history, state.psc_version),
                psc_software_id=contents.software_id,
                psc_bundle_sha256=bundle.sha256,
                psc_watchdog=contents.watchdog.to_json(),
            )
        )
        retire(self.token, bundle.sha256)
        self.bundle = bundle
        self._issuer = Issuer(self.identity, self.key_id, contents.software_id)

    def _require_not_revoked(self, now: datetime) -> None:
        revoked = (
            self.bundle.contents.revoked_at(self.identity.device_serial) if self.bundle else None
        )
        if revoked is not None and now >= revoked:
            raise DeviceLocked(
                f"device {self.identity.device_serial} is revoked since {revoked.isoformat()} "
                "by the installed update bundle: it issues no more indicia"
            )

    # -- issuing ----------------------------------------------------------

    def issue(
        self,
        request: IssueRequest,
        *,
        record: Callable[[Indicium], None] | None = None,
        also_durable: Callable[[], None] | None = None,
    ) -> Indicium:
        """Debit the registers and sign a PIM-1 indicium for one piece; return it only once
        the debit is durable.

        ``record`` sees the signed indicium before the debit is synced, to write what must
        be durable with it (the audit record); ``also_durable`` makes durable what the
        token's sync does not cover. Both are durable before this returns.
        """
        self._require_certified()
        now = self.now()
        current = self._registers.current
        self._require_not_revoked(now)
        request = price_request(request, self.rate_table)
        checked = check_request(request, now, current)
        new = current.debit(checked.postage)
        unsigned = unsigned_indicium(self._issuer, request, now, new.piece, checked)
        signed_part = unsigned.signed_part()  # every field checked before anything changes
        # Signed before the debit exists: the indicium leaves this method only once the
        # debit is durable, so it never exists outside without it; and the token signs
        # before the new object makes it reread its folder.
        signature = self.token.sign(SIGNING_KEY_LABEL, self.identity.algorithm, signed_part)
        indicium = unsigned.with_signature(signature)
        self._registers.commit(
            new,
            before_sync=(lambda: record(indicium)) if record is not None else None,
            also_durable=also_durable,
        )
        return indicium

    def issue_batch(
        self,
        requests: Sequence[IssueRequest],
        *,
        record: Callable[[SignedBatch], None] | None = None,
        also_durable: Callable[[], None] | None = None,
    ) -> SignedBatch:
        """Debit a whole batch in ONE durable register write and sign an indicium for each
        piece, with consecutive sequences; return them only once that write is durable.

        Every request is checked first, then the total against the descending register:
        a bad piece (named by its place in the batch) or a batch the register does not
        cover changes nothing. Each indicium carries the registers as if the pieces were
        debited one by one. All are signed before the write (as for one piece): a crash
        before it leaves the registers as they were, a crash after it and before the
        return loses the batch, whose debit and audit record show it; it never creates
        postage. ``record`` and ``also_durable`` are as for `issue`, for the whole batch.
        """
        self._require_certified()
        now = self.now()
        current = self._registers.current
        number = 0  # the piece being checked, for "piece N of the batch: ..."
        try:
            checked = []
            self._require_not_revoked(now)
            priced = []
            for request in requests:
                number += 1
                priced.append(price_request(request, self.rate_table))
                checked.append(check_request(priced[-1], now, current))
            requests = priced
            number = 0
            after, carried = current.debit_batch([c.postage for c in checked])
            parts = []  # every field of every piece checked before anything is signed
            for request, check, piece in zip(requests, checked, carried, strict=True):
                number += 1
                unsigned = unsigned_indicium(self._issuer, request, now, piece, check)
                parts.append(unsigned.signed_part())
        except (InvalidInput, IndiciumError) as exc:
            if not number:
                raise
            raise InvalidInput(f"piece {number} of the batch: {exc}") from exc
        # Signed back to back before the one write: the token's objects do not change in
        # between, so each signature costs what a raw one does (see docs/device.md).
        sign, label, algorithm = self.token.sign, SIGNING_KEY_LABEL, self.identity.algorithm
        batch = SignedBatch(
            tuple(part + sign(label, algorithm, part) for part in parts),
            tuple(c.postage for c in checked),
            carried[0].sequence,
            after,
        )
        self._registers.commit(
            after,
            before_sync=(lambda: record(batch)) if record is not None else None,
            also_durable=also_durable,
        )
        return batch

    def status(self) -> dict[str, object]:
        r = self._registers.current
        return {
            "device_serial": self.identity.device_serial,
            "vendor_model": self.identity.vendor_model,
            "authorization_id": self.identity.authorization_id,
            "algorithm": self.identity.algorithm.value,
            "key_id": self.key_id.hex(),
            "certified": self.certificates is not None,
            "ascending": r.ascending,
            "descending": r.descending,
            "control_total": r.control_total,
            "piece_count": r.sequence,
            "credit_pending": r.credit_nonce != bytes(16),
            "time": self.now().isoformat(),
        }


def _signing_spki(token: Token, state: DeviceState, certificates: Certificates | None) -> bytes:
    """The signing key's public half: from the token, or, once a withdrawal has destroyed
    the key (docs/withdrawal.md), from the certificate so the records stay readable."""
    if token.has_key(SIGNING_KEY_LABEL):
        return token.public_key_spki(SIGNING_KEY_LABEL)
    if certificates is None or (state.withdrawing_since is None and state.withdrawn_at is None):
        raise RegisterCorrupt(
            f"{token.where}: the signing key is missing but the device was never withdrawn; "
            "the device must not operate"
        )
    return certificates.meter.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checked_provider(provider: x509.Certificate, root: x509.Certificate, at: datetime) -> int:
    try:
        return verify_provider_certificate(provider, root, at)
    except ProtocolError as exc:
        raise CertificateError(str(exc)) from exc


def _root_digest(root: x509.Certificate) -> bytes:
    return hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).digest()


def _load_certificates(token: Token, pinned_root: bytes) -> Certificates | None:
    """The chain the register record pins; objects an interrupted Authorize PSD left go."""
    objects = token.data_objects(CERT_APPLICATION)
    if pinned_root == NO_ROOT:
        for obj in objects:  # written, but never committed by a register record
            token.destroy(obj)
        return None
    found: dict[str, bytes] = {}
    for obj in objects:
        if obj.label in found or obj.label not in _CERT_LABELS:
            raise RegisterCorrupt(
                f"{token.where}: unexpected certificate object '{obj.label}' next to the chain "
                "the device was authorized with; the device must not operate"
            )
        found[obj.label] = obj.value
    try:
        meter_cert, provider, root = (
            x509.load_der_x509_certificate(found[k]) for k in _CERT_LABELS
        )
    except (KeyError, ValueError) as exc:
        raise RegisterCorrupt(
            f"{token.where}: the certificate chain the register record pins is missing or "
            "unreadable; the device must not operate"
        ) from exc
    if _root_digest(root) != pinned_root:
        raise RegisterCorrupt(
            f"{token.where}: the postal root certificate in the token is not the one the "
            "device was authorized under (its digest differs from the register record's)"
        )
    return Certificates(meter_cert, provider, root)
