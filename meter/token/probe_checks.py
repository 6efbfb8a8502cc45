"""The trial operations of ``meter hsm probe``: one per capability, on session objects.

Each check makes what it needs as session objects (CKA_TOKEN false) where the
operation allows, so nothing persists; only the data-object checks must make
token objects (that is what registers are), under a label unique to this run,
and destroy them before returning, passed or failed. A check returns a short
detail (and, for the operations the meter's speed depends on, a rate); any
exception means "does not work".
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters

__all__ = ["CHECKS", "Check", "Outcome", "Trial"]

_P256 = "1.2.840.10045.3.1.7"
_ED25519 = "1.3.101.112"
_PSS = (Mechanism.SHA256, MGF.SHA256, 32)
# CKH_MONOTONIC_COUNTER (PKCS#11 2.40 section 4.3.1)
_CKH_MONOTONIC_COUNTER = 0x00000001
# How long a timed operation runs: enough for a stable rate, short enough for CI.
_TIMED_SECONDS = 0.5


@dataclass(frozen=True)
class Outcome:
    detail: str
    per_second: float | None = None


class Trial:
    """A logged-in session and the session objects one check made (destroyed after)."""

    def __init__(self, session: pkcs11.Session, run_id: str) -> None:
        self.session = session
        self.run_id = run_id
        self.made: list[Any] = []

    def keep(self, *objects: Any) -> None:
        self.made.extend(objects)

    def cleanup(self) -> None:
        for obj in reversed(self.made):
            with contextlib.suppress(pkcs11.PKCS11Error):  # a session object dies with it anyway
                obj.destroy()
        self.made.clear()

    def aes(self, bits: int = 256, **flags: bool) -> Any:
        template = {Attribute.TOKEN: False, Attribute.SENSITIVE: True}
        template.update({Attribute[name.upper()]: on for name, on in flags.items()})
        key = self.session.generate_key(
            KeyType.AES, bits, mechanism=Mechanism.AES_KEY_GEN, store=False, template=template
        )
        self.keep(key)
        return key

    def ec_pair(self, oid: str, edwards: bool = False, **private_flags: bool) -> tuple[Any, Any]:
        key_type = KeyType.EC_EDWARDS if edwards else KeyType.EC
        mechanism = Mechanism.EC_EDWARDS_KEY_PAIR_GEN if edwards else Mechanism.EC_KEY_PAIR_GEN
        private = {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        private.update({Attribute[name.upper()]: on for name, on in private_flags.items()})
        pub, priv = self.session.generate_keypair(
            key_type,
            None,
            mechanism=mechanism,
            store=False,
            public_template={
                Attribute.TOKEN: False,
                Attribute.EC_PARAMS: encode_named_curve_parameters(oid),
            },
            private_template=private,
        )
        self.keep(pub, priv)
        return pub, priv


def _rate(operation: Callable[[], object]) -> float:
    count, start = 0, time.perf_counter()
    while True:
        operation()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= _TIMED_SECONDS:
            return count / elapsed


def _sha256(t: Trial) -> Outcome:
    got = bytes(t.session.digest(b"abc", mechanism=Mechanism.SHA256))
    if got != hashlib.sha256(b"abc").digest():
        raise ValueError("SHA-256('abc') differs from FIPS 180-4")
    return Outcome("SHA-256('abc') matches FIPS 180-4")


def _sign_verify(
    pub: Any, priv: Any, message: bytes, mechanism: Mechanism, param: Any = None
) -> Outcome:
    signature = priv.sign(message, mechanism=mechanism, mechanism_param=param)
    if not pub.verify(message, signature, mechanism=mechanism, mechanism_param=param):
        raise ValueError("the token did not verify its own signature")
    rate = _rate(lambda: priv.sign(message, mechanism=mechanism, mechanism_param=param))
    return Outcome(f"generate, sign, verify with {mechanism.name}", rate)


def _raw_ecdsa(t: Trial) -> Outcome:
    pub, priv = t.ec_pair(_P256, sign=True)
    return _sign_verify(pub, priv, hashlib.sha256(b"probe").digest(), Mechanism.ECDSA)


def _ecdsa_with_hash(t: Trial) -> Outcome:
    pub, priv = t.ec_pair(_P256, sign=True)
    return _sign_verify(pub, priv, b"probe", Mechanism.ECDSA_SHA256)


def _eddsa(t: Trial) -> Outcome:
    pub, priv = t.ec_pair(_ED25519, edwards=True, sign=True)
    return _sign_verify(pub, priv, b"probe", Mechanism.EDDSA)


def _rsa_pss(t: Trial) -> Outcome:
    pub, priv = t.session.generate_keypair(
        KeyType.RSA,
        2048,
        mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        store=False,
        public_template={Attribute.TOKEN: False, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
        private_template={
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
        },
    )
    t.keep(pub, priv)
    return _sign_verify(pub, priv, b"probe", Mechanism.SHA256_RSA_PKCS_PSS, _PSS)


def _hmac_sha256(t: Trial) -> Outcome:
    key = t.session.generate_key(
        KeyType.GENERIC_SECRET,
        256,
        mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
        store=False,
        template={Attribute.TOKEN: False, Attribute.SIGN: True, Attribute.VERIFY: True},
    )
    t.keep(key)
    return _sign_verify(key, key, b"probe", Mechanism.SHA256_HMAC)


def _aes_cmac(t: Trial) -> Outcome:
    key = t.aes(sign=True, verify=True)
    return _sign_verify(key, key, b"probe", Mechanism.AES_CMAC)


def _round_trip(key: Any, mechanism: Mechanism, param: Any) -> None:
    plaintext = b"postage meter probe, 32 bytes.."
    sealed = key.encrypt(plaintext, mechanism=mechanism, mechanism_param=param)
    if key.decrypt(sealed, mechanism=mechanism, mechanism_param=param) != plaintext:
        raise ValueError(f"{mechanism.name} did not decrypt what it encrypted")


def _aes_gcm(t: Trial) -> Outcome:
    key = t.aes(encrypt=True, decrypt=True)
    _round_trip(key, Mechanism.AES_GCM, GCMParams(secrets.token_bytes(12), b"aad", 128))
    return Outcome("encrypt and decrypt with CKM_AES_GCM")


def _aes_cbc(t: Trial) -> Outcome:
    key = t.aes(encrypt=True, decrypt=True)
    _round_trip(key, Mechanism.AES_CBC_PAD, secrets.token_bytes(16))
    return Outcome("encrypt and decrypt with CKM_AES_CBC_PAD")


def _wrap(mechanism: Mechanism) -> Callable[[Trial], Outcome]:
    def run(t: Trial) -> Outcome:
        kek = t.aes(wrap=True, unwrap=True)
        key = t.aes(extractable=True)
        wrapped = kek.wrap_key(key, mechanism=mechanism)
        back = kek.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            wrapped,
            mechanism=mechanism,
            store=False,
            template={Attribute.TOKEN: False, Attribute.SENSITIVE: True},
        )
        t.keep(back)
        return Outcome(f"wrap and unwrap an AES key with {mechanism.name}")

    return run


def _wrap_ed25519_private(t: Trial) -> Outcome:
    kek = t.aes(wrap=True, unwrap=True)
    _, priv = t.ec_pair(_ED25519, edwards=True, sign=True, extractable=True)
    kek.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    return Outcome("wrap an Ed25519 private key with CKM_AES_KEY_WRAP_PAD")


def _ecdh_derive(t: Trial) -> Outcome:
    pub_a, priv_a = t.ec_pair(_P256, derive=True)
    pub_b, priv_b = t.ec_pair(_P256, derive=True)
    template = {Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}

    def derive(priv: Any, other: Any) -> bytes:
        key = priv.derive_key(
            KeyType.GENERIC_SECRET,
            256,
            mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, bytes(other[Attribute.EC_POINT])),
            store=False,
            template=template,
        )
        t.keep(key)
        return bytes(key[Attribute.VALUE])

    if derive(priv_a, pub_b) != derive(priv_b, pub_a):
        raise ValueError("the two sides of ECDH derived different secrets")
    return Outcome("CKM_ECDH1_DERIVE on P-256: both sides agree")


def _data_template(t: Trial, modifiable: bool) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.TOKEN: True,  # registers are token objects: that is what is measured
        Attribute.PRIVATE: True,
        Attribute.MODIFIABLE: modifiable,
        Attribute.APPLICATION: "meter-probe",
        Attribute.LABEL: f"meter-probe-{t.run_id}",
        Attribute.VALUE: secrets.token_bytes(64),
    }


def _data_objects(t: Trial) -> Outcome:
    template = _data_template(t, modifiable=False)

    def cycle() -> None:
        t.session.create_object(template).destroy()

    cycle()
    return Outcome("create and destroy a private token data object", _rate(cycle))


def _modify_data_value(t: Trial) -> Outcome:
    obj = t.session.create_object(_data_template(t, modifiable=True))
    t.keep(obj)
    obj[Attribute.VALUE] = b"changed"
    if bytes(obj[Attribute.VALUE]) != b"changed":
        raise ValueError("CKA_VALUE did not change")
    return Outcome("C_SetAttributeValue(CKA_VALUE) on a private data object")


def _monotonic_counter(t: Trial) -> Outcome:
    # Searching by CKA_HW_FEATURE_TYPE crashes openCryptoki 3.8 through python-pkcs11
    # (SIGSEGV): search by class alone, then read each object's type.
    found = [
        obj
        for obj in t.session.get_objects({Attribute.CLASS: ObjectClass.HW_FEATURE})
        if int(obj[Attribute.HW_FEATURE_TYPE]) == _CKH_MONOTONIC_COUNTER
    ]
    if not found:
        raise ValueError("no CKH_MONOTONIC_COUNTER hardware feature object")
    return Outcome(f"{len(found)} CKH_MONOTONIC_COUNTER object(s)")


def _usage_limit(t: Trial) -> Outcome:
    # python-pkcs11 0.10.1 knows no CKA_USAGE_LIMIT (PKCS#11 3.0), so it cannot be tried.
    raise ValueError("not testable through python-pkcs11 0.10.1 (no CKA_USAGE_LIMIT)")


@dataclass(frozen=True)
class Check:
    capability: str
    mechanisms: tuple[Mechanism, ...]  # all must be in the token's list for the check to run
    run: Callable[[Trial], Outcome]


CHECKS: tuple[Check, ...] = (
    Check("data_objects", (), _data_objects),
    Check("sha256", (Mechanism.SHA256,), _sha256),
    Check("raw_ecdsa", (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA), _raw_ecdsa),
    Check("ecdsa_with_hash", (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA_SHA256), _ecdsa_with_hash),
    Check("eddsa", (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA), _eddsa),
    Check("rsa_pss", (Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.SHA256_RSA_PKCS_PSS), _rsa_pss),
    Check("hmac_sha256", (Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA256_HMAC), _hmac_sha256),
    Check("aes_cmac", (Mechanism.AES_KEY_GEN, Mechanism.AES_CMAC), _aes_cmac),
    Check("aes_gcm", (Mechanism.AES_KEY_GEN, Mechanism.AES_GCM), _aes_gcm),
    Check("aes_cbc", (Mechanism.AES_KEY_GEN, Mechanism.AES_CBC_PAD), _aes_cbc),
    Check(
        "aes_key_wrap",
        (Mechanism.AES_KEY_GEN, Mechanism.AES_KEY_WRAP),
        _wrap(Mechanism.AES_KEY_WRAP),
    ),
    Check(
        "aes_key_wrap_pad",
        (Mechanism.AES_KEY_GEN, Mechanism.AES_KEY_WRAP_PAD),
        _wrap(Mechanism.AES_KEY_WRAP_PAD),
    ),
    Check(
        "wrap_ed25519_private",
        (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.AES_KEY_WRAP_PAD),
        _wrap_ed25519_private,
    ),
    Check("ecdh_derive", (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDH1_DERIVE), _ecdh_derive),
    Check("modify_data_value", (), _modify_data_value),
    Check("monotonic_counter", (), _monotonic_counter),
    Check("usage_limit", (), _usage_limit),
)
