"""Known-answer tests of the token's own algorithms, run at power-up and on demand.

Each test loads a published key as a SESSION object (CKA_TOKEN false, so
nothing persists and a public session can run it), computes inside the token,
compares with the published answer and destroys what it made. A mismatch or
a refused operation is a failed result, never an exception.

Vectors and why these ones:

- SHA-256: FIPS 180-4 example "abc".
- HMAC-SHA-256: RFC 4231 test case 6 (131-byte key). SoftHSM2 2.6 refuses HMAC
  keys shorter than the 32-byte digest (CKR_KEY_SIZE_RANGE), which rules out
  test cases 1-5.
- AES-GCM: McGrew and Viega, "The Galois/Counter Mode of Operation", test
  case 4 (AES-128, 96-bit IV, 20 bytes of AAD, 60-byte plaintext): encrypt,
  decrypt, and an altered tag must be refused.
- AES key wrap (CKM_AES_KEY_WRAP): RFC 3394 section 4.6 (256-bit KEK, 256-bit
  key data), wrap and unwrap.
- AES key wrap with padding (CKM_AES_KEY_WRAP_PAD): SoftHSM2 2.6.1 zero-pads a
  secret key's value to a multiple of 8 bytes before the RFC 5649 wrap and
  keeps the zeros on unwrap, so the RFC 5649 section 6 examples (20 and 7
  octets) come out differently. For a key whose length is a multiple of 8 that
  padding is empty and the result is RFC 5649 exactly: Wycheproof
  kwp_test.json test 151 (256-bit KEK, 32-byte key), wrap and unwrap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from meter.errors import MeterError
from meter.token._errors import translated
from meter.token.session import Token

__all__ = ["KatResult", "run_token_kats"]


@dataclass(frozen=True)
class KatResult:
    """One self-test's outcome; ``detail`` names the vector, or what differed."""

    name: str
    passed: bool
    detail: str


class _Mismatch(Exception):
    """The token's answer differs from the published one."""


def _same(what: str, expected: bytes, got: bytes) -> None:
    if got != expected:
        raise _Mismatch(f"{what}: expected {expected.hex()} got {got.hex()}")


class _Scratch:
    """Session objects made for one test, destroyed when it ends, passed or not."""

    def __init__(self, session: pkcs11.Session) -> None:
        self.session = session
        self.made: list[Any] = []

    def secret(self, key_type: KeyType, value: bytes, **flags: bool) -> Any:
        """A session secret key with ``value``; ``flags`` name usage attributes (sign=True...)."""
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: key_type,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: False,  # a public session may not make private objects
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.VALUE: value,
        }
        template.update({Attribute[name.upper()]: on for name, on in flags.items()})
        return self.keep(self.session.create_object(template))

    def keep(self, obj: Any) -> Any:
        self.made.append(obj)
        return obj


@contextmanager
def _scratch(token: Token, name: str) -> Iterator[_Scratch]:
    with token._call(f"self-test {name}") as session:  # this module is part of the token layer
        scratch = _Scratch(session)
        try:
            yield scratch
        finally:
            with translated(token.where, f"destroy session objects of self-test {name}"):
                for obj in reversed(scratch.made):
                    obj.destroy()


# -- the tests -------------------------------------------------------------

_SHA256_MESSAGE = b"abc"
_SHA256_DIGEST = bytes.fromhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def _sha256(token: Token) -> str:
    with _scratch(token, "sha-256") as s:
        got = bytes(s.session.digest(_SHA256_MESSAGE, mechanism=Mechanism.SHA256))
    _same("SHA-256('abc')", _SHA256_DIGEST, got)
    return "FIPS 180-4 example 'abc'"


_HMAC_KEY = b"\xaa" * 131
_HMAC_DATA = b"Test Using Larger Than Block-Size Key - Hash Key First"
_HMAC_MAC = bytes.fromhex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")


def _hmac_sha256(token: Token) -> str:
    with _scratch(token, "hmac-sha-256") as s:
        key = s.secret(KeyType.GENERIC_SECRET, _HMAC_KEY, sign=True, verify=True)
        got = bytes(key.sign(_HMAC_DATA, mechanism=Mechanism.SHA256_HMAC))
    _same("HMAC-SHA-256", _HMAC_MAC, got)
    return "RFC 4231 test case 6"


_GCM_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
_GCM_IV = bytes.fromhex("cafebabefacedbaddecaf888")
_GCM_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
_GCM_PLAINTEXT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
_GCM_CIPHERTEXT_AND_TAG = bytes.fromhex(
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
    "5bc94fbc3221a5db94fae95ae7121a47"
)


def _aes_gcm(token: Token) -> str:
    params = GCMParams(_GCM_IV, _GCM_AAD, 128)
    with _scratch(token, "aes-gcm") as s:
        key = s.secret(KeyType.AES, _GCM_KEY, encrypt=True, decrypt=True)
        sealed = bytes(
            key.encrypt(_GCM_PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        )
        _same("AES-GCM encrypt (ciphertext || tag)", _GCM_CIPHERTEXT_AND_TAG, sealed)
        opened = bytes(
            key.decrypt(
                _GCM_CIPHERTEXT_AND_TAG, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
        )
        _same("AES-GCM decrypt", _GCM_PLAINTEXT, opened)
        altered = _GCM_CIPHERTEXT_AND_TAG[:-1] + bytes([_GCM_CIPHERTEXT_AND_TAG[-1] ^ 0x01])
        try:
            key.decrypt(altered, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        except pkcs11.PKCS11Error:
            pass  # refused, as it must be
        else:
            raise _Mismatch("AES-GCM decrypt accepted a ciphertext whose tag was altered")
    return "McGrew-Viega GCM test case 4: encrypt, decrypt, altered tag refused"


@dataclass(frozen=True)
class _WrapVector:
    source: str
    mechanism: Mechanism
    kek: bytes
    key: bytes
    wrapped: bytes


_RFC3394_4_6 = _WrapVector(
    "RFC 3394 section 4.6",
    Mechanism.AES_KEY_WRAP,
    bytes(range(32)),
    bytes.fromhex("00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f"),
    bytes.fromhex(
        "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21"
    ),
)
_WYCHEPROOF_KWP_151 = _WrapVector(
    "RFC 5649 (Wycheproof kwp_test.json test 151)",
    Mechanism.AES_KEY_WRAP_PAD,
    bytes.fromhex("aa0ab9d68ed4a04e723f81b44c0c88d0bcde7a80cfd476eb4b8836d9aa01ec4c"),
    bytes.fromhex("57faa8766f6d6a0aa1cf643f857c150df5b31303b50af480e21c4b5e8c8a15d5"),
    bytes.fromhex(
        "0e9e2e9aa34bbf973d67bc534ac86fc5b5a5f9da5f026866177894ec6077a5c84501510e1bf4afb3"
    ),
)


def _wrap_test(vector: _WrapVector) -> Callable[[Token], str]:
    def run(token: Token) -> str:
        what = vector.mechanism.name
        with _scratch(token, what) as s:
            kek = s.secret(KeyType.AES, vector.kek, wrap=True, unwrap=True)
            # The key to wrap must be extractable; it stays sensitive (wrapping needs no more).
            key = s.secret(KeyType.AES, vector.key, extractable=True)
            wrapped = bytes(kek.wrap_key(key, mechanism=vector.mechanism))
            _same(f"{what} wrap", vector.wrapped, wrapped)
            unwrapped = s.keep(
                kek.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.AES,
                    vector.wrapped,
                    mechanism=vector.mechanism,
                    store=False,
                    # Readable, so the unwrapped value can be compared: it is a published test key.
                    template={
                        Attribute.TOKEN: False,
                        Attribute.PRIVATE: False,
                        Attribute.SENSITIVE: False,
                        Attribute.EXTRACTABLE: True,
                    },
                )
            )
            _same(f"{what} unwrap", vector.key, bytes(unwrapped[Attribute.VALUE]))
        return f"{vector.source}: wrap and unwrap"

    return run


# (name, the profile capability it tests, the test)
_KATS: tuple[tuple[str, str, Callable[[Token], str]], ...] = (
    ("sha-256", "sha256", _sha256),
    ("hmac-sha-256", "hmac_sha256", _hmac_sha256),
    ("aes-gcm", "aes_gcm", _aes_gcm),
    ("aes-key-wrap", "aes_key_wrap", _wrap_test(_RFC3394_4_6)),
    ("aes-key-wrap-pad", "aes_key_wrap_pad", _wrap_test(_WYCHEPROOF_KWP_151)),
)


def run_token_kats(token: Token, capabilities: frozenset[str] | None = None) -> list[KatResult]:
    """The known-answer tests of what the token can do, in order; public or user session.

    ``capabilities`` (by default the token's, from its HSM profile) chooses the tests: a
    token whose profile does not claim AES-GCM is not tested on it (openCryptoki's soft
    token has none), one that claims it is, and fails if the claim is false. Unknown
    capabilities (None): every test runs.
    """
    claimed = capabilities if capabilities is not None else token.capabilities
    return [
        _run(token, name, test)
        for name, capability, test in _KATS
        if claimed is None or capability in claimed
    ]


def _run(token: Token, name: str, test: Callable[[Token], str]) -> KatResult:
    try:
        return KatResult(name, True, test(token))
    except (_Mismatch, MeterError) as exc:  # a wrong answer, or the token refused (TokenError)
        return KatResult(name, False, str(exc))
