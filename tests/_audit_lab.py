"""The provider's side of device audits for the tests: its real token and certificate, an
accounts ledger on SQLite that knows the credit the home's meter was given, the audit
desk and withdrawals over them."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meter.cli.home import Home
from meter.cli.workflows import DEMO_CUSTOMER
from meter.host import DeviceClient
from meter.protocol.device_audit import DeviceAuditReport
from meter.provider import Provider
from meter.provider.audits import WITHOUT_POST_OFFICE, AuditDesk
from meter.provider.ledger_sql import SqlLedger, open_ledger
from meter.provider.withdrawal import RevocationBook, Withdrawals
from meter.psd.firmware import PSD

FUNDED = 1_000_000  # mills the customer paid in


@dataclass
class ProviderLab:
    provider: Provider
    ledger: SqlLedger
    desk: AuditDesk
    withdrawals: Withdrawals
    meter_certificate: x509.Certificate
    serial: int


def meter_certificate(home: Home) -> x509.Certificate:
    return x509.load_pem_x509_certificate((home.certs / "meter.pem").read_bytes())


def local_grant_id(home: Home) -> bytes:
    """The transaction id of the home's one local signed grant (conftest.set_up's)."""
    (entry,) = [json.loads(line) for line in home.ledger.read_text().splitlines()]
    return bytes.fromhex(entry["transaction_id"])


def books(path: Path, serial: int, credited: int, transaction_id: bytes | None = None) -> SqlLedger:
    """A ledger in which the demo customer paid in FUNDED and the meter was credited,
    under ``transaction_id`` if given: the home's local grant's (`local_grant_id`), for a
    provider service that also counts the local grants it does not hold (once, never
    twice: Provider.local_credited)."""
    now = datetime.now(UTC)
    ledger = open_ledger(path)
    if ledger.customer_of(serial) is None:
        ledger.create_customer(DEMO_CUSTOMER, "Demo mailer", now)
        ledger.fund(DEMO_CUSTOMER, FUNDED, "wire-0001", now)
        ledger.authorize_meter(DEMO_CUSTOMER, serial, now)
        if credited:
            tx = transaction_id or secrets.token_bytes(16)
            ledger.prepare(tx, DEMO_CUSTOMER, serial, credited, now, now + timedelta(hours=1))
            ledger.commit(tx, b"receipt of the first credit", now)
    return ledger


@contextmanager
def provider_lab(home: Home, folder: Path, credited: int = 100_000) -> Iterator[ProviderLab]:
    cert = meter_certificate(home)
    serial = int(str(cert.subject.get_attributes_for_oid(x509.oid.NameOID.SERIAL_NUMBER)[0].value))
    folder.mkdir(parents=True, exist_ok=True)
    ledger = books(folder / "accounts.sqlite", serial, credited)
    with home.open_token("provider") as token:
        provider = Provider.open(token, home.ledger)
        desk = AuditDesk(ledger, provider.certificate, provider.signer(), provider.authorization_id)
        withdrawals = Withdrawals(desk, RevocationBook(folder / "revocations.json"))
        try:
            yield ProviderLab(provider, ledger, desk, withdrawals, cert, serial)
        finally:
            ledger.close()


def withdraw_over_socket(client: DeviceClient, home: Home, folder: Path) -> dict[str, Any]:
    """The whole Withdraw PSD for a provider logged on over ``client``: final audit, refund,
    keys destroyed, withdrawn. The device's last answer."""
    with provider_lab(home, folder) as lab:
        now = datetime.now(UTC)
        report = client.withdraw_begin(lab.desk.new_nonce(lab.serial, now))
        ack = lab.withdrawals.final_audit(report, lab.meter_certificate, now, WITHOUT_POST_OFFICE)
        return client.withdraw_complete(ack)


def withdraw_in_process(psd: PSD, home: Home, folder: Path) -> dict[str, Any]:
    """The same for a firmware in this process with a provider logged on."""
    with provider_lab(home, folder) as lab:
        now = datetime.now(UTC)
        step = psd.withdraw_psd(nonce=lab.desk.new_nonce(lab.serial, now))
        report = DeviceAuditReport.from_json(step["signed_report"], "the final report")
        ack = lab.withdrawals.final_audit(report, lab.meter_certificate, now, WITHOUT_POST_OFFICE)
        return psd.withdraw_psd(acknowledgement=ack)


# -- child processes: the provider service with the audit routes; a provider dying mid-refund --


def serve(home_path: str, ledger_path: str, keys_path: str, revocations: str, port: str) -> None:
    """What `meter provider serve` runs, with the audit and withdrawal routes added
    (meter.provider.audit_routes), on loopback ``port``."""
    import uvicorn

    from meter.postoffice.service_server import uvicorn_config
    from meter.provider.api_keys import ApiKeys
    from meter.provider.audit_routes import audit_router
    from meter.provider.http import create_provider_app
    from meter.provider.http_config import ProviderConfig

    home = Home.at(Path(home_path))
    config = ProviderConfig(ledger=ledger_path, keys=ApiKeys(Path(keys_path)).path)
    ledger = open_ledger(ledger_path)
    try:
        with home.open_token("provider") as token:
            app = create_provider_app(
                config,
                ledger,
                Provider.open(token, home.ledger),
                routers=[audit_router(Path(revocations))],
            )
            uvicorn.Server(uvicorn_config(app, "127.0.0.1", int(port), config.timeouts)).run()
    finally:
        ledger.close()


def refund_then_die(ledger_location: str, device_serial: str) -> None:
    """The provider's refund step (Withdrawals.refund) over the ledger at ``ledger_location``,
    SIGKILLed the moment the ledger has made the refund: before "withdrawal-refunded" is
    journalled."""
    import os
    import signal

    ledger = open_ledger(ledger_location)
    original = ledger.record_refund

    def refund_and_die(*args: Any, **kwargs: Any) -> int:
        available = original(*args, **kwargs)
        print(json.dumps({"refunded": True, "available": available}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        return available

    ledger.record_refund = refund_and_die  # type: ignore[method-assign]
    desk = AuditDesk(ledger, unused_certificate(), unused_signer, 1)
    Withdrawals(desk, RevocationBook(Path(os.devnull))).refund(
        int(device_serial), datetime.now(UTC)
    )
    raise SystemExit("the refund returned: the SIGKILL did not come")


def unused_certificate() -> x509.Certificate:
    """A throwaway self-signed certificate for an audit desk that only refunds (the refund
    step neither verifies nor signs)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "refund step only")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def unused_signer(_: bytes) -> bytes:
    raise AssertionError("the refund step signs nothing")


if __name__ == "__main__":
    import sys

    commands: dict[str, Callable[..., None]] = {
        "serve": serve,
        "refund-then-die": refund_then_die,
    }
    commands[sys.argv[1]](*sys.argv[2:])
