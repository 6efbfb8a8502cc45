"""The meter's power-up and on-demand self-tests (security policy rule 7).

In order: the token's known-answer tests (SHA-256, HMAC-SHA-256, AES-GCM, AES
key wrap), a known-answer test of PIM-1 decoding and signature verification
with the packaged vectors, a pairwise consistency test of the signing key
(sign in the token, verify with the public key the meter was certified with),
and a check of the register record's MAC in the token. A failed test is a
result, never an exception: the firmware enters its error state on a report
that did not pass.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meter.errors import MeterError
from meter.indicium import SIGNED_LENGTH, Algorithm, VerifyingKey, decode, key_id
from meter.token import KatResult, KeyAlgorithm, Token, run_token_kats

__all__ = [
    "PIM1_KAT_RESOURCE",
    "Pim1Vector",
    "SelfTestReport",
    "check_pim1_vectors",
    "load_pim1_vectors",
    "pairwise_consistency",
    "run_self_tests",
]

PIM1_KAT_RESOURCE = "kat/pim1-kat.json"
_ALGORITHM_BYTE = {
    KeyAlgorithm.ECDSA_P256: Algorithm.ECDSA_P256,
    KeyAlgorithm.ED25519: Algorithm.ED25519,
    KeyAlgorithm.RSA_PSS_2048: Algorithm.RSA_PSS_2048,
}
_PAIRWISE_MESSAGE_BYTES = 32


@dataclass(frozen=True)
class SelfTestReport:
    """The outcome of one run of the self-tests: passed only if every test passed."""

    passed: bool
    results: tuple[KatResult, ...]  # one per test, in the order run
    at: datetime

    def failures(self) -> list[KatResult]:
        return [r for r in self.results if not r.passed]

    def to_json(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "at": self.at.isoformat(),
            "results": [
                {"name": r.name, "passed": r.passed, "detail": r.detail} for r in self.results
            ],
        }


def run_self_tests(
    token: Token,
    *,
    signing_label: str | None,
    algorithm: KeyAlgorithm | None,
    public_key_spki: bytes | None,
    register_check: Callable[[], object] | None,
    at: datetime,
) -> SelfTestReport:
    """Run every self-test that applies; raise only on the truly unexpected.

    The token KATs and the PIM-1 KAT always run (a public session is enough).
    The pairwise test runs when ``signing_label`` is given (it needs the user
    login); the register MAC check when ``register_check`` is given: it must
    re-read the register record and recompute its MAC in the token, raising
    a MeterError on a mismatch (what it returns is ignored, so
    ``RegisterStore.open`` itself will do).
    """
    results = run_token_kats(token)
    results.append(check_pim1_vectors(load_pim1_vectors()))
    if signing_label is not None:
        results.append(pairwise_consistency(token, signing_label, algorithm, public_key_spki))
    if register_check is not None:
        results.append(_register_mac(register_check))
    return SelfTestReport(all(r.passed for r in results), tuple(results), at)


# -- PIM-1 known answers ------------------------------------------------------


@dataclass(frozen=True)
class Pim1Vector:
    """One packaged vector: an indicium, its verdict (VALID or FORGED) and the meter's key."""

    name: str
    verdict: str
    indicium: bytes
    public_key_spki: bytes
    fields: dict[str, Any] | None  # the decoded fields a VALID vector must give


def load_pim1_vectors() -> list[Pim1Vector]:
    """The PIM-1 KAT vectors shipped with the package (meter/psd/kat/pim1-kat.json)."""
    text = resources.files("meter.psd").joinpath(PIM1_KAT_RESOURCE).read_text("utf-8")
    return [
        Pim1Vector(
            name=v["name"],
            verdict=v["verdict"],
            indicium=bytes.fromhex(v["indicium_hex"]),
            public_key_spki=bytes.fromhex(v["public_key_spki_hex"]),
            fields=v.get("fields"),
        )
        for v in json.loads(text)["vectors"]
    ]


def check_pim1_vectors(vectors: Sequence[Pim1Vector]) -> KatResult:
    """Decode and verify each vector: VALID ones must give their fields and verify, FORGED not."""
    name = "pim1-kat"
    if not any(v.verdict == "VALID" for v in vectors):
        return KatResult(name, False, "no VALID PIM-1 vector to test")
    for vector in vectors:
        problem = _pim1_problem(vector)
        if problem is not None:
            return KatResult(name, False, f"vector '{vector.name}': {problem}")
    valid = sum(v.verdict == "VALID" for v in vectors)
    return KatResult(
        name, True, f"{valid} VALID and {len(vectors) - valid} FORGED PIM-1 vectors of v1"
    )


def _pim1_problem(vector: Pim1Vector) -> str | None:
    """What is wrong with the implementation's answer for ``vector``, or None."""
    if vector.verdict not in ("VALID", "FORGED"):
        return f"verdict {vector.verdict!r} is neither VALID nor FORGED"
    try:
        indicium = decode(vector.indicium)
        public_key = serialization.load_der_public_key(vector.public_key_spki)
    except (MeterError, ValueError) as exc:
        return f"does not decode: {exc}"
    if vector.fields is not None and indicium.fields() != vector.fields:
        differ = sorted(k for k in vector.fields if indicium.fields().get(k) != vector.fields[k])
        return (
            f"decoded fields differ from the expected ones: {', '.join(differ) or 'extra fields'}"
        )
    if vector.verdict == "VALID" and indicium.key_id != key_id(public_key):
        return "key id does not match the meter's public key"
    try:
        VerifyingKey(public_key).verify(
            indicium.algorithm, vector.indicium[:SIGNED_LENGTH], indicium.signature
        )
    except InvalidSignature:
        verified = False
    else:
        verified = True
    if verified != (vector.verdict == "VALID"):
        return f"expected {vector.verdict} got {'VALID' if verified else 'FORGED'}"
    return None


# -- the signing key and the registers -----------------------------------------


def pairwise_consistency(
    token: Token, label: str, algorithm: KeyAlgorithm | None, public_key_spki: bytes | None
) -> KatResult:
    """Sign a fresh random message in the token; verify it under the certified public key.

    ``public_key_spki`` is the key the meter was certified with, not the one
    in the token now, so a key pair swapped in the token is caught.
    """
    name = f"pairwise-{algorithm.value if algorithm is not None else 'unknown'}"
    if algorithm is None or public_key_spki is None:
        return KatResult(
            name, False, f"no algorithm or certified public key given to test key '{label}' against"
        )
    try:
        verifier = VerifyingKey(serialization.load_der_public_key(public_key_spki))
    except ValueError as exc:
        return KatResult(name, False, f"certified public key does not load: {exc}")
    expected = _ALGORITHM_BYTE[algorithm]
    if verifier.algorithm is not expected:
        return KatResult(name, False, f"certified public key is not a {algorithm.value} key")
    message = secrets.token_bytes(_PAIRWISE_MESSAGE_BYTES)
    try:
        signature = token.sign(label, algorithm, message)
    except MeterError as exc:
        return KatResult(name, False, str(exc))
    try:
        verifier.verify(expected, message, signature)
    except InvalidSignature:
        certified = key_id(verifier.public_key).hex()
        return KatResult(
            name,
            False,
            f"a signature by key '{label}' in {token.where} does not verify under the certified "
            f"public key (key id {certified}): the signing key is not the certified one",
        )
    return KatResult(
        name, True, f"key '{label}' signed a fresh message that verifies under the certified key"
    )


def _register_mac(check: Callable[[], object]) -> KatResult:
    try:
        check()
    except MeterError as exc:
        return KatResult("register-mac", False, str(exc))
    return KatResult("register-mac", True, "register record re-read; its MAC verified in the token")
