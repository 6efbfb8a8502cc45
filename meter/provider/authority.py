"""Certifying parties whose ECDSA P-256 keys live in their own tokens: the postal root and providers."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.errors import CertificateError
from meter.pki.issue import (
    RawSigner,
    make_meter_certificate,
    make_provider_certificate,
    make_root_certificate,
)
from meter.token import KeyAlgorithm, Token

__all__ = ["CERT_APPLICATION", "CertifyingParty", "PostalRoot"]

CERT_APPLICATION = "party.certificate"


class CertifyingParty:
    """A token holding one ECDSA P-256 signing key and, once issued, its certificate."""

    key_label = "signing"

    def __init__(self, token: Token, certificate: x509.Certificate | None) -> None:
        self.token = token
        self._certificate = certificate

    @classmethod
    def _generate(cls, token: Token) -> bytes:
        return token.generate_signing_keypair(cls.key_label, KeyAlgorithm.ECDSA_P256)

    @staticmethod
    def _stored_certificate(token: Token) -> x509.Certificate | None:
        objects = token.data_objects(CERT_APPLICATION)
        return x509.load_der_x509_certificate(objects[0].value) if objects else None

    def _store_certificate(self, cert: x509.Certificate) -> None:
        if self._certificate is not None:
            raise CertificateError(f"{self.token.where}: a certificate is installed already")
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != self.public_key_spki:
            raise CertificateError(
                f"{self.token.where}: certificate does not hold this party's key"
            )
        self.token.create_data(
            CERT_APPLICATION,
            "certificate",
            cert.public_bytes(serialization.Encoding.DER),
        )
        self.token.make_durable()
        self._certificate = cert

    @property
    def public_key_spki(self) -> bytes:
        return self.token.public_key_spki(self.key_label)

    @property
    def certificate(self) -> x509.Certificate:
        if self._certificate is None:
            raise CertificateError(f"{self.token.where}: no certificate installed yet")
        return self._certificate

    def signer(self) -> RawSigner:
        return lambda data: self.token.sign(self.key_label, KeyAlgorithm.ECDSA_P256, data)

    def certify_meter(
        self, meter_spki: bytes, device_serial: int, now: datetime
    ) -> x509.Certificate:
        return make_meter_certificate(
            meter_spki, device_serial, self.certificate, self.signer(), now
        )


class PostalRoot(CertifyingParty):
    """The postal service's master key: certifies providers."""

    key_label = "postal-root-signing"

    @classmethod
    def create(cls, token: Token, name: str, now: datetime) -> PostalRoot:
        spki = cls._generate(token)
        root = cls(token, None)
        root._store_certificate(make_root_certificate(spki, root.signer(), name, now))
        return root

    @classmethod
    def open(cls, token: Token) -> PostalRoot:
        cert = cls._stored_certificate(token)
        if cert is None:
            raise CertificateError(f"{token.where}: not a postal root token (no certificate)")
        return cls(token, cert)

    def certify_provider(
        self, provider_spki: bytes, authorization_id: int, name: str, now: datetime
    ) -> x509.Certificate:
        return make_provider_certificate(
            provider_spki, authorization_id, name, self.certificate, self.signer(), now
        )
