"""The key ceremonies, host side: the custodians' steps around the device's services.

`export_keys` and `import_keys` walk the people through each step (through a
`Prompter`: insert card N, enter PIN, confirm) and call the device over its socket
(`DeviceClient`), one user's session at a time:

export: Security Officer authorizes -> the host makes a 256-bit transport key and splits
it (SLIP-39) -> a Key Custodian's session has the device wrap the keys under it -> the
host forgets the key -> the bundle is written -> each share goes to its card, sealed file
or paper -> the transcript is signed by the audit key (for a move, together with the
final-register statement and the source's withdrawal, in the Security Officer's session).

import: Security Officer authorizes -> each custodian's share is read (card + PIN, sealed
file + passphrase, paper) until the policy is met -> combined with the check value
recorded at export -> a Key Custodian's session has the target device unwrap, check the
KCVs and the pairwise signature, and take over the registers of the final-register
statement -> the host forgets the key -> the transcript is signed by the audit key that
was just imported.

The transcript's format and its offline check are in meter.custody.ceremony_transcript.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.custody import sealed
from meter.custody.ceremony_transcript import Transcript, write_json
from meter.custody.ceremony_turns import Run, Turns
from meter.custody.shares import Policy, combine, split
from meter.errors import InvalidInput
from meter.host import DeviceClient

__all__ = [
    "CeremonyResult",
    "Place",
    "Prompter",
    "User",
    "export_keys",
    "import_keys",
    "new_ceremony_id",
]

PlaceKind = Literal["card", "sealed", "paper"]


class Prompter(Protocol):
    """How a ceremony talks to the people in the room (a terminal, or a test's script)."""

    def say(self, message: str) -> None: ...

    def password(self, user_id: str) -> str: ...

    def secret(self, what: str) -> str:
        """A card PIN or a sealed file's passphrase, never echoed."""
        ...

    def confirm(self, message: str) -> bool: ...


@dataclass(frozen=True)
class User:
    """A device user taking part: their id and role (for the transcript)."""

    user_id: str
    role: str


@dataclass(frozen=True)
class Place:
    """Where one share goes (export) or comes from (import)."""

    kind: PlaceKind
    where: str  # a reader's name, or a file's path
    custodian: str  # the person who keeps it (for the transcript)
    log2_n: int = sealed.SCRYPT_LOG2_N  # sealed files only: scrypt's cost

    def describe(self) -> str:
        if self.kind == "card":
            return f"the card in reader {self.where!r}"
        return f"the {'sealed file' if self.kind == 'sealed' else 'paper sheet'} {self.where}"


@dataclass
class CeremonyResult:
    ceremony: str
    files: dict[str, Path]
    transcript: dict[str, Any]
    device: dict[str, Any] = field(default_factory=dict)


def new_ceremony_id(purpose: str, now: datetime | None = None) -> str:
    at = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{purpose}-{at}-{secrets.token_hex(3)}"


# -- export --------------------------------------------------------------------------


def export_keys(
    client: DeviceClient,
    *,
    ceremony: str,
    purpose: Literal["export-backup", "export-move"],
    policy: Policy,
    places: Sequence[Place],
    officer: str,
    custodian: str,
    out: Path,
    prompter: Prompter,
    after_wrap: Callable[[], None] | None = None,
) -> CeremonyResult:
    """Export the device's keys under a fresh split transport key (see the module doc).

    ``places`` gives one place per share, in `split`'s order: group by group, member by
    member. ``after_wrap`` runs once the keys are wrapped (tests interrupt there). A rerun
    of a move whose last step committed (its answer lost) hands out its documents again.
    Any failure writes the transcript with outcome "failed" and the reason, then raises.
    """
    count = sum(g.count for g in policy.groups)
    if len(places) != count:
        raise InvalidInput(f"the policy makes {count} shares but {len(places)} places were given")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    run = Run(client, prompter, Transcript.begin(ceremony, purpose, policy, client), custodian)
    prompter.say(f"Ceremony {ceremony} ({purpose}): {policy.describe()}")
    try:
        return _export(run, purpose, policy, places, officer, out, after_wrap)
    except Exception as exc:
        run.failed(exc, out / f"{ceremony}.transcript.json")
        raise


def _export(
    run: Run,
    purpose: str,
    policy: Policy,
    places: Sequence[Place],
    officer: str,
    out: Path,
    after_wrap: Callable[[], None] | None,
) -> CeremonyResult:
    client, prompter, transcript = run.client, run.prompter, run.transcript
    ceremony = transcript.ceremony
    files = {"bundle": out / f"{ceremony}.bundle.json"}
    with run.session(officer, "Security Officer: authorize"):
        # After a move's commit the device refuses Key Administration: a rerun whose
        # first run lost the last answer takes the documents the device keeps.
        if client.get("/v1/status").get("withdrawn_for") == ceremony:
            run.committed = True
            prompter.say(f"the device was withdrawn for {ceremony}: its documents again")
            moved = client.post(
                "/v1/ceremony/finish-move", {"ceremony": ceremony, "transcript": transcript.body()}
            )
            return _moved(run, moved, files)
        client.post("/v1/ceremony/authorize", {"ceremony": ceremony, "purpose": purpose})
    key = bytearray(os.urandom(32))
    try:
        shares = split(bytes(key), policy, ceremony)
        with run.session(run.custodian, "Key Custodian: wrap the keys"):
            bundle: dict[str, Any] = client.post(
                "/v1/ceremony/export", {"ceremony": ceremony, "transport_key_hex": key.hex()}
            )
    finally:
        key[:] = bytes(len(key))  # the host's copy; see docs/custody.md for the others
        del key
    transcript.exported(bundle, shares[0].check)
    write_json(files["bundle"], bundle)  # before any share: no share without its bundle
    if after_wrap is not None:
        after_wrap()
    turns = Turns(prompter)
    for share, place in zip(shares, places, strict=True):
        turns.put(share, place, transcript)
    transcript.outcome = "completed"
    if purpose == "export-move":
        with run.session(officer, "Security Officer: finish the move"):
            run.finishing = True
            moved = client.post(
                "/v1/ceremony/finish-move",
                {"ceremony": ceremony, "transcript": transcript.body()},
            )
            run.committed = True
        return _moved(run, moved, files)
    with run.session(run.custodian, "Key Custodian: sign transcript"):
        document = client.post(
            "/v1/ceremony/transcript", {"ceremony": ceremony, "transcript": transcript.body()}
        )
    return _done(run, files, out / f"{ceremony}.transcript.json", document)


def _moved(run: Run, moved: dict[str, Any], files: dict[str, Path]) -> CeremonyResult:
    out = files["bundle"].parent
    ceremony = run.transcript.ceremony
    if not files["bundle"].exists():
        # Written by the first run, before any share; the transcript names its SHA-256.
        del files["bundle"]
    files["final_registers"] = out / f"{ceremony}.final-registers.json"
    write_json(files["final_registers"], moved["final_registers"])
    return _done(run, files, out / f"{ceremony}.transcript.json", moved["transcript"])


def _done(
    run: Run, files: dict[str, Path], path: Path, document: dict[str, Any], device: Any = None
) -> CeremonyResult:
    files["transcript"] = path
    write_json(path, document)
    run.prompter.say(f"Ceremony {run.transcript.ceremony} done: transcript {path}")
    return CeremonyResult(run.transcript.ceremony, files, document, device or {})


# -- import --------------------------------------------------------------------------


def import_keys(
    client: DeviceClient,
    *,
    bundle_path: Path,
    final_registers_path: Path,
    places: Sequence[Place],
    expected_check: bytes,
    postal_root_pem: bytes,
    officer: str,
    custodian: str,
    out: Path,
    prompter: Prompter,
    after_import: Callable[[], None] | None = None,
) -> CeremonyResult:
    """Import an export bundle into this (new) device from k custodians' shares.

    ``postal_root_pem`` is the postal root the Security Officer trusts (from the
    authority, not from the bundle): a bundle certified under another root is refused.
    A rerun of an import that committed but whose transcript was not signed signs it,
    without shares. ``after_import`` runs once the keys are in (tests interrupt there).
    Any failure writes the transcript with outcome "failed" and the reason, then raises.
    """
    bundle = _read_json(bundle_path, "export bundle")
    statement = _read_json(final_registers_path, "final-register statement")
    ceremony = str(bundle.get("ceremony", ""))
    run = Run(client, prompter, Transcript.begin(ceremony, "import", None, client), custodian)
    prompter.say(f"Import of ceremony {ceremony} into this device")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = out / f"{ceremony}.import-transcript.json"
    try:
        return _import(
            run,
            bundle,
            statement,
            places,
            expected_check,
            postal_root_pem,
            officer,
            path,
            after_import,
        )
    except Exception as exc:
        run.failed(exc, path)
        raise


def _import(
    run: Run,
    bundle: dict[str, Any],
    statement: dict[str, Any],
    places: Sequence[Place],
    expected_check: bytes,
    postal_root_pem: bytes,
    officer: str,
    path: Path,
    after_import: Callable[[], None] | None,
) -> CeremonyResult:
    client, prompter, transcript = run.client, run.prompter, run.transcript
    ceremony = transcript.ceremony
    kcvs = {str(k.get("label")): str(k.get("kcv")) for k in bundle.get("keys", [])}
    with run.session(officer, "Security Officer: authorize"):
        authorized = client.post(
            "/v1/ceremony/authorize",
            {
                "ceremony": ceremony,
                "purpose": "import",
                "postal_root_sha256": _root_sha256(postal_root_pem),
            },
        )
    if authorized.get("resume") == "transcript":
        # The keys went in on an earlier run, whose transcript was never signed.
        run.committed = True
        prompter.say(f"the import of {ceremony} committed earlier: only its transcript remains")
        transcript.keys = {"kcvs": kcvs, "resumed": "the keys were imported by an earlier run"}
        transcript.outcome = "completed"
        with run.session(run.custodian, "Key Custodian: sign transcript"):
            document = client.post(
                "/v1/ceremony/transcript", {"ceremony": ceremony, "transcript": transcript.body()}
            )
        return _done(run, {}, path, document, {"resumed": "transcript"})
    shares = Turns(prompter).collect(list(places), transcript)
    recovery = combine(shares, expected_check=expected_check)
    key = bytearray(recovery.secret)
    try:
        with run.session(run.custodian, "Key Custodian: unwrap and check"):
            result: dict[str, Any] = client.post(
                "/v1/ceremony/import",
                {
                    "bundle": bundle,
                    "transport_key_hex": key.hex(),
                    "final_registers": statement,
                },
            )
            run.committed = True
            transcript.imported(result, recovery.used, recovery.spare)
            if after_import is not None:
                after_import()
            transcript.outcome = "completed"
            document = client.post(
                "/v1/ceremony/transcript", {"ceremony": ceremony, "transcript": transcript.body()}
            )
    finally:
        key[:] = bytes(len(key))
        del key
    return _done(run, {}, path, document, result)


# -- helpers --------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read the {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"the {what} {path} is not a JSON object")
    return data


def _root_sha256(pem: bytes) -> str:
    try:
        root = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidInput(f"the postal root is not a PEM certificate: {exc}") from exc
    return hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
