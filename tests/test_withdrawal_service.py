"""Device audits and Withdraw PSD over the provider service's routes (meter.provider.
audit_routes), in this process with the firmware and the provider's token: an audit with
neither the post office's reconciliation nor the operator's waiver refused and not
recorded, the waiver recorded, a replay refused; the withdrawal, the refund, the revocation
and its signed export."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter.cli.home import Home
from meter.cli.workflows import DEMO_CUSTOMER
from meter.postoffice.trustdir import load_revocation_export
from meter.protocol.device_audit import AuditAcknowledgement
from meter.psd.firmware import PSD
from tests.conftest import ROLE_USERS

pytestmark = pytest.mark.softhsm


def test_audit_and_withdrawal_over_the_provider_service(device_home: Home, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID
    from fastapi.testclient import TestClient

    from meter.provider import Provider
    from meter.provider.api_keys import ApiKeys, KeyRole
    from meter.provider.audit_routes import audit_router
    from meter.provider.http import create_provider_app
    from meter.provider.http_config import ProviderConfig
    from tests._audit_lab import books, local_grant_id, meter_certificate

    home = device_home
    cert = meter_certificate(home)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    keys = ApiKeys(tmp_path / "keys.json")
    operator = {"Authorization": f"Bearer {keys.add('desk', KeyRole.OPERATOR)}"}
    auditor = {"Authorization": f"Bearer {keys.add('books', KeyRole.AUDITOR)}"}
    serial = int(str(cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value))
    ledger = books(tmp_path / "accounts.sqlite", serial, 100_000, local_grant_id(home))
    config = ProviderConfig(ledger=str(tmp_path / "accounts.sqlite"), keys=keys.path)
    try:
        with (
            home.open_token("provider") as token,
            PSD.power_up(home.open_device_token(), home.device) as psd,
        ):
            app = create_provider_app(
                config,
                ledger,
                Provider.open(token, home.ledger),
                routers=[audit_router(tmp_path / "revocations.json")],
            )
            psd.logon(*ROLE_USERS["provider"])
            with TestClient(app, base_url="http://localhost") as client:

                def nonce() -> bytes:
                    answer = client.post(
                        "/v1/audits/nonce", json={"device_serial": serial}, headers=operator
                    )
                    assert answer.status_code == 200, answer.text
                    return bytes.fromhex(answer.json()["nonce_hex"])

                report = psd.request_device_audit(nonce())["signed_report"]
                bare = {"report": report, "meter_certificate_pem": pem}
                # Neither the post office's reconciliation nor the explicit waiver: refused
                # before the nonce is used up, nothing recorded.
                unchecked = client.post("/v1/audits", json=bare, headers=operator)
                assert unchecked.status_code == 400, unchecked.text
                assert "post office" in unchecked.json()["message"]
                assert ledger.last_audit(serial) is None
                body = {**bare, "without_post_office": True}
                denied = client.post("/v1/audits", json=body, headers=auditor)
                assert denied.status_code == 403
                answer = client.post("/v1/audits", json=body, headers=operator)
                assert answer.status_code == 200, answer.text
                recorded = ledger.last_audit(serial)
                assert recorded is not None and recorded["outcome"] == "ok"
                assert recorded["details"]["post_office_checked"] is False
                assert recorded["details"]["post_office_waived"] is True
                ack = AuditAcknowledgement.from_json(answer.json()["acknowledgement"], "ack")
                replayed = client.post("/v1/audits", json=body, headers=operator)
                assert replayed.status_code == 409 and "replayed" in replayed.json()["message"]
                psd.acknowledge_device_audit(ack)

                final = psd.withdraw_psd(nonce=nonce())["signed_report"]
                answer = client.post(
                    "/v1/withdrawals",
                    json={
                        "report": final,
                        "meter_certificate_pem": pem,
                        "without_post_office": True,
                    },
                    headers=operator,
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["refund"] == 100_000
                ack = AuditAcknowledgement.from_json(answer.json()["acknowledgement"], "ack")
                assert psd.withdraw_psd(acknowledgement=ack)["step"] == "withdrawn"
                revoked = client.post(f"/v1/withdrawals/{serial}/revocation", headers=operator)
                assert revoked.status_code == 200, revoked.text
                export = client.get("/v1/revocations", headers=auditor)
                assert export.status_code == 200
        assert ledger.account(DEMO_CUSTOMER).refunded == 100_000
    finally:
        ledger.close()
    count = load_revocation_export(home.certs, export.content, "the provider's export")
    assert count == 1
