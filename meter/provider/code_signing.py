"""The provider's code-signing key: a second key in the provider's token, certified by the
postal root for code signing (meter.pki.codesign), that signs update bundles.

It is not the provider's certifying key (``provider-signing``): a meter installs
software only under a certificate whose extended key usage says codeSigning, which the
provider's own certificate never carries.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.errors import CertificateError
from meter.pki.codesign import make_code_signing_certificate, verify_code_signing_certificate
from meter.protocol.update_bundle import BundleContents, UpdateBundle
from meter.provider.authority import PostalRoot
from meter.token import KeyAlgorithm, Token

__all__ = ["CODE_SIGNING_APPLICATION", "CODE_SIGNING_LABEL", "CodeSigner", "certify_code_signing"]

CODE_SIGNING_LABEL = "provider-code-signing"
CODE_SIGNING_APPLICATION = "party.code-signing-certificate"


def certify_code_signing(
    root: PostalRoot, public_key_spki: bytes, authorization_id: int, name: str, now: datetime
) -> x509.Certificate:
    """The postal root's side: certify a provider's code-signing key (in the root's token)."""
    return make_code_signing_certificate(
        public_key_spki, authorization_id, name, root.certificate, root.signer(), now
    )


class CodeSigner:
    """The code-signing key in a provider's token and, once certified, its certificate."""

    def __init__(self, token: Token) -> None:
        self.token = token

    def public_key_spki(self) -> bytes:
        """The key's public half, generated in the token the first time (ECDSA P-256)."""
        if not self.token.has_key(CODE_SIGNING_LABEL):
            spki = self.token.generate_signing_keypair(CODE_SIGNING_LABEL, KeyAlgorithm.ECDSA_P256)
            self.token.make_durable()
            return spki
        return self.token.public_key_spki(CODE_SIGNING_LABEL)

    @property
    def certificate(self) -> x509.Certificate:
        objects = self.token.data_objects(CODE_SIGNING_APPLICATION)
        if not objects:
            raise CertificateError(
                f"{self.token.where}: the provider has no code-signing certificate yet: run "
                "`meter provider code-signing-certificate` (the postal root certifies the key)"
            )
        return x509.load_der_x509_certificate(objects[0].value)

    def install_certificate(
        self, cert: x509.Certificate, root: x509.Certificate, now: datetime
    ) -> None:
        """Keep ``cert`` (replacing an older one) once it is checked to be the root's
        code-signing certificate of this very key."""
        verify_code_signing_certificate(cert, root, now)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != self.public_key_spki():
            raise CertificateError(
                f"{self.token.where}: the certificate is not for this code-signing key"
            )
        old = self.token.data_objects(CODE_SIGNING_APPLICATION)
        self.token.create_data(
            CODE_SIGNING_APPLICATION, "certificate", cert.public_bytes(serialization.Encoding.DER)
        )
        self.token.make_durable()
        for obj in old:  # the new one is durable first
            self.token.destroy(obj)

    def sign(self, contents: BundleContents) -> UpdateBundle:
        certificate = self.certificate
        return contents.signed_by(
            lambda data: self.token.sign(CODE_SIGNING_LABEL, KeyAlgorithm.ECDSA_P256, data),
            certificate,
        )
