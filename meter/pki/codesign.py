"""The provider's code-signing certificate: what lets a meter trust an update bundle.

The postal root certifies it directly (not through the provider's certificate, so
a provider's ordinary signing key can never sign software, and a code-signing key
can never certify a meter):

- subject: ``CN=<provider name> code signing``, ``serialNumber=<authorization id>``;
- basic constraints ``ca=False`` (critical): it certifies nothing;
- extended key usage ``codeSigning`` only (critical), key usage digitalSignature;
- an ECDSA P-256 key, generated in the provider's token.

A meter's or provider's certificate carries no code-signing usage, and a
code-signing certificate is issued by no provider, so the trust store of the post
office (meter.pki.trust) never takes one for a meter credential.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meter.errors import CertificateError
from meter.pki.issue import _SIGNATURE_ONLY, RawSigner, _issued_by, _sign_builder, _subject

__all__ = ["make_code_signing_certificate", "verify_code_signing_certificate"]


def make_code_signing_certificate(
    public_key_spki: bytes,
    authorization_id: int,
    name: str,
    root: x509.Certificate,
    sign_with_root: RawSigner,
    not_before: datetime,
    days: int = 730,
) -> x509.Certificate:
    """A code-signing certificate for a provider's key, signed by the postal root's key."""
    if not 0 < authorization_id < 2**32:
        raise CertificateError(f"authorization id {authorization_id} must be in 1..2^32-1")
    subject = _subject(f"{name} code signing", authorization_id)
    builder = (
        _issued_by(root, subject, public_key_spki, not_before, days, False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=True)
        .add_extension(_SIGNATURE_ONLY, critical=True)
    )
    return _sign_builder(builder, sign_with_root)


def verify_code_signing_certificate(
    certificate: x509.Certificate, root: x509.Certificate, at: datetime
) -> int:
    """CertificateError unless the postal root ``root`` issued ``certificate`` for code
    signing and it is valid at ``at``; the provider's authorization id it names."""
    name = certificate.subject.rfc4514_string()
    try:
        certificate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            f"code-signing certificate {name!r} is not issued by this device's postal root "
            f"({root.subject.rfc4514_string()!r}): a bundle from another root"
        ) from exc
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound as exc:
        raise CertificateError(
            f"certificate {name!r} is not a code-signing certificate: it lacks an extension ({exc})"
        ) from exc
    except ValueError as exc:
        raise CertificateError(f"certificate {name!r} has unreadable extensions: {exc}") from exc
    if constraints.value.ca:
        raise CertificateError(f"code-signing certificate {name!r} must not be a CA (ca=True)")
    if ExtendedKeyUsageOID.CODE_SIGNING not in usage.value:
        raise CertificateError(
            f"certificate {name!r} is not for code signing (its extended key usage lacks "
            "codeSigning)"
        )
    if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        raise CertificateError(
            f"code-signing certificate {name!r} is not valid at {at.isoformat()} (valid "
            f"{certificate.not_valid_before_utc.isoformat()} to "
            f"{certificate.not_valid_after_utc.isoformat()})"
        )
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CertificateError(f"code-signing certificate {name!r} does not hold a P-256 key")
    serials = certificate.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    values = [str(a.value) for a in serials]
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit():
        raise CertificateError(
            f"code-signing certificate {name!r} names no authorization id (serialNumber)"
        )
    return int(values[0])
