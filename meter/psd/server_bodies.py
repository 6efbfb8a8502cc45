"""The device API's request bodies: strict, so that a JSON true is never postage and an
unknown field is an error, not ignored. The routes are in server.py and server_*.py."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from meter.errors import InvalidInput
from meter.indicium import RateCategory
from meter.protocol.batch import MAX_BATCH_PIECES
from meter.protocol.update_bundle import MAX_BUNDLE_BYTES
from meter.psd.device import IssueRequest
from meter.psd.roles import Role


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogonBody(Body):
    user_id: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class UserBody(Body):
    user_id: str = Field(max_length=64)
    role: Role
    password: str = Field(max_length=1024)


class ModifyUserBody(Body):
    role: Role
    password: str = Field(max_length=1024)


class PasswordBody(Body):
    old_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


class KeyAdministrationBody(Body):
    action: str = Field(default="list", max_length=64)


class AuthorizationBody(Body):
    authorize: StrictBool = True


class BundleBody(Body):
    bundle: str = Field(
        max_length=MAX_BUNDLE_BYTES,
        description="the update bundle's JSON document (pim-psc-bundle-v1), as text",
    )


class ClockBody(Body):
    time: datetime


class CertificatesBody(Body):
    meter_pem: str = Field(max_length=16384)
    provider_pem: str = Field(max_length=16384)
    root_pem: str = Field(max_length=16384)


class CustomerBody(Body):
    # The provider-signed record (meter/protocol/authorization.py), checked by the service.
    authorization: dict[str, Any] = Field(
        description="the provider's signed customer authorization, as its JSON object"
    )


class GrantBody(Body):
    grant_hex: str = Field(max_length=1024)


class ReloadBeginBody(Body):
    amount: StrictInt = Field(description="mills (1/10 cent) to reload")


class ReloadMessageBody(Body):
    message_hex: str = Field(max_length=2 * 64 * 1024, description="the provider's message")


class ReloadCertificateBody(Body):
    certificate_pem: str = Field(max_length=16384)


class IssueBody(Body):
    # Strict: JSON true or "550" must not become a postage (pydantic's lax mode would
    # take them for 1 and 550 mills and a piece would be issued).
    postage: StrictInt | None = Field(
        default=None, description="mills (1/10 cent); leave out to price by weight"
    )
    rate_category: str = Field(max_length=32, description="slug, e.g. first-class-letter")
    origin_zip: str = Field(max_length=16)
    destination_zip: str = Field(max_length=16)
    destination_plus4: str = Field(default="0000", max_length=16)
    delivery_point: str = Field(default="00", max_length=16)
    address: list[str] = Field(max_length=16)
    date_of_mailing: date | None = None
    specimen: StrictBool = False
    correction_of: StrictInt | None = None
    weight: str | None = Field(
        default=None, max_length=16, description='e.g. "1oz", "2.5lb": priced by the rate table'
    )

    def issue_request(self) -> IssueRequest:
        if any(len(line) > 256 for line in self.address):
            raise InvalidInput("an address line is longer than 256 characters")
        return IssueRequest(
            postage=self.postage,
            rate_category=RateCategory.parse(self.rate_category),
            origin_zip=self.origin_zip,
            destination_zip=self.destination_zip,
            destination_plus4=self.destination_plus4,
            delivery_point=self.delivery_point,
            address=list(self.address),
            date_of_mailing=self.date_of_mailing,
            specimen=self.specimen,
            correction_of=self.correction_of,
            weight=self.weight,
        )


class BatchBody(Body):
    pieces: list[IssueBody] = Field(
        max_length=MAX_BATCH_PIECES,
        description=f"1 to {MAX_BATCH_PIECES} Create Indicium requests (no correction_of)",
    )

    def issue_requests(self) -> list[IssueRequest]:
        requests = []
        for number, piece in enumerate(self.pieces, 1):
            try:
                requests.append(piece.issue_request())
            except InvalidInput as exc:
                raise InvalidInput(f"piece {number} of the batch: {exc}") from exc
        return requests


# -- the app -----------------------------------------------------------------------


class DeviceAuditBody(Body):
    # The provider's nonce, 16-32 bytes as hex; without it the audit is the unsigned check.
    nonce_hex: str | None = Field(default=None, max_length=64)


class AcknowledgementBody(Body):
    # Checked member by member by meter.protocol.device_audit.AuditAcknowledgement.
    acknowledgement: dict[str, object]


class WithdrawBody(Body):
    # Step 1: the provider's nonce; step 3: the provider's withdrawal acknowledgement.
    nonce_hex: str | None = Field(default=None, max_length=64)
    acknowledgement: dict[str, object] | None = None


# -- key ceremonies (meter/psd/services_custody.py, docs/custody.md) ----------------


class CeremonyBody(Body):
    ceremony: str = Field(max_length=64)
    purpose: str = Field(max_length=32)
    postal_root_sha256: str | None = Field(
        default=None, max_length=64, description="an import: the postal root it trusts"
    )


class CeremonyExportBody(Body):
    ceremony: str = Field(max_length=64)
    transport_key_hex: str = Field(min_length=64, max_length=64)


class CeremonyTranscriptBody(Body):
    ceremony: str = Field(max_length=64)
    transcript: dict[str, object]


class CeremonyImportBody(Body):
    bundle: dict[str, object]
    transport_key_hex: str = Field(min_length=64, max_length=64)
    final_registers: dict[str, object]
