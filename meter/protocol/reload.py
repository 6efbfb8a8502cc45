"""The reload protocol (Download Postage Value over the network): handshake checks.

What both sides compute and check with public keys only; the secrets (static
and ephemeral private keys) stay in each side's token, which the callers reach
through signing and derivation functions. docs/reload-protocol.md has the
message diagram, every field and the security argument.

Each signature carries a context string, so that no signed message of one kind
can be taken for another: the provider's handshake signature (its certified
key, whose other signatures are over certificates and exports, which begin with
a DER SEQUENCE byte, never with this ASCII context), the meter's (its reload
key, used for nothing else), and the meter's statements about transactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meter.errors import CertificateError, ProtocolError
from meter.pki.reload_certs import ProviderStatus, check_reload_certificate, verify_ecdsa
from meter.protocol.credit import verify_provider_certificate
from meter.protocol.reload_channel import transcript_hash
from meter.protocol.reload_messages import Accept, Finish, Hello, Statement, StatementKind

__all__ = [
    "PREPARE_TIMEOUT",
    "SESSION_LIFETIME",
    "ProviderIdentity",
    "accept_message",
    "check_accept",
    "check_finish",
    "check_hello",
    "check_statement",
    "finish_message",
    "statement_message",
]

# The meter refuses every message of a session this long after its begin (on a clock that
# counts suspend: CLOCK_BOOTTIME), so a grant can be applied only within it.
SESSION_LIFETIME = timedelta(minutes=2)
# A PREPARED transaction expires this long after it was prepared: by then the meter can no
# longer apply it (SESSION_LIFETIME, with a wide margin), so its fate is fixed and the meter's
# next contact tells it (docs/reload-protocol.md, Timeouts).
PREPARE_TIMEOUT = timedelta(minutes=15)

_CONTEXT = b"meter reload v1 "


def accept_message(hello: bytes, accept: Accept) -> bytes:
    """What the provider signs: the hello as received and the accept without its signature."""
    return _CONTEXT + b"provider accept\x00" + transcript_hash(hello, accept.unsigned_part())


def finish_message(hello: bytes, accept: bytes) -> bytes:
    """What the meter signs with its reload key: the hello and the accept as exchanged."""
    return _CONTEXT + b"meter finish\x00" + transcript_hash(hello, accept)


def statement_message(statement: Statement) -> bytes:
    return _CONTEXT + b"statement\x00" + statement.signed_part()


@dataclass(frozen=True)
class ProviderIdentity:
    certificate: x509.Certificate
    authorization_id: int
    key: ec.EllipticCurvePublicKey


def check_accept(
    hello: bytes,
    accept: Accept,
    root: x509.Certificate,
    authorization_id: int,
    at: datetime,
) -> ProviderIdentity:
    """The meter's checks of the provider's accept: chain to the meter's postal root, the
    meter's own provider (authorization id), a fresh "good" status, and the signature."""
    try:
        provider = x509.load_der_x509_certificate(accept.provider_certificate)
    except ValueError as exc:
        raise CertificateError("the provider's certificate is not DER") from exc
    try:
        auth = verify_provider_certificate(provider, root, at)
    except ProtocolError as exc:
        raise CertificateError(f"the provider is not trusted: {exc}") from exc
    if auth != authorization_id:
        raise CertificateError(
            f"the provider is authorization id {auth}; this meter belongs to {authorization_id}"
        )
    ProviderStatus.from_bytes(accept.provider_status).check(provider, root, at)
    key = provider.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError("the provider's certificate does not hold an ECDSA key")
    if not verify_ecdsa(key, accept.signature, accept_message(hello, accept)):
        raise ProtocolError(
            "the provider's handshake signature does not verify (altered, replayed from "
            "another session, or not the certified provider)"
        )
    check_point(accept.ephemeral, "the provider's")
    return ProviderIdentity(provider, auth, key)


@dataclass(frozen=True)
class MeterIdentity:
    device_serial: int
    key: ec.EllipticCurvePublicKey


def check_hello(hello: Hello, provider: x509.Certificate, at: datetime) -> MeterIdentity:
    """The provider's checks of a hello: its reload certificate (issued by this provider,
    valid, a reload certificate), naming the serial the hello claims; a positive amount."""
    if hello.amount <= 0:
        raise ProtocolError(f"reload amount must be positive (got {hello.amount} mills)")
    try:
        cert = x509.load_der_x509_certificate(hello.reload_certificate)
    except ValueError as exc:
        raise CertificateError("the meter's reload certificate is not DER") from exc
    serial, key = check_reload_certificate(cert, provider, at)
    if serial != hello.device_serial:
        raise CertificateError(
            f"the reload certificate is for device {serial}, the hello claims {hello.device_serial}"
        )
    check_point(hello.ephemeral, "the meter's")
    return MeterIdentity(serial, key)


def check_finish(hello: bytes, accept: bytes, finish: Finish, meter: MeterIdentity) -> None:
    if not verify_ecdsa(meter.key, finish.signature, finish_message(hello, accept)):
        raise ProtocolError(
            "the meter's handshake signature does not verify (altered, replayed from another "
            "session, or not the certified meter)"
        )


def check_statement(statement: Statement, meter: MeterIdentity, session_id: bytes) -> StatementKind:
    """A meter's signed statement: its serial, its signature; NOT_APPLIED from this session."""
    if statement.device_serial != meter.device_serial:
        raise ProtocolError(
            f"statement is about device {statement.device_serial}, not {meter.device_serial}"
        )
    if not verify_ecdsa(meter.key, statement.signature, statement_message(statement)):
        raise ProtocolError(
            f"statement about transaction {statement.transaction_id.hex()} is not signed by "
            "the meter's reload key"
        )
    if statement.kind is StatementKind.NOT_APPLIED and statement.session_id != session_id:
        raise ProtocolError("a not-applied statement from another session is not an answer")
    return statement.kind


def check_point(point: bytes, whose: str) -> None:
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise ProtocolError(f"{whose} ephemeral key is not a point on P-256") from exc
