"""Request Device Audit: the meter's signed report, its verification, and what a provider
refuses (wrong nonce, replay, altered report, another device's report, wrong signer)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.cli.home import Home
from meter.cli.workflows import DEMO_CUSTOMER
from meter.errors import DeviceLocked, InvalidInput, ProtocolError
from meter.indicium import key_id
from meter.pki.issue import (
    make_meter_certificate,
    make_provider_certificate,
    make_root_certificate,
)
from meter.protocol.device_audit import (
    AckOutcome,
    AuditAcknowledgement,
    DeviceAuditReport,
    check_nonce,
    nonce_from_hex,
)
from meter.provider.audits import WITHOUT_POST_OFFICE, AuditFailed, PostOfficeFigures
from meter.provider.ledger import TransactionState
from meter.psd.firmware import PSD
from tests._audit_lab import provider_lab
from tests.conftest import ROLE_USERS

NOW = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)


# -- pure: the formats and their verification, keys made by `cryptography` ----------------


class RawKey:
    """A P-256 key signing as the token does (r || s)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32) + s.to_bytes(32)

    @property
    def spki(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def chain() -> dict[str, object]:
    root, provider, meter, other = RawKey(), RawKey(), RawKey(), RawKey()
    root_cert = make_root_certificate(root.spki, root.sign, "Postal root", NOW)
    provider_cert = make_provider_certificate(
        provider.spki, 4242, "Provider", root_cert, root.sign, NOW
    )
    meter_cert = make_meter_certificate(meter.spki, 1001, provider_cert, provider.sign, NOW)
    other_cert = make_meter_certificate(other.spki, 1002, provider_cert, provider.sign, NOW)
    return {
        "provider": provider,
        "provider_cert": provider_cert,
        "meter": meter,
        "meter_cert": meter_cert,
        "other": other,
        "other_cert": other_cert,
    }


def _report(meter: RawKey, cert: x509.Certificate, nonce: bytes) -> DeviceAuditReport:
    return DeviceAuditReport(
        device_serial=1001,
        authorization_id=4242,
        key_id=key_id(cert.public_key()),
        nonce=nonce,
        ascending=2_190,
        descending=97_810,
        control_total=100_000,
        piece_count=3,
        module_state="authorized",
        withdrawing=False,
        meter_time=NOW,
        self_tests_passed=True,
        psc_version="1.0.0",
        last_audit_at=None,
    ).signed_by(meter.sign)


def test_a_report_round_trips_and_verifies_for_its_nonce(chain: dict[str, object]) -> None:
    meter, cert = chain["meter"], chain["meter_cert"]
    assert isinstance(meter, RawKey) and isinstance(cert, x509.Certificate)
    nonce = bytes(range(32))
    report = _report(meter, cert, nonce)
    again = DeviceAuditReport.from_json(report.to_bytes(), "report")
    assert again == report and again.digest() == report.digest()
    again.verify(cert, nonce)
    # Domain-separated: what is signed can never be a PIM-1 signed part (version 0x01).
    assert report.signed_part().startswith(b"pim-device-audit-v1\n")
    with pytest.raises(ProtocolError, match="not the one asked for"):
        again.verify(cert, bytes(32))


def test_an_altered_report_does_not_verify(chain: dict[str, object]) -> None:
    meter, cert = chain["meter"], chain["meter_cert"]
    assert isinstance(meter, RawKey) and isinstance(cert, x509.Certificate)
    report = _report(meter, cert, bytes(16))
    doc = report.to_json()
    doc["registers"] = {"ascending": 0, "descending": 100_000, "control_total": 100_000}
    altered = DeviceAuditReport.from_json(json.dumps(doc), "altered")
    with pytest.raises(ProtocolError, match="does not verify"):
        altered.verify(cert)
    doc = report.to_json()
    doc["registers"]["descending"] += 1
    with pytest.raises(InvalidInput, match="do not add up"):
        DeviceAuditReport.from_json(json.dumps(doc), "inconsistent")


def test_a_report_checked_against_another_meters_certificate_is_refused(
    chain: dict[str, object],
) -> None:
    meter, cert, other_cert = chain["meter"], chain["meter_cert"], chain["other_cert"]
    assert isinstance(meter, RawKey) and isinstance(cert, x509.Certificate)
    assert isinstance(other_cert, x509.Certificate)
    report = _report(meter, cert, bytes(16))
    with pytest.raises(ProtocolError, match="certificate of device 1002"):
        report.verify(other_cert)
    # Signed by another key, claiming this meter: the key id gives it away, or the signature.
    other = chain["other"]
    assert isinstance(other, RawKey)
    forged = replace(report, signature=b"").signed_by(other.sign)
    with pytest.raises(ProtocolError, match="does not verify"):
        forged.verify(cert)


def test_acknowledgement_verifies_only_with_the_providers_certificate(
    chain: dict[str, object],
) -> None:
    provider, provider_cert, meter = chain["provider"], chain["provider_cert"], chain["meter"]
    meter_cert = chain["meter_cert"]
    assert isinstance(provider, RawKey) and isinstance(meter, RawKey)
    assert isinstance(provider_cert, x509.Certificate) and isinstance(meter_cert, x509.Certificate)
    ack = AuditAcknowledgement(4242, 1001, bytes(32), 1, 2, 3, NOW, AckOutcome.OK)
    signed = AuditAcknowledgement.from_json(ack.signed_by(provider.sign).to_json(), "ack")
    signed.verify(provider_cert)
    by_meter = ack.signed_by(meter.sign)
    with pytest.raises(ProtocolError, match="does not verify"):
        by_meter.verify(provider_cert)
    with pytest.raises(ProtocolError, match="authorization id"):
        signed.verify(meter_cert)  # a meter's certificate names no provider
    doc = signed.to_json()
    doc["outcome"] = "withdrawal"
    with pytest.raises(ProtocolError, match="does not verify"):
        AuditAcknowledgement.from_json(doc, "ack").verify(provider_cert)
    doc["outcome"] = "great"
    with pytest.raises(InvalidInput, match="outcome"):
        AuditAcknowledgement.from_json(doc, "ack")


@pytest.mark.parametrize("nonce", [b"", bytes(15), bytes(33)])
def test_nonces_must_be_16_to_32_bytes(nonce: bytes) -> None:
    with pytest.raises(InvalidInput, match="16 to 32"):
        check_nonce(nonce)
    with pytest.raises(InvalidInput, match="not hex"):
        nonce_from_hex("zz" * 16)


def test_a_report_with_an_unknown_member_is_refused(chain: dict[str, object]) -> None:
    meter, cert = chain["meter"], chain["meter_cert"]
    assert isinstance(meter, RawKey) and isinstance(cert, x509.Certificate)
    doc = _report(meter, cert, bytes(16)).to_json()
    doc["extra"] = 1
    with pytest.raises(InvalidInput, match="unknown members"):
        DeviceAuditReport.from_json(doc, "report")


# -- the device and the provider, on SoftHSM2 -------------------------------------------------


@pytest.fixture
def psd(device_home: Home) -> Iterator[PSD]:
    device = PSD.power_up(device_home.open_device_token(), device_home.device)
    yield device
    device.power_down()


@pytest.mark.softhsm
def test_the_device_signs_a_report_the_provider_accepts_and_records(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    with provider_lab(device_home, tmp_path / "provider") as lab:
        psd.logon(*ROLE_USERS["auditor"])  # unlocks the token; the audit itself is No-Role
        psd.logoff()
        nonce = lab.desk.new_nonce(lab.serial, datetime.now(UTC))
        answer = psd.request_device_audit(nonce)
        report = DeviceAuditReport.from_json(answer["signed_report"], "the device's report")
        assert report.nonce == nonce and report.device_serial == lab.serial
        assert (report.ascending, report.descending, report.piece_count) == (0, 100_000, 0)
        assert report.self_tests_passed and not report.withdrawing
        ack = lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), WITHOUT_POST_OFFICE)
        recorded = lab.ledger.last_audit(lab.serial)
        assert recorded is not None and recorded["outcome"] == "ok"
        assert recorded["report"] == report.to_bytes()
        # Replayed: the nonce was used; nothing more is recorded.
        with pytest.raises(ProtocolError, match="replayed or stale"):
            lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), WITHOUT_POST_OFFICE)
        assert lab.ledger.last_audit(lab.serial) == recorded
        # The meter takes the acknowledgement once; the watchdog restarts from now.
        done = psd.acknowledge_device_audit(ack)
        assert psd.request_status()["last_audit_at"] == done["last_audit_at"]
        with pytest.raises(ProtocolError, match="acknowledged already"):
            psd.acknowledge_device_audit(ack)


@pytest.mark.softhsm
def test_a_report_for_another_nonce_or_altered_is_refused_and_not_recorded(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    with provider_lab(device_home, tmp_path / "provider") as lab:
        psd.logon(*ROLE_USERS["customer"])
        asked = lab.desk.new_nonce(lab.serial, datetime.now(UTC))
        own = psd.request_device_audit(bytes(range(16)))["signed_report"]  # not the provider's
        report = DeviceAuditReport.from_json(own, "report")
        with pytest.raises(ProtocolError, match="did not hand out"):
            lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), WITHOUT_POST_OFFICE)
        doc = psd.request_device_audit(asked)["signed_report"]
        doc["registers"] = {"ascending": 0, "descending": 200_000, "control_total": 200_000}
        with pytest.raises(ProtocolError, match="does not verify"):
            lab.desk.audit(
                DeviceAuditReport.from_json(doc, "altered"),
                lab.meter_certificate,
                datetime.now(UTC),
                WITHOUT_POST_OFFICE,
            )
        assert lab.ledger.last_audit(lab.serial) is None


@pytest.mark.softhsm
def test_figures_that_disagree_with_the_ledger_or_post_office_fail_the_audit(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    # The ledger credited 50,000 mills; the meter holds 100,000: postage never sold.
    with provider_lab(device_home, tmp_path / "provider", credited=50_000) as lab:
        psd.logon(*ROLE_USERS["customer"])
        nonce = lab.desk.new_nonce(lab.serial, datetime.now(UTC))
        report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
        seen = PostOfficeFigures.from_reconciliation(
            {
                "devices": [{"device_serial": lab.serial, "last_sequence": 7, "last_ascending": 5}],
                "findings": [],
            },
            lab.serial,
            "reconciliation",
        )
        with pytest.raises(AuditFailed, match="credited 50000") as failed:
            lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), seen)
        assert "saw piece 7" in str(failed.value) and "ascending register of 5" in str(failed.value)
        recorded = lab.ledger.last_audit(lab.serial)
        assert recorded is not None and recorded["outcome"] == "failed"
        assert len(recorded["details"]["findings"]) == 3


@pytest.mark.softhsm
def test_a_signed_audit_needs_the_token_unlocked(device_home: Home) -> None:
    with PSD.power_up(device_home.open_device_token(), device_home.device) as psd:
        health = psd.request_device_audit()  # the unsigned check works before any logon
        assert health["signed_report"] is None and health["self_tests"]["passed"]
        with pytest.raises(DeviceLocked, match="not been unlocked"):
            psd.request_device_audit(bytes(16))


@pytest.mark.softhsm
def test_an_acknowledgement_from_another_signer_or_too_late_is_refused(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    with provider_lab(device_home, tmp_path / "provider") as lab:
        psd.logon(*ROLE_USERS["customer"])
        nonce = lab.desk.new_nonce(lab.serial, datetime.now(UTC))
        report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
        ack = lab.desk.audit(report, lab.meter_certificate, datetime.now(UTC), WITHOUT_POST_OFFICE)
        rogue = RawKey()
        forged = replace(ack, signature=b"").signed_by(rogue.sign)
        with pytest.raises(ProtocolError, match="does not verify"):
            psd.acknowledge_device_audit(forged)
        other_device = replace(ack, device_serial=lab.serial + 1)
        with pytest.raises(ProtocolError, match="for device"):
            psd.acknowledge_device_audit(other_device)
        withdrawal = replace(ack, outcome=AckOutcome.WITHDRAWAL, signature=b"").signed_by(
            lab.desk.sign
        )
        with pytest.raises(ProtocolError, match="completes a withdrawal"):
            psd.acknowledge_device_audit(withdrawal)
        assert psd.request_status()["last_audit_at"] is None
        # The genuine one still counts: refusals changed nothing.
        assert psd.acknowledge_device_audit(ack)["last_audit_at"] is not None


@pytest.mark.softhsm
def test_an_audit_releases_expired_grants_the_meter_never_applied(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    """A provider that prepared a grant and never delivered it (it crashed, the host was
    cut): once the grant can no longer be applied, the meter's signed audit, whose control
    total lacks it, aborts it and the customer's funds come back. A grant not yet expired
    stays open (its session might still deliver it), and so does everything when the
    control total does not match the committed credit."""
    with provider_lab(device_home, tmp_path / "provider") as lab:
        psd.logon(*ROLE_USERS["customer"])
        now = datetime.now(UTC)
        available = lab.ledger.available(DEMO_CUSTOMER)
        lost, fresh = bytes(range(16)), bytes(range(1, 17))
        lab.ledger.prepare(lost, DEMO_CUSTOMER, lab.serial, 7_000, now, now + timedelta(minutes=15))
        assert lab.ledger.available(DEMO_CUSTOMER) == available - 7_000

        # Within its timeout the grant might still be applied: the audit leaves it open.
        nonce = lab.desk.new_nonce(lab.serial, now)
        report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
        lab.desk.audit(report, lab.meter_certificate, now, WITHOUT_POST_OFFICE)
        assert [t.transaction_id for t in lab.ledger.open_transactions(lab.serial)] == [lost]

        # 16 minutes on, a report made after the expiry proves it was never applied.
        later = now + timedelta(minutes=16)
        lab.ledger.prepare(
            fresh, DEMO_CUSTOMER, lab.serial, 3_000, later, later + timedelta(minutes=15)
        )
        nonce = lab.desk.new_nonce(lab.serial, later)
        report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
        lab.desk.audit(report, lab.meter_certificate, later, WITHOUT_POST_OFFICE)
        settled = lab.ledger.transaction(lost)
        assert settled is not None and settled.state is TransactionState.ABORTED
        assert "never applied" in str(settled.reason)
        assert [t.transaction_id for t in lab.ledger.open_transactions(lab.serial)] == [fresh]
        assert lab.ledger.available(DEMO_CUSTOMER) == available - 3_000
        recorded = lab.ledger.last_audit(lab.serial)
        assert recorded is not None and recorded["details"]["aborted_unapplied"] == [lost.hex()]


@pytest.mark.softhsm
def test_an_audit_never_releases_a_grant_the_meter_may_have_applied(
    psd: PSD, device_home: Home, tmp_path: Path
) -> None:
    """The ledger committed less than the meter's control total (a grant applied whose
    receipt was lost): no open transaction is aborted, however old."""
    with provider_lab(device_home, tmp_path / "provider", credited=60_000) as lab:
        psd.logon(*ROLE_USERS["customer"])
        now = datetime.now(UTC)
        # The meter holds 100,000: 40,000 applied under the open transaction below.
        txid = bytes(16 * [7])
        lab.ledger.prepare(
            txid, DEMO_CUSTOMER, lab.serial, 40_000, now, now + timedelta(minutes=15)
        )
        later = now + timedelta(days=2)
        nonce = lab.desk.new_nonce(lab.serial, later)
        report = DeviceAuditReport.from_json(psd.request_device_audit(nonce)["signed_report"], "r")
        lab.desk.audit(report, lab.meter_certificate, later, WITHOUT_POST_OFFICE)
        still = lab.ledger.transaction(txid)
        assert still is not None and still.state is TransactionState.PREPARED
