"""The provider: certifies (authorizes) meters and grants them credit, keeping a ledger.

The ledger here is the file of local signed grants (a lab's development provider); the
accounts ledger of the provider's service (customers, funds, reloads) is meter.provider.ledger.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from cryptography import x509

from meter.errors import ConfigurationError, InvalidInput, ProtocolError
from meter.protocol.credit import CreditGrant, CreditRequest, verify_provider_certificate
from meter.protocol.credited import CreditedExport
from meter.provider.authority import CertifyingParty
from meter.provider.ledger import Ledger
from meter.token import Token

__all__ = ["Provider"]


class Provider(CertifyingParty):
    """A provider whose signing key lives in its token and whose ledger is a local file."""

    key_label = "provider-signing"

    def __init__(self, token: Token, certificate: x509.Certificate | None, ledger: Path) -> None:
        super().__init__(token, certificate)
        self.ledger = ledger

    @classmethod
    def create(cls, token: Token, ledger: Path) -> Provider:
        """Generate the provider's key; its certificate comes from the postal root."""
        cls._generate(token)
        return cls(token, None, ledger)

    @classmethod
    def open(cls, token: Token, ledger: Path) -> Provider:
        return cls(token, cls._stored_certificate(token), ledger)

    def install_certificate(
        self, cert: x509.Certificate, root: x509.Certificate, now: datetime
    ) -> None:
        verify_provider_certificate(cert, root, now)
        self._store_certificate(cert)

    @property
    def authorization_id(self) -> int:
        attrs = self.certificate.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)
        return int(str(attrs[0].value))

    def _ledger_entries(self) -> list[dict[str, object]]:
        if not self.ledger.exists():
            return []
        entries = []
        with self.ledger.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(
                        f"provider ledger {self.ledger} line {number} is corrupt"
                    ) from exc
        return entries

    def credited(self, device_serial: int) -> int:
        """All postage this provider has granted to ``device_serial``, in mills."""
        return sum(
            int(str(e["amount"]))
            for e in self._ledger_entries()
            if e["device_serial"] == device_serial
        )

    def export_credited(self, now: datetime, accounts: Ledger | None) -> dict[str, object]:
        """Every device's credited total, signed by this provider's key, for post offices.

        The total is what this provider COMMITTED to the meter: the credit transactions
        the accounts ledger ``accounts`` holds COMMITTED (reloads; never PREPARED ones,
        whose credit the meter may not have), plus the local signed grants of this
        provider's grant file (a lab's development provider) that the accounts ledger
        does not hold already under the same transaction id, so none counts twice.
        ``accounts`` None: a provider without an accounts ledger, local grants only.

        The format is in meter/protocol/credited.py; a post office reconciles registers
        against it (a control total above it is credit the provider never granted).
        """
        totals: dict[int, int] = {} if accounts is None else dict(accounts.credited_totals())
        for serial, amount in self._local_grants(accounts):
            totals[serial] = totals.get(serial, 0) + amount
        export = CreditedExport(self.authorization_id, now.replace(microsecond=0), totals)
        return export.signed_by(self.signer()).to_json()

    def local_credited(self, device_serial: int, accounts: Ledger | None) -> int:
        """The local signed grants to ``device_serial`` that ``accounts`` does not hold:
        with the accounts ledger's COMMITTED credit, everything this provider granted it
        (a device audit compares the meter's control total with that sum)."""
        return sum(a for serial, a in self._local_grants(accounts) if serial == device_serial)

    def _local_grants(self, accounts: Ledger | None) -> list[tuple[int, int]]:
        """(device serial, amount) of each local grant not in ``accounts`` already."""
        grants = []
        for entry in self._ledger_entries():
            transaction_id = bytes.fromhex(str(entry["transaction_id"]))
            if accounts is not None and accounts.transaction(transaction_id) is not None:
                continue  # recorded in the accounts ledger too: counted there (if committed)
            grants.append((int(str(entry["device_serial"])), int(str(entry["amount"]))))
        return grants

    def grant_credit(self, request: CreditRequest, amount: int, now: datetime) -> CreditGrant:
        """Sign a grant of ``amount`` mills for the meter's request, recorded before it is returned."""
        if amount <= 0:
            raise InvalidInput(f"credit amount must be positive (got {amount} mills)")
        if request.authorization_id != self.authorization_id:
            raise ProtocolError(
                f"request from device {request.device_serial} names authorization id "
                f"{request.authorization_id}, this provider is {self.authorization_id}"
            )
        if any(e["nonce"] == request.nonce.hex() for e in self._ledger_entries()):
            raise ProtocolError(f"request nonce {request.nonce.hex()} was granted already")
        grant = CreditGrant(
            self.authorization_id,
            request.device_serial,
            request.nonce,
            secrets.token_bytes(16),
            amount,
            now.replace(microsecond=0),
        )
        signed = replace(grant, signature=self.signer()(grant.signed_part()))
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "transaction_id": signed.transaction_id.hex(),
            "device_serial": request.device_serial,
            "nonce": request.nonce.hex(),
            "amount": amount,
            "at": signed.issued_at.isoformat(),
            "meter_ascending": request.ascending,
            "meter_descending": request.descending,
        }
        with self.ledger.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return signed
