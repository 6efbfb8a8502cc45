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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meter.custody import paper, sealed
from meter.custody.card import CardError, CardShareStore
from meter.custody.ceremony_transcript import Transcript, write_json
from meter.custody.shares import CustodyShare, Policy, combine, split
from meter.durable import write_atomically
from meter.errors import AuthenticationFailed, CustodyError, InvalidInput, MeterError
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
CARD_WAIT_S = 120.0


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
    member. ``after_wrap`` runs once the keys are wrapped (tests interrupt there).
    """
    count = sum(g.count for g in policy.groups)
    if len(places) != count:
        raise InvalidInput(f"the policy makes {count} shares but {len(places)} places were given")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    transcript = Transcript.begin(ceremony, purpose, policy, client)
    prompter.say(f"Ceremony {ceremony} ({purpose}): {policy.describe()}")
    with _session(client, officer, prompter, transcript, "Security Officer: authorize"):
        client.post("/v1/ceremony/authorize", {"ceremony": ceremony, "purpose": purpose})
    key = bytearray(os.urandom(32))
    try:
        shares = split(bytes(key), policy, ceremony)
        with _session(client, custodian, prompter, transcript, "Key Custodian: wrap the keys"):
            bundle: dict[str, Any] = client.post(
                "/v1/ceremony/export", {"ceremony": ceremony, "transport_key_hex": key.hex()}
            )
    finally:
        key[:] = bytes(len(key))  # the host's copy; see docs/custody.md for the others
        del key
    transcript.exported(bundle, shares[0].check)
    files = {"bundle": out / f"{ceremony}.bundle.json"}
    write_json(files["bundle"], bundle)  # before any share: no share without its bundle
    if after_wrap is not None:
        after_wrap()
    for share, place in zip(shares, places, strict=True):
        _put_share(share, place, prompter)
        transcript.share_stored(share, place)
    transcript.outcome = "completed"
    if purpose == "export-move":
        with _session(client, officer, prompter, transcript, "Security Officer: finish the move"):
            moved = client.post(
                "/v1/ceremony/finish-move",
                {"ceremony": ceremony, "transcript": transcript.body()},
            )
        files["final_registers"] = out / f"{ceremony}.final-registers.json"
        write_json(files["final_registers"], moved["final_registers"])
        document = moved["transcript"]
    else:
        with _session(client, custodian, prompter, transcript, "Key Custodian: sign transcript"):
            document = client.post(
                "/v1/ceremony/transcript", {"ceremony": ceremony, "transcript": transcript.body()}
            )
    files["transcript"] = out / f"{ceremony}.transcript.json"
    write_json(files["transcript"], document)
    prompter.say(f"Ceremony {ceremony} done: transcript {files['transcript']}")
    return CeremonyResult(ceremony, files, document)


def _put_share(share: CustodyShare, place: Place, prompter: Prompter) -> None:
    who = f"{place.custodian} ({share.group} #{share.member} of {share.members})"
    prompter.say(f"Share for {who}: {place.describe()}")
    if place.kind == "card":
        store = CardShareStore(place.where)
        prompter.say(f"{place.custodian}: insert your card into reader {place.where!r}")
        store.wait_for_card(CARD_WAIT_S)
        pin = prompter.secret(f"PIN of {place.custodian}'s card")
        try:
            store.write(share, pin)
        except CardError as exc:
            if "already holds" not in str(exc) or not prompter.confirm(
                f"{exc}. Overwrite it with the share of ceremony {share.ceremony}?"
            ):
                raise
            store.write(share, pin, overwrite=True)
    elif place.kind == "sealed":
        passphrase = prompter.secret(f"new passphrase for {place.where} ({place.custodian})")
        sealed.seal(share, Path(place.where), passphrase, log2_n=place.log2_n)
    else:
        write_atomically(Path(place.where), paper.to_paper(share).encode())
    if not prompter.confirm(
        f"{place.custodian}: your share's fingerprint is {share.fingerprint}. Noted it?"
    ):
        raise CustodyError(
            f"{place.custodian} did not confirm the share {share.label()}: the ceremony stops "
            "here; the device is unchanged (rerun it with the same ceremony id)"
        )


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
) -> CeremonyResult:
    """Import an export bundle into this (new) device from k custodians' shares.

    ``postal_root_pem`` is the postal root the Security Officer trusts (from the
    authority, not from the bundle): a bundle certified under another root is refused.
    """
    bundle = _read_json(bundle_path, "export bundle")
    statement = _read_json(final_registers_path, "final-register statement")
    ceremony = str(bundle.get("ceremony", ""))
    transcript = Transcript.begin(ceremony, "import", None, client)
    prompter.say(f"Import of ceremony {ceremony} into this device")
    with _session(client, officer, prompter, transcript, "Security Officer: authorize"):
        client.post(
            "/v1/ceremony/authorize",
            {
                "ceremony": ceremony,
                "purpose": "import",
                "postal_root_sha256": _root_sha256(postal_root_pem),
            },
        )
    shares = collect_shares(places, prompter, transcript)
    recovery = combine(shares, expected_check=expected_check)
    key = bytearray(recovery.secret)
    try:
        with _session(client, custodian, prompter, transcript, "Key Custodian: unwrap and check"):
            result: dict[str, Any] = client.post(
                "/v1/ceremony/import",
                {
                    "bundle": bundle,
                    "transport_key_hex": key.hex(),
                    "final_registers": statement,
                },
            )
            transcript.imported(result, recovery.used, recovery.spare)
            transcript.outcome = "completed"
            document = client.post(
                "/v1/ceremony/transcript", {"ceremony": ceremony, "transcript": transcript.body()}
            )
    finally:
        key[:] = bytes(len(key))
        del key
    files = {"transcript": out / f"{ceremony}.import-transcript.json"}
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json(files["transcript"], document)
    prompter.say(f"Import of {ceremony} done: transcript {files['transcript']}")
    return CeremonyResult(ceremony, files, document, result)


def collect_shares(
    places: Sequence[Place], prompter: Prompter, transcript: Transcript
) -> list[CustodyShare]:
    """Every share the custodians present; one that cannot be read is reported and skipped
    (a blocked PIN, a removed card), so that other custodians can still make up the count."""
    shares: list[CustodyShare] = []
    for place in places:
        prompter.say(f"{place.custodian}: your share from {place.describe()}")
        try:
            share = _get_share(place, prompter)
        except (CustodyError, AuthenticationFailed) as exc:
            # Card refusals are CustodyErrors (WrongPin also AuthenticationFailed).
            transcript.share_refused(place, str(exc))
            prompter.say(f"not used: {exc}")
            continue
        transcript.share_presented(share, place)
        shares.append(share)
    return shares


def _get_share(place: Place, prompter: Prompter) -> CustodyShare:
    if place.kind == "card":
        store = CardShareStore(place.where)
        store.wait_for_card(CARD_WAIT_S)
        return store.read(prompter.secret(f"PIN of {place.custodian}'s card"))
    if place.kind == "sealed":
        return sealed.unseal(Path(place.where), prompter.secret(f"passphrase of {place.where}"))
    try:
        text = Path(place.where).read_text()
    except OSError as exc:
        raise CustodyError(f"cannot read the paper share {place.where}: {exc}") from exc
    return paper.from_paper(text)


# -- helpers --------------------------------------------------------------------------


@contextmanager
def _session(
    client: DeviceClient, user_id: str, prompter: Prompter, transcript: Transcript, step: str
) -> Iterator[None]:
    """One user's session on the device for one step (rule 4: one user at a time)."""
    prompter.say(f"{step}: user '{user_id}' logs on")
    session = client.logon(user_id, prompter.password(user_id))
    transcript.step(step, user_id, str(session.get("role")))
    try:
        yield
    except MeterError as exc:
        transcript.step_failed(step, str(exc))
        raise
    finally:
        with suppress(MeterError):  # the connection closing ends the session as well
            client.logoff()


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
