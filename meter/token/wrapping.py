"""Key export and import inside the token: wrap under a trusted transport key, unwrap, check.

The meter's keys are generated ``CKA_EXTRACTABLE`` but ``CKA_WRAP_WITH_TRUSTED``
(and sensitive) on a token that can wrap them (`Token.generate_signing_keypair`
with ``exportable``): the token itself refuses to wrap them under any key the
Security Officer has not marked ``CKA_TRUSTED``. Measured on SoftHSM2 2.6.1:

- wrapping such a key under an untrusted AES key fails with ``CKR_KEY_NOT_WRAPPABLE``;
- only an SO session may create a ``CKA_TRUSTED`` key, and only as a public object
  (SoftHSM2 refuses a private object without the user's login); as a public *token*
  object its value would lie in the token's store in clear, so it is a public *session*
  object of a side session (`trusted_wrapping_key`), never written to the store;
- a user session may then wrap under it (``CKM_AES_KEY_WRAP_PAD``) and destroy it;
- an Ed25519 private key is never wrappable (``CKR_KEY_NOT_WRAPPABLE``): such a key is
  generated non-extractable, and export refuses it up front;
- ``CKA_WRAP_WITH_TRUSTED`` cannot be cleared once set (``CKR_ATTRIBUTE_READ_ONLY``).

Unwrapping needs no trusted key: the target's user session makes the transport key a
private *session* object (gone with the session whatever happens), unwraps under it,
and destroys it. Everything goes through `Token._call`, the token's one lock.

Each wrapped key carries its key check value (KCV), which the target compares after
import (meter.token.key_checks, whose names this module exports too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism, ObjectClass

from meter.errors import ConfigurationError, MeterError, TokenError
from meter.token.key_checks import KCV_MESSAGE, kcv_matches, pairwise_check, public_kcv, secret_kcv
from meter.token.session import Token

__all__ = [
    "KCV_MESSAGE",
    "TRANSPORT_LABEL_PREFIX",
    "ExportableKey",
    "WrappedKey",
    "describe_key",
    "destroy_key_object",
    "import_public_key",
    "kcv_matches",
    "pairwise_check",
    "public_kcv",
    "rename_key",
    "require_wrappable",
    "secret_kcv",
    "sweep_transport_keys",
    "trusted_wrapping_key",
    "unwrap_key",
    "unwrapping_key",
    "wrap_key",
]

KeyClass = Literal["private", "secret"]
TRANSPORT_LABEL_PREFIX = "ceremony-transport"
_WRAP = Mechanism.AES_KEY_WRAP_PAD
_CLASSES = {"private": ObjectClass.PRIVATE_KEY, "secret": ObjectClass.SECRET_KEY}
_KEY_TYPES = {"ec": KeyType.EC, "rsa": KeyType.RSA, "generic-secret": KeyType.GENERIC_SECRET}
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # DER OID prime256v1


@dataclass(frozen=True)
class ExportableKey:
    """What the token says about one key a ceremony would export."""

    label: str
    kind: KeyClass
    key_type: str  # "ec", "rsa", "generic-secret", or "ed25519" (never wrappable here)
    extractable: bool
    wrap_with_trusted: bool
    sensitive: bool


@dataclass(frozen=True)
class WrappedKey:
    """One key as the transport key wraps it, with what the target needs to rebuild it."""

    label: str
    kind: KeyClass
    key_type: str
    wrapped: bytes  # RFC 5649 (CKM_AES_KEY_WRAP_PAD) of the key's PKCS#8 or raw value
    kcv: bytes  # see the module's docstring
    public_spki: bytes | None  # the public half (private keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "key_type": self.key_type,
            "wrapped": self.wrapped.hex(),
            "kcv": self.kcv.hex(),
            "public_spki": None if self.public_spki is None else self.public_spki.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> WrappedKey:
        try:
            kind = data["kind"]
            key_type = data["key_type"]
            if kind not in _CLASSES or key_type not in _KEY_TYPES:
                raise ValueError(f"kind {kind!r} or key type {key_type!r}")
            spki = data["public_spki"]
            return cls(
                label=str(data["label"]),
                kind=kind,
                key_type=key_type,
                wrapped=bytes.fromhex(data["wrapped"]),
                kcv=bytes.fromhex(data["kcv"]),
                public_spki=None if spki is None else bytes.fromhex(spki),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenError(f"a wrapped key entry is malformed ({exc})") from exc


def describe_key(token: Token, label: str, kind: KeyClass) -> ExportableKey:
    """The exportability of the token's private (or secret) key ``label``."""
    with token._call(f"read attributes of '{label}'") as s:
        key = token._one(s, _CLASSES[kind], label)
        kt = key.key_type
        key_type = {
            KeyType.EC: "ec",
            KeyType.RSA: "rsa",
            KeyType.GENERIC_SECRET: "generic-secret",
            KeyType.EC_EDWARDS: "ed25519",
        }.get(kt, str(kt))
        try:
            wrap_with_trusted = bool(key[Attribute.WRAP_WITH_TRUSTED])
        except pkcs11.exceptions.AttributeTypeInvalid:  # openCryptoki 3.8 does not know it
            wrap_with_trusted = False
        return ExportableKey(
            label,
            kind,
            key_type,
            bool(key[Attribute.EXTRACTABLE]),
            wrap_with_trusted,
            bool(key[Attribute.SENSITIVE]),
        )


def require_wrappable(token: Token, key: ExportableKey) -> None:
    """Refuse, before anything changes, a key this token cannot wrap or must not."""
    token.require("aes_key_wrap_pad", f"exporting key '{key.label}' (CKM_AES_KEY_WRAP_PAD)")
    if key.key_type == "ed25519" and not token.can("wrap_ed25519_private"):
        raise ConfigurationError(
            f"{token.where}: key '{key.label}' is an Ed25519 private key, which this token "
            "cannot wrap (capability wrap_ed25519_private; SoftHSM2 2.6 answers "
            "CKR_KEY_NOT_WRAPPABLE): a meter with an Ed25519 signing key cannot be exported; "
            "provision its replacement anew instead"
        )
    if not key.extractable:
        raise ConfigurationError(
            f"{token.where}: key '{key.label}' was generated non-extractable (before key "
            "export existed, or on a token without key wrap): it can never leave this token"
        )
    if not key.wrap_with_trusted or not key.sensitive:
        # Not a key this project made: refuse to treat it as one.
        raise ConfigurationError(
            f"{token.where}: key '{key.label}' is extractable without CKA_WRAP_WITH_TRUSTED "
            "and CKA_SENSITIVE: refusing to export a key whose attributes were not ours"
        )


@contextmanager
def trusted_wrapping_key(
    token: Token, label: str, value: bytearray, *, so_pin: str, user_pin: str
) -> Iterator[str]:
    """The transport key as a trusted AES wrapping key in the token, for the block inside.

    ``CKA_TRUSTED`` needs the SO, and SoftHSM2 lets the SO make only a public object. A
    public *token* object would be written to the token's store unencrypted (SoftHSM2
    encrypts only private objects' values: measured, the 32 key bytes were in the
    object file in clear), so the key is a public **session** object of a side session
    held open for the block: the token is logged out, logged in as SO, the key made in
    the side session (``CKA_WRAP`` only, sensitive, not extractable), logged out, and
    logged in as user again, which the wraps need. The key is destroyed when the block
    ends, however it ends, and by the token itself if the process dies. On return the
    token is logged in as user again.
    """
    if not label.startswith(TRANSPORT_LABEL_PREFIX):
        raise ValueError(f"a transport key's label starts with {TRANSPORT_LABEL_PREFIX}")
    _check_value(value)
    with token.side_session(f"hold transport key '{label}'") as holder:
        token.logout()
        try:
            token.login(so_pin, so=True)
            try:
                with token.call_on(holder, f"create trusted transport key '{label}' (SO)") as s:
                    obj = s.create_object(
                        {
                            Attribute.CLASS: ObjectClass.SECRET_KEY,
                            Attribute.KEY_TYPE: KeyType.AES,
                            Attribute.VALUE: bytes(value),
                            Attribute.TOKEN: False,
                            Attribute.PRIVATE: False,
                            Attribute.TRUSTED: True,
                            Attribute.WRAP: True,
                            Attribute.UNWRAP: False,
                            Attribute.ENCRYPT: False,
                            Attribute.DECRYPT: False,
                            Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False,
                            Attribute.LABEL: label,
                        }
                    )
            finally:
                token.logout()
        finally:
            token.login(user_pin)
        try:
            yield label
        finally:
            with suppress(MeterError), token.call_on(holder, f"destroy transport key '{label}'"):
                obj.destroy()


@contextmanager
def unwrapping_key(token: Token, label: str, value: bytearray) -> Iterator[str]:
    """The transport key as a private session object (``CKA_UNWRAP`` only) for the block."""
    if not label.startswith(TRANSPORT_LABEL_PREFIX):
        raise ValueError(f"a transport key's label starts with {TRANSPORT_LABEL_PREFIX}")
    _check_value(value)
    token._require_user(f"unwrap under transport key '{label}'")
    with token._call(f"create transport key '{label}'") as s:
        obj = s.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: bytes(value),
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.UNWRAP: True,
                Attribute.WRAP: False,
                Attribute.ENCRYPT: False,
                Attribute.DECRYPT: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.LABEL: label,
            }
        )
    try:
        yield label
    finally:
        with suppress(MeterError), token._call(f"destroy transport key '{label}'"):
            obj.destroy()


def wrap_key(token: Token, wrapping_label: str, key: ExportableKey) -> WrappedKey:
    """Wrap ``key`` under the trusted key ``wrapping_label``; its KCV and public half too."""
    require_wrappable(token, key)
    token._require_user(f"wrap key '{key.label}'")
    kcv, spki = _kcv(token, key.label, key.kind)
    with token._call(f"wrap key '{key.label}' under '{wrapping_label}'") as s:
        wrapping = _one_object(s, ObjectClass.SECRET_KEY, wrapping_label, private=False)
        target = token._one(s, _CLASSES[key.kind], key.label)
        try:
            wrapped = bytes(wrapping.wrap_key(target, mechanism=_WRAP))
        except pkcs11.exceptions.KeyNotWrappable as exc:
            raise TokenError(
                f"{token.where}: the token refuses to wrap key '{key.label}' under "
                f"'{wrapping_label}' (CKR_KEY_NOT_WRAPPABLE): the key is CKA_WRAP_WITH_TRUSTED "
                "and the wrapping key is not CKA_TRUSTED (only the SO can make it so)"
            ) from exc
    return WrappedKey(key.label, key.kind, key.key_type, wrapped, kcv, spki)


def unwrap_key(token: Token, unwrapping_label: str, entry: WrappedKey, new_label: str) -> None:
    """Unwrap ``entry`` into a token object labelled ``new_label``, exportable as before.

    A wrong transport key or an altered blob fails RFC 5649's integrity check inside the
    token (SoftHSM2 answers CKR_GENERAL_ERROR): nothing is created.
    """
    token._require_user(f"unwrap key '{entry.label}'")
    if token.has_key(new_label):
        raise TokenError(f"{token.where}: a key labelled '{new_label}' exists already")
    template: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: True,
        Attribute.WRAP_WITH_TRUSTED: True,
        Attribute.SIGN: True,
        Attribute.ID: new_label.encode(),
        # python-pkcs11 adds every capability attribute; a private key takes none of these.
        Attribute.ENCRYPT: DEFAULT,
        Attribute.DECRYPT: DEFAULT,
        Attribute.WRAP: DEFAULT,
        Attribute.UNWRAP: DEFAULT,
        Attribute.VERIFY: DEFAULT if entry.kind == "private" else True,
        Attribute.DERIVE: False,
    }
    with token._call(f"unwrap key '{entry.label}' as '{new_label}'") as s:
        unwrapping = _one_object(s, ObjectClass.SECRET_KEY, unwrapping_label, private=True)
        try:
            unwrapping.unwrap_key(
                _CLASSES[entry.kind],
                _KEY_TYPES[entry.key_type],
                entry.wrapped,
                mechanism=_WRAP,
                label=new_label,
                store=True,
                template=template,
            )
        except (pkcs11.exceptions.GeneralError, pkcs11.exceptions.WrappedKeyInvalid) as exc:
            raise TokenError(
                f"{token.where}: key '{entry.label}' does not unwrap: a wrong transport key "
                "(shares of another ceremony?) or an altered export bundle"
            ) from exc


def import_public_key(token: Token, label: str, spki: bytes) -> None:
    """Store the public key ``spki`` (P-256 or RSA) as the private public-key object ``label``."""
    public = serialization.load_der_public_key(spki)
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.VERIFY: True,
        Attribute.LABEL: label,
        Attribute.ID: label.encode(),
    }
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        template |= {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: _P256_PARAMS,
            Attribute.EC_POINT: b"\x04" + bytes([len(point)]) + point,
        }
    elif isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        template |= {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
            Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"),
        }
    else:
        raise ConfigurationError(f"{token.where}: public key '{label}' is not P-256 or RSA")
    with token._call(f"create public key '{label}'") as s:
        s.create_object(template)


def rename_key(token: Token, old: str, new: str, kind: KeyClass) -> None:
    """Relabel the private (or secret) key ``old`` and, for a private key, its public half."""
    classes = [_CLASSES[kind]] + ([ObjectClass.PUBLIC_KEY] if kind == "private" else [])
    token._keys.clear()
    with token._call(f"rename key '{old}' to '{new}'") as s:
        for object_class in classes:
            obj = token._one(s, object_class, old)
            obj[Attribute.LABEL] = new
            obj[Attribute.ID] = new.encode()


def destroy_key_object(token: Token, label: str) -> int:
    """Destroy every private key object (private, public, secret) labelled ``label``."""
    token._keys.clear()
    with token._call(f"destroy key objects '{label}'") as s:
        found = list(s.get_objects({Attribute.LABEL: label, Attribute.PRIVATE: True}))
        for obj in found:
            obj.destroy()
    return len(found)


def sweep_transport_keys(token: Token) -> int:
    """Destroy every transport key a crashed ceremony may have left as a token object.

    Today's transport keys are session objects, which the token destroys when their
    process dies; earlier versions made the trusted one a public token object, which a
    crash left behind. Any such object (or one planted under the prefix) goes.
    """
    count = 0
    with token._call("sweep left-over transport keys") as s:
        for obj in list(s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})):
            with suppress(pkcs11.PKCS11Error):
                if str(obj[Attribute.LABEL]).startswith(TRANSPORT_LABEL_PREFIX):
                    obj.destroy()
                    count += 1
    return count


def _kcv(token: Token, label: str, kind: KeyClass) -> tuple[bytes, bytes | None]:
    if kind == "secret":
        return secret_kcv(token, label), None
    spki = token.public_key_spki(label)
    return public_kcv(spki), spki


def _one_object(s: pkcs11.Session, object_class: ObjectClass, label: str, *, private: bool) -> Any:
    found = list(
        s.get_objects(
            {
                Attribute.CLASS: object_class,
                Attribute.LABEL: label,
                Attribute.PRIVATE: private,
                # Both transport keys are session objects: a token object under the label
                # (anyone may make a public one without a PIN) is never the one chosen.
                Attribute.TOKEN: False,
            }
        )
    )
    if len(found) != 1:
        raise TokenError(f"{len(found)} transport key objects labelled '{label}' (expected 1)")
    return found[0]


def _check_value(value: bytearray) -> None:
    if len(value) != 32:
        raise ValueError("a transport key is 32 bytes (AES-256)")
