"""The reload protocol's pure parts, without a token: messages, handshake checks, channel.

Keys here are `cryptography` keys in memory standing in for the tokens' keys (the same
signature form, r || s); the token side is tested in tests/test_reload_device.py.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.errors import CertificateError, ProtocolError
from meter.pki.issue import make_meter_certificate, make_provider_certificate, make_root_certificate
from meter.pki.reload_certs import (
    ProviderStatus,
    ProviderStatusKind,
    check_reload_certificate,
    make_reload_certificate,
)
from meter.protocol.reload import (
    accept_message,
    check_accept,
    check_finish,
    check_hello,
    check_statement,
    finish_message,
    statement_message,
)
from meter.protocol.reload_channel import (
    METER_TO_PROVIDER,
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
    Statement,
    StatementKind,
    decode_answers,
    encode_answers,
)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
SERIAL = 983973031309
AUTH = 60001


def _signer(key: ec.EllipticCurvePrivateKey):  # type: ignore[no-untyped-def]
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    provider_key: ec.EllipticCurvePrivateKey
    provider: x509.Certificate
    meter_key: ec.EllipticCurvePrivateKey
    reload_cert: x509.Certificate
    status: bytes


def make_pki(name: str = "Postal Root", auth: int = AUTH) -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = make_root_certificate(_spki(root_key), _signer(root_key), name, NOW - timedelta(days=1))
    provider_key = ec.generate_private_key(ec.SECP256R1())
    provider = make_provider_certificate(
        _spki(provider_key), auth, "Provider", root, _signer(root_key), NOW - timedelta(days=1)
    )
    meter_key = ec.generate_private_key(ec.SECP256R1())
    reload_cert = make_reload_certificate(
        _spki(meter_key), SERIAL, provider, _signer(provider_key), NOW - timedelta(days=1)
    )
    status = ProviderStatus.issue(
        provider, ProviderStatusKind.GOOD, _signer(root_key), NOW - timedelta(hours=1)
    ).to_bytes()
    return Pki(root_key, root, provider_key, provider, meter_key, reload_cert, status)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Run:
    hello: bytes
    accept: bytes
    finish: bytes
    meter: Channel
    provider: Channel
    nonce: bytes


def handshake(pki: Pki, *, status: bytes | None = None, provider_cert: bytes | None = None) -> Run:
    """Both sides of one handshake, as the device and the provider service run it."""
    m_eph = ec.generate_private_key(ec.SECP256R1())
    nonce = secrets.token_bytes(32)
    hello = Hello(SERIAL, 5000, _der(pki.reload_cert), _point(m_eph), nonce).to_bytes()
    # provider
    parsed = Hello.from_bytes(hello)
    meter = check_hello(parsed, pki.provider, NOW)
    p_eph = ec.generate_private_key(ec.SECP256R1())
    sid = secrets.token_bytes(16)
    unsigned = Accept(
        sid,
        provider_cert or _der(pki.provider),
        status or pki.status,
        _point(p_eph),
        secrets.token_bytes(32),
    )
    signature = _signer(pki.provider_key)(accept_message(hello, unsigned))
    accept = replace(unsigned, signature=signature).to_bytes()
    # meter
    received = Accept.from_bytes(accept)
    check_accept(hello, received, pki.root, AUTH, NOW)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), received.ephemeral)
    z_m = m_eph.exchange(ec.ECDH(), peer)
    finish = Finish(sid, _signer(pki.meter_key)(finish_message(hello, accept))).to_bytes()
    m_keys = session_keys(z_m, transcript_hash(hello, accept, finish))
    # provider
    check_finish(hello, accept, Finish.from_bytes(finish), meter)
    z_p = p_eph.exchange(
        ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), parsed.ephemeral)
    )
    p_keys = session_keys(z_p, transcript_hash(hello, accept, finish))
    assert m_keys == p_keys
    return Run(
        hello,
        accept,
        finish,
        Channel(sid, METER_TO_PROVIDER, m_keys),
        Channel(sid, PROVIDER_TO_METER, p_keys),
        nonce,
    )


def test_a_handshake_agrees_keys_and_the_channel_carries_messages(pki: Pki) -> None:
    run = handshake(pki)
    assert run.meter.keys[METER_TO_PROVIDER] != run.meter.keys[PROVIDER_TO_METER]
    settle = Settle((secrets.token_bytes(16),))
    record = run.provider.seal(Kind.SETTLE, settle.to_bytes())
    assert Settle.from_bytes(run.meter.open(record, Kind.SETTLE)) == settle
    grant = Grant(secrets.token_bytes(16), SERIAL, 5000, run.nonce)
    assert settle.to_bytes() not in record  # encrypted
    second = run.provider.seal(Kind.GRANT, grant.to_bytes())
    assert Grant.from_bytes(run.meter.open(second, Kind.GRANT)) == grant


def test_an_altered_record_is_refused_and_closes_the_channel(pki: Pki) -> None:
    run = handshake(pki)
    record = bytearray(run.provider.seal(Kind.SETTLE, Settle(()).to_bytes()))
    record[-1] ^= 1
    with pytest.raises(ProtocolError, match="does not authenticate"):
        run.meter.open(bytes(record), Kind.SETTLE)
    with pytest.raises(ProtocolError, match="closed"):
        run.meter.open(bytes(record), Kind.SETTLE)


def test_a_replayed_or_reordered_record_is_refused(pki: Pki) -> None:
    run = handshake(pki)
    first = run.provider.seal(Kind.SETTLE, Settle(()).to_bytes())
    second = run.provider.seal(Kind.GRANT, Grant(bytes(range(16)), SERIAL, 1, run.nonce).to_bytes())
    with pytest.raises(ProtocolError, match="number 1 arrived where number 0"):
        run.meter.open(second, Kind.GRANT)  # reordered
    replay = handshake(pki)
    record = replay.provider.seal(Kind.SETTLE, Settle(()).to_bytes())
    replay.meter.open(record, Kind.SETTLE)
    again = handshake(pki)  # a fresh channel, so the refusal below is the replay's alone
    again.meter.open(again.provider.seal(Kind.SETTLE, Settle(()).to_bytes()), Kind.SETTLE)
    with pytest.raises(ProtocolError, match="number 0 arrived where number 1"):
        replay.meter.open(record, Kind.SETTLE)  # replayed
    wrong_place = again.provider.seal(Kind.SETTLE, Settle(()).to_bytes())
    with pytest.raises(ProtocolError, match="expected a reload grant record, got settle"):
        again.meter.open(wrong_place, Kind.GRANT)
    assert first != second


def test_a_record_from_another_session_is_refused(pki: Pki) -> None:
    old, new = handshake(pki), handshake(pki)
    record = old.provider.seal(Kind.SETTLE, Settle(()).to_bytes())
    with pytest.raises(ProtocolError, match="another session"):
        new.meter.open(record, Kind.SETTLE)
    # the same session id with other keys (a forged header) does not authenticate either
    third = handshake(pki)
    forged = Channel(third.meter.session_id, PROVIDER_TO_METER, old.provider.keys)
    with pytest.raises(ProtocolError, match="does not authenticate"):
        third.meter.open(forged.seal(Kind.SETTLE, Settle(()).to_bytes()), Kind.SETTLE)


def test_an_accept_replayed_into_another_session_is_refused(pki: Pki) -> None:
    recorded = handshake(pki)
    fresh_hello = Hello(
        SERIAL,
        5000,
        _der(pki.reload_cert),
        _point(ec.generate_private_key(ec.SECP256R1())),
        secrets.token_bytes(32),
    ).to_bytes()
    with pytest.raises(ProtocolError, match="handshake signature does not verify"):
        check_accept(fresh_hello, Accept.from_bytes(recorded.accept), pki.root, AUTH, NOW)


def test_a_finish_replayed_into_another_session_is_refused(pki: Pki) -> None:
    one, two = handshake(pki), handshake(pki)
    meter = check_hello(Hello.from_bytes(two.hello), pki.provider, NOW)
    with pytest.raises(ProtocolError, match="meter's handshake signature"):
        check_finish(two.hello, two.accept, Finish.from_bytes(one.finish), meter)


def test_a_provider_from_another_root_is_refused(pki: Pki) -> None:
    other = make_pki("Another Root")
    with pytest.raises(CertificateError, match="not trusted"):
        handshake(pki, provider_cert=_der(other.provider), status=other.status)


def test_a_provider_of_another_authorization_id_is_refused(pki: Pki) -> None:
    other = make_provider_certificate(
        _spki(pki.provider_key),
        70002,
        "Elsewhere",
        pki.root,
        _signer(pki.root_key),
        NOW - timedelta(days=1),
    )
    status = ProviderStatus.issue(
        other, ProviderStatusKind.GOOD, _signer(pki.root_key), NOW
    ).to_bytes()
    with pytest.raises(CertificateError, match="authorization id 70002"):
        handshake(pki, provider_cert=_der(other), status=status)


def test_an_expired_provider_certificate_is_refused(pki: Pki) -> None:
    expired = make_provider_certificate(
        _spki(pki.provider_key),
        AUTH,
        "Provider",
        pki.root,
        _signer(pki.root_key),
        NOW - timedelta(days=10),
        days=2,
    )
    status = ProviderStatus.issue(
        expired, ProviderStatusKind.GOOD, _signer(pki.root_key), NOW
    ).to_bytes()
    with pytest.raises(CertificateError, match="not valid at"):
        handshake(pki, provider_cert=_der(expired), status=status)


def test_a_revoked_provider_is_refused(pki: Pki) -> None:
    revoked = ProviderStatus.issue(
        pki.provider, ProviderStatusKind.REVOKED, _signer(pki.root_key), NOW - timedelta(minutes=1)
    ).to_bytes()
    with pytest.raises(CertificateError, match="revoked by the postal root"):
        handshake(pki, status=revoked)


def test_a_stale_or_forged_provider_status_is_refused(pki: Pki) -> None:
    stale = ProviderStatus.issue(
        pki.provider, ProviderStatusKind.GOOD, _signer(pki.root_key), NOW - timedelta(days=8)
    ).to_bytes()
    with pytest.raises(CertificateError, match="stale"):
        handshake(pki, status=stale)
    forged = ProviderStatus.issue(
        pki.provider, ProviderStatusKind.GOOD, _signer(pki.provider_key), NOW
    ).to_bytes()
    with pytest.raises(CertificateError, match="not signed by the postal root"):
        handshake(pki, status=forged)
    other = make_pki()
    about_other = ProviderStatus.issue(
        other.provider, ProviderStatusKind.GOOD, _signer(pki.root_key), NOW
    ).to_bytes()
    with pytest.raises(CertificateError, match="another provider certificate"):
        handshake(pki, status=about_other)


def test_a_stamp_certificate_cannot_authenticate_a_reload(pki: Pki) -> None:
    stamp = make_meter_certificate(
        _spki(pki.meter_key),
        SERIAL,
        pki.provider,
        _signer(pki.provider_key),
        NOW - timedelta(days=1),
    )
    with pytest.raises(CertificateError, match="not a reload certificate"):
        check_reload_certificate(stamp, pki.provider, NOW)
    hello = Hello(SERIAL, 1, _der(stamp), _point(pki.meter_key), bytes(32))
    with pytest.raises(CertificateError, match="not a reload certificate"):
        check_hello(hello, pki.provider, NOW)


def test_a_hello_of_another_provider_or_serial_or_amount_is_refused(pki: Pki) -> None:
    point = _point(ec.generate_private_key(ec.SECP256R1()))
    other = make_pki()
    with pytest.raises(CertificateError, match="not issued by this provider"):
        check_hello(Hello(SERIAL, 1, _der(other.reload_cert), point, bytes(32)), pki.provider, NOW)
    with pytest.raises(CertificateError, match="the hello claims 42"):
        check_hello(Hello(42, 1, _der(pki.reload_cert), point, bytes(32)), pki.provider, NOW)
    for amount in (0,):
        with pytest.raises(ProtocolError, match="must be positive"):
            check_hello(
                Hello(SERIAL, amount, _der(pki.reload_cert), point, bytes(32)), pki.provider, NOW
            )
    with pytest.raises(ProtocolError, match="not a point on P-256"):
        check_hello(
            Hello(SERIAL, 1, _der(pki.reload_cert), b"\x04" + bytes(64), bytes(32)),
            pki.provider,
            NOW,
        )


def test_statements_are_signed_bound_and_checked(pki: Pki) -> None:
    run = handshake(pki)
    meter = check_hello(Hello.from_bytes(run.hello), pki.provider, NOW)
    txid = secrets.token_bytes(16)

    def signed(statement: Statement, key: ec.EllipticCurvePrivateKey = pki.meter_key) -> Statement:
        return replace(statement, signature=_signer(key)(statement_message(statement)))

    receipt = signed(Statement(StatementKind.APPLIED, SERIAL, txid, 5000, bytes(16)))
    assert (
        check_statement(Statement.from_bytes(receipt.to_bytes()), meter, run.meter.session_id)
        is StatementKind.APPLIED
    )
    not_applied = signed(
        Statement(StatementKind.NOT_APPLIED, SERIAL, txid, 0, run.meter.session_id)
    )
    assert check_statement(not_applied, meter, run.meter.session_id) is StatementKind.NOT_APPLIED
    with pytest.raises(ProtocolError, match="another session"):
        check_statement(not_applied, meter, secrets.token_bytes(16))
    with pytest.raises(ProtocolError, match="not signed by the meter's reload key"):
        check_statement(
            signed(
                Statement(StatementKind.APPLIED, SERIAL, txid, 5000, bytes(16)), pki.provider_key
            ),
            meter,
            b"",
        )
    with pytest.raises(ProtocolError, match="about device 1"):
        check_statement(
            signed(Statement(StatementKind.APPLIED, 1, txid, 5000, bytes(16))), meter, b""
        )
    altered = replace(receipt, control_total=receipt.control_total + 1000)
    with pytest.raises(ProtocolError, match="not signed"):
        check_statement(altered, meter, b"")
    assert decode_answers(encode_answers([receipt, not_applied])) == [receipt, not_applied]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated|expected"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b"XXXX" + b[4:], "not a reload protocol message"),
        (lambda b: b[:4] + bytes([Kind.ACCEPT]) + b[5:], "expected a reload hello"),
    ],
)
def test_malformed_messages_are_refused(pki: Pki, mutate, message) -> None:  # type: ignore[no-untyped-def]
    hello = Hello(SERIAL, 1, _der(pki.reload_cert), _point(pki.meter_key), bytes(32)).to_bytes()
    assert Hello.from_bytes(hello).device_serial == SERIAL
    with pytest.raises(ProtocolError, match=message):
        Hello.from_bytes(mutate(hello))


def test_a_settle_naming_a_transaction_twice_is_refused() -> None:
    txid = bytes(range(16))
    with pytest.raises(ProtocolError, match="twice"):
        Settle.from_bytes(Settle((txid, txid)).to_bytes())
