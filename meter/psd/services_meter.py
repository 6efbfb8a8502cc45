"""The postage services: certification (Certificate Authority), customer authorization,
credit and withdrawal (Provider), indicia (Customer), Key Exchange (Key Custodian), and the
No-Role reports (public key, device audit) and the Customer's PSD status."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.errors import DeviceLocked, InvalidInput, ProtocolError
from meter.indicium import Indicium, key_id
from meter.protocol.authorization import CustomerAuthorization
from meter.protocol.batch import require_pieces
from meter.protocol.credit import CreditGrant, CreditRequest
from meter.psd.device import IssueRequest, Meter, SignedBatch
from meter.psd.firmware_core import KEY_EXCHANGE_LABEL
from meter.psd.registers import Registers
from meter.psd.roles import Service
from meter.psd.services_reload import keep_last_receipt
from meter.psd.services_withdrawal import AuditServices

__all__ = ["MeterServices"]

# A provider's clock may run a little ahead of the meter's; more is refused, since a record
# from the future would make every later one "older".
_AUTHORIZATION_SKEW = timedelta(hours=1)


class MeterServices(AuditServices):
    # -- certificate authority: Authorize PSD ----------------------------------

    def authorize_psd(
        self, meter_pem: bytes, provider_pem: bytes, root_pem: bytes
    ) -> dict[str, Any]:
        with self._service(Service.AUTHORIZE_PSD) as out:
            try:
                certs = [
                    x509.load_pem_x509_certificate(p) for p in (meter_pem, provider_pem, root_pem)
                ]
            except ValueError as exc:
                raise InvalidInput(f"a certificate is not PEM: {exc}") from exc
            self._require_meter().install_certificates(*certs)
            out["meter_certificate_serial"] = certs[0].serial_number
        return {"module_state": self.module_state()}

    # -- provider: Authorize Customer, Download Postage Value, Withdraw PSD ---

    def authorize_customer(self, authorization: Any) -> dict[str, Any]:
        """Authorize Customer (Provider): install the provider-signed record binding a
        customer account to this meter (meter/protocol/authorization.py), as JSON text or
        object. It must verify under the provider certificate pinned at Authorize PSD, name
        this device, and be no older than the record installed before."""
        with self._service(Service.AUTHORIZE_CUSTOMER) as out:
            source = "customer authorization"
            record = CustomerAuthorization.from_json(authorization, source)
            out.update(customer=record.customer, issued_at=record.issued_at.isoformat())
            meter = self._require_meter()
            if meter.certificates is None:
                raise DeviceLocked("no provider is pinned yet: Authorize PSD first")
            record.verify(meter.certificates.provider, meter.identity.device_serial, source)
            held = meter.state.customer_authorization
            if held is not None:
                installed = CustomerAuthorization.from_json(held, "installed " + source)
                if record.issued_at < installed.issued_at:
                    raise ProtocolError(
                        f"{source} issued {record.issued_at.isoformat()} is older than the one "
                        f"installed ({installed.issued_at.isoformat()}): a replayed record"
                    )
            if record.issued_at > self.meter_now() + _AUTHORIZATION_SKEW:
                raise ProtocolError(
                    f"{source} is issued {record.issued_at.isoformat()}, in the future of this "
                    f"meter's clock ({self.meter_now().isoformat()}): check the clocks"
                )
            meter.commit_state(
                meter.state.next(customer=record.customer, customer_authorization=record.to_text())
            )
        return {
            "customer": record.customer,
            "authorization_id": record.authorization_id,
            "issued_at": record.issued_at.isoformat(),
        }

    def request_credit(self) -> CreditRequest:
        """Download Postage Value, first half: a fresh nonce, durable, in a credit request."""
        with self._service(Service.DOWNLOAD_POSTAGE_VALUE, step="request") as out:
            request = self._require_meter().request_credit()
            out["nonce"] = request.nonce.hex()
        return request

    def apply_credit(self, grant: CreditGrant) -> dict[str, Any]:
        """Download Postage Value, second half: verify the provider's grant and credit it."""
        with self._service(
            Service.DOWNLOAD_POSTAGE_VALUE, step="apply", transaction_id=grant.transaction_id.hex()
        ) as out:
            meter = self._require_meter()
            keep_last_receipt(self.token, meter)  # a reload's evidence outlives this credit
            registers = meter.apply_credit(grant)
            out.update(
                amount=grant.amount, ascending=registers.ascending, descending=registers.descending
            )
        return _credited(grant, registers)

    def download_postage_value(
        self, obtain: Callable[[CreditRequest], CreditGrant]
    ) -> dict[str, Any]:
        """Both halves at once, with ``obtain`` getting the provider's grant in between."""
        return self.apply_credit(obtain(self.request_credit()))

    # -- customer: Create Indicium, Create Correction Indicium ------------------

    def create_indicium(self, request: IssueRequest) -> Indicium:
        if request.correction_of is not None:
            raise InvalidInput("a correction is Create Correction Indicium, not Create Indicium")
        with self._service(
            Service.CREATE_INDICIUM, audit_ok=False, postage=request.postage, weight=request.weight
        ) as out:
            return self._issue(Service.CREATE_INDICIUM, request, out)

    def create_correction_indicium(self, request: IssueRequest, original: int) -> Indicium:
        """Additional postage for a piece already stamped by this meter (sequence ``original``)."""
        with self._service(
            Service.CREATE_CORRECTION_INDICIUM,
            audit_ok=False,
            postage=request.postage,
            original=original,
        ) as out:
            corrected = replace(request, correction_of=original)
            return self._issue(Service.CREATE_CORRECTION_INDICIUM, corrected, out)

    def create_indicium_batch(self, requests: Sequence[IssueRequest]) -> SignedBatch:
        """Create Indicium for a batch of pieces: ONE durable register write debits them all,
        then they are released together, with consecutive sequences (docs/device.md, Batches).

        The Customer's service, with Create Indicium's checks; its one audit record names
        the sequences, each piece's postage and a digest of the indicia released.
        """
        total = sum(r.postage or 0 for r in requests)  # before pricing; the record has each
        with self._service(
            Service.CREATE_INDICIUM_BATCH, audit_ok=False, pieces=len(requests), postage=total
        ) as out:
            # A batch is Create Indicium N times over: refused in the same device states.
            self._check_state(Service.CREATE_INDICIUM)
            require_pieces(len(requests))
            numbered = enumerate(requests, 1)
            correction = next((n for n, r in numbered if r.correction_of is not None), None)
            if correction is not None:
                raise InvalidInput(
                    f"piece {correction} of the batch: a correction is Create Correction "
                    "Indicium, one piece at a time, not part of a batch"
                )
            meter = self._ready_to_issue(Service.CREATE_INDICIUM_BATCH)

            def record(batch: SignedBatch) -> None:
                _audit_batch(out, batch)
                self._record_ok(Service.CREATE_INDICIUM_BATCH, out)

            return meter.issue_batch(requests, record=record, also_durable=self._audit_sync)

    def _issue(self, service: Service, request: IssueRequest, out: dict[str, Any]) -> Indicium:
        """The debit, the signature and the audit record, all durable before the return."""
        meter = self._ready_to_issue(service)

        def record(indicium: Indicium) -> None:
            _audit_indicium(out, indicium)
            self._record_ok(service, out)

        return meter.issue(request, record=record, also_durable=self._audit_sync)

    def _ready_to_issue(self, service: Service) -> Meter:
        meter = self._require_meter()
        self._watchdog_allows(service)  # the inspection watchdog (docs/withdrawal.md)
        if meter.state.customer is None:
            raise DeviceLocked("no customer is authorized on this device (Authorize Customer)")
        if not meter.state.signing_key_active:
            raise DeviceLocked("the signing key is deactivated (Key Administration)")
        return meter

    def retrieve_psd_status(self) -> dict[str, Any]:
        """Retrieve PSD Status (Customer): registers, piece count, time."""
        with self._service(Service.RETRIEVE_PSD_STATUS) as out:
            meter = self._require_meter()
            status = meter.status()
            status["customer"] = meter.state.customer
            out.update(
                ascending=status["ascending"],
                descending=status["descending"],
                piece_count=status["piece_count"],
            )
        return status

    # -- key custodian: Key Exchange --------------------------------------------

    def key_exchange(self) -> dict[str, Any]:
        """The device's ECDH key for custodian ceremonies: generated in the token once."""
        with self._service(Service.KEY_EXCHANGE) as out:
            if not self.token.has_key(KEY_EXCHANGE_LABEL):
                self.token.generate_key_exchange_keypair(KEY_EXCHANGE_LABEL)
                self.token.make_durable()
            public = serialization.load_der_public_key(
                self.token.public_key_spki(KEY_EXCHANGE_LABEL)
            )
            out["key_id"] = key_id(public).hex()
        return {"public_key_pem": _pem(public), "key_id": out["key_id"]}

    # -- No-Role: Retrieve PSD Public Key, Request Device Audit -------------------

    def retrieve_psd_public_key(self) -> dict[str, Any]:
        """Retrieve PSD Public Key (No-Role): the signing key's public half and its
        certificate chain, once a logon has unlocked the device."""
        with self._service(Service.RETRIEVE_PSD_PUBLIC_KEY) as out:
            meter = self._require_meter()  # every key object is private: read once unlocked
            public = serialization.load_der_public_key(meter.public_key_spki)
            certs = meter.certificates
            chain = (
                None
                if certs is None
                else {
                    "meter": _cert_pem(certs.meter),
                    "provider": _cert_pem(certs.provider),
                    "postal_root": _cert_pem(certs.root),
                }
            )
            result: dict[str, Any] = {
                "public_key_pem": _pem(public),
                "key_id": key_id(public).hex(),
                "certificate_pem": chain["meter"] if chain else None,
                "certificates": chain,
            }
            out["key_id"] = result["key_id"]
        return result

    # Request Device Audit and Withdraw PSD: meter.psd.services_withdrawal.


def _credited(grant: CreditGrant, registers: Registers) -> dict[str, Any]:
    return {
        "amount": grant.amount,
        "transaction_id": grant.transaction_id.hex(),
        "descending": registers.descending,
        "ascending": registers.ascending,
        "control_total": registers.control_total,
    }


def _audit_indicium(out: dict[str, Any], indicium: Indicium) -> None:
    out.update(
        sequence=indicium.sequence,
        ascending=indicium.ascending,
        descending=indicium.descending,
        postage=indicium.postage,
        flags=indicium.flags,
        reference_sequence=indicium.reference_sequence,
    )


def _audit_batch(out: dict[str, Any], batch: SignedBatch) -> None:
    """What the batch's one audit record keeps: enough to tell every piece's registers."""
    digest = hashlib.sha256()
    for encoded in batch.encoded:
        digest.update(encoded)
    out.update(
        first_sequence=batch.first_sequence,
        last_sequence=batch.last_sequence,
        ascending=batch.registers.ascending,
        descending=batch.registers.descending,
        postages=list(batch.postages),
        indicia_sha256=digest.hexdigest(),
    )


def _pem(public: Any) -> str:
    return str(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    )


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
