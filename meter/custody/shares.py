"""k-of-n shares of a transport secret: SLIP-39 (shamir-mnemonic) plus what a custodian keeps beside.

The splitting and combining are SLIP-39's, through its reference implementation; this
module adds what a ceremony needs around it:

* group names for SLIP-39's numbered groups ("2 of 3 officers and 1 of 2 auditors");
* a ceremony id and a check value on every share. SLIP-39 detects a damaged share (RS1024
  checksum per share) and a mixed-up set (digest of the secret, for thresholds above 1),
  but a wrong passphrase silently yields another secret, and a 1-of-1 group has no
  digest. The check value (HMAC-SHA256 keyed with the secret, over the ceremony id) is
  compared after every combination, so neither goes unnoticed;
* a fingerprint (hash) of each share's record, so that a ceremony log can name shares
  without holding them, and a damaged or altered record is refused before it is used;
* exact selection: shamir-mnemonic refuses more shares of a group than its threshold, so
  `combine` picks exactly the threshold per group and reports the rest as spare.

Every refusal is a `CustodyError` naming the share (by group, member and fingerprint, never
by its words) and the rule it breaks.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import constant_time, hashes
from cryptography.hazmat.primitives.hmac import HMAC
from shamir_mnemonic import MnemonicError, Share, combine_mnemonics, generate_mnemonics
from shamir_mnemonic.wordlist import WORD_INDEX_MAP, WORDLIST

from meter.errors import CustodyError

__all__ = [
    "CHECK_LENGTH",
    "CustodyShare",
    "Group",
    "Policy",
    "Recovery",
    "check_value",
    "combine",
    "split",
]

CHECK_LENGTH = 16  # bytes of the check value: 128 bits, beyond guessing
FINGERPRINT_LENGTH = 16
_MAX_GROUPS = 16  # SLIP-39 codes group and member counts in 4 bits each
_MAX_MEMBERS = 16
_SECRET_LENGTHS = range(16, 65, 2)  # SLIP-39 wants >= 128 bits, even; 64 still fits a card
_CEREMONY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,31}")
_RECORD_MAGIC = b"MCS1"  # meter custody share, record version 1
_CHECK_CONTEXT = b"meter.custody.check-value.v1\0"
_FINGERPRINT_CONTEXT = b"meter.custody.share.v1\0"


@dataclass(frozen=True)
class Group:
    """A named SLIP-39 group: ``threshold`` of its ``count`` members rebuild the group's part."""

    name: str
    threshold: int
    count: int


@dataclass(frozen=True)
class Policy:
    """Who must come together: ``group_threshold`` of the groups, each to its own threshold."""

    groups: Sequence[Group]
    group_threshold: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not 1 <= len(self.groups) <= _MAX_GROUPS:
            raise CustodyError(f"a policy has 1 to {_MAX_GROUPS} groups, not {len(self.groups)}")
        names = [group.name for group in self.groups]
        for group in self.groups:
            if not _GROUP_NAME.fullmatch(group.name):
                raise CustodyError(
                    f"group name {group.name!r} must be 1 to 32 letters, digits, spaces or ._-"
                )
            if names.count(group.name) > 1:
                raise CustodyError(f"group name {group.name!r} is used twice")
            if not 1 <= group.count <= _MAX_MEMBERS:
                raise CustodyError(
                    f"group {group.name!r} has {group.count} members; SLIP-39 allows 1 to {_MAX_MEMBERS}"
                )
            if not 1 <= group.threshold <= group.count:
                raise CustodyError(
                    f"group {group.name!r}: threshold {group.threshold} must be 1 to its {group.count} members"
                )
        if not 1 <= self.group_threshold <= len(self.groups):
            raise CustodyError(
                f"group threshold {self.group_threshold} must be 1 to the {len(self.groups)} groups"
            )

    def describe(self) -> str:
        """The rule in words, e.g. ``2 of 2 groups: 2 of 3 officers, 1 of 2 auditors``."""
        parts = ", ".join(f"{g.threshold} of {g.count} {g.name}" for g in self.groups)
        return f"{self.group_threshold} of {len(self.groups)} groups: {parts}"


@dataclass(frozen=True)
class CustodyShare:
    """One custodian's share and its metadata. Only ``mnemonic`` is secret."""

    ceremony: str
    group: str
    group_index: int  # SLIP-39's group number, from 0
    member: int  # member (or, in a 1-of-n group, copy) number, from 1
    members: int  # the group's member count
    check: bytes  # the set's check value: the same on every share of one split
    mnemonic: str = field(repr=False)  # the SLIP-39 words

    def __post_init__(self) -> None:
        if len(self.check) != CHECK_LENGTH:
            raise CustodyError(
                f"a share's check value is {CHECK_LENGTH} bytes, not {len(self.check)}"
            )
        if not (
            0 <= self.group_index < _MAX_GROUPS and 1 <= self.member <= self.members <= _MAX_MEMBERS
        ):
            raise CustodyError(
                f"share metadata out of range: group index {self.group_index}, member {self.member} of {self.members}"
            )

    @property
    def words(self) -> list[str]:
        return self.mnemonic.split()

    @property
    def fingerprint(self) -> str:
        """Hex hash of the share's record: names it in logs without revealing it."""
        return _fingerprint(self._body()).hex()

    def label(self) -> str:
        """How messages name the share: never by its words."""
        try:
            print_ = self.fingerprint[:16]
        except CustodyError:
            print_ = "no fingerprint: unreadable words"
        return f"{self.group} #{self.member} of ceremony {self.ceremony} ({print_})"

    def to_record(self) -> bytes:
        """The compact binary record a card or sealed file holds: body, then its fingerprint.

        The words are packed as SLIP-39's 10-bit indices (42 bytes for a 256-bit secret),
        so a share with its metadata stays under the 255 bytes many cards allow.
        """
        body = self._body()
        return body + _fingerprint(body)

    @classmethod
    def from_record(cls, record: bytes, where: str = "the record") -> CustodyShare:
        """Decode `to_record`'s bytes; CustodyError if damaged, altered or no share record."""
        if len(record) < len(_RECORD_MAGIC) + FINGERPRINT_LENGTH or not record.startswith(
            _RECORD_MAGIC
        ):
            raise CustodyError(f"{where} holds no custody share record (wrong magic or empty)")
        body, stored = record[:-FINGERPRINT_LENGTH], record[-FINGERPRINT_LENGTH:]
        if not constant_time.bytes_eq(_fingerprint(body), stored):
            raise CustodyError(
                f"{where} is damaged or altered: its fingerprint does not match its contents"
            )
        try:
            share = _decode_body(body)
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise CustodyError(f"{where} is malformed: {exc}") from None
        _parse(share)  # a share whose words fail their checksum is refused here, not later
        return share

    def _body(self) -> bytes:
        try:
            indices = [WORD_INDEX_MAP[word.lower()] for word in self.words]
        except KeyError:
            raise CustodyError(
                "a share with words outside the SLIP-39 list has no record"
            ) from None
        if not 0 < len(indices) <= 255:
            raise CustodyError(f"a share of {len(indices)} words has no record")
        packed = 0
        for index in indices:
            packed = packed << 10 | index
        pad = -len(indices) * 10 % 8
        words = (packed << pad).to_bytes((len(indices) * 10 + pad) // 8, "big")
        return b"".join(
            [
                _RECORD_MAGIC,
                _text(self.ceremony),
                _text(self.group),
                bytes([self.group_index, self.member, self.members]),
                self.check,
                bytes([len(indices)]),
                words,
            ]
        )


@dataclass(frozen=True)
class Recovery:
    """A combined secret and which shares went into it (fingerprints)."""

    secret: bytes = field(repr=False)
    check: bytes
    used: tuple[str, ...]
    spare: tuple[str, ...]  # given but not needed (beyond a group's threshold, or copies)


def check_value(secret: bytes, ceremony: str) -> bytes:
    """The set's check value: shows a recovered secret is the one split, without revealing it."""
    mac = HMAC(secret, hashes.SHA256())
    mac.update(_CHECK_CONTEXT + ceremony.encode())
    return mac.finalize()[:CHECK_LENGTH]


def split(secret: bytes, policy: Policy, ceremony: str, passphrase: str = "") -> list[CustodyShare]:
    """Split ``secret`` by ``policy``: every share, group by group, checked by recombining.

    A 1-of-n group is SLIP-39's 1-of-1 group handed out n times (SLIP-39 forbids a member
    threshold of 1 with several members: with threshold 1 every member's share is the
    group's part itself, so the copies are equal anyway); they differ only in ``member``.
    ``passphrase`` is SLIP-39's own (printable ASCII): without it the shares alone give
    the secret, with it they give it only together with the passphrase.
    """
    if len(secret) not in _SECRET_LENGTHS:
        raise CustodyError(
            f"a secret to split is 16 to 64 bytes, an even number; this one is {len(secret)}"
        )
    _check_ceremony(ceremony)
    phrase = _passphrase(passphrase)
    layout = [(1, 1) if g.threshold == 1 else (g.threshold, g.count) for g in policy.groups]
    try:
        mnemonics: list[list[str]] = generate_mnemonics(
            policy.group_threshold, layout, secret, passphrase=phrase
        )
    except (MnemonicError, ValueError) as exc:
        raise CustodyError(f"SLIP-39 refused the policy {policy.describe()}: {exc}") from None
    check = check_value(secret, ceremony)
    shares: list[CustodyShare] = []
    for index, (group, words) in enumerate(zip(policy.groups, mnemonics, strict=True)):
        if group.threshold == 1:
            words = words * group.count
        for member, mnemonic in enumerate(words, start=1):
            shares.append(
                CustodyShare(ceremony, group.name, index, member, group.count, check, mnemonic)
            )
    # Before any share leaves: the smallest qualifying selection must give the secret back.
    needed: list[CustodyShare] = []
    for index, group in enumerate(policy.groups[: policy.group_threshold]):
        members = [s for s in shares if s.group_index == index]
        needed += members[: group.threshold]
    if not constant_time.bytes_eq(combine(needed, passphrase).secret, secret):
        raise CustodyError("the split did not recombine to its secret: nothing was handed out")
    return shares


def combine(
    shares: Sequence[CustodyShare], passphrase: str = "", expected_check: bytes | None = None
) -> Recovery:
    """The secret from exactly the shares the policy needs, chosen from ``shares``.

    Refused, naming the share and the reason: a share whose words fail their checksum,
    shares of different splits, two differing shares for one member, too few shares of a
    group or too few groups, a selection that SLIP-39's digest rejects, and a result that
    does not match the set's check value (a wrong passphrase), or ``expected_check`` (the
    value a ceremony recorded).
    """
    if not shares:
        raise CustodyError("no shares given")
    phrase = _passphrase(passphrase)
    parsed = [(n, share, _parse(share)) for n, share in enumerate(shares, start=1)]

    sets: dict[tuple[str, int], list[int]] = {}
    for n, share, slip in parsed:
        sets.setdefault((share.ceremony, slip.identifier), []).append(n)
    if len(sets) > 1:
        listed = "; ".join(
            f"ceremony {ceremony} split {identifier:#06x}: {_numbers(numbers)}"
            for (ceremony, identifier), numbers in sets.items()
        )
        raise CustodyError(
            f"the shares come from {len(sets)} different splits ({listed}): a share from another "
            "set cannot be combined; give only the shares of one split"
        )
    first_n, first, first_slip = parsed[0]
    for n, share, slip in parsed[1:]:
        if share.check != first.check:
            raise CustodyError(
                f"shares {first_n} and {n} of one split carry different check values: "
                f"the metadata of one of them ({first.label()}, {share.label()}) was altered"
            )
        if slip.common_parameters() != first_slip.common_parameters():
            raise CustodyError(
                f"share {n} ({share.label()}) claims another group layout than share {first_n}: damaged or altered"
            )
    for n, share, slip in parsed:
        if share.group_index != slip.group_index:
            raise CustodyError(
                f"share {n} ({share.label()}) names group index {share.group_index} but its words "
                f"belong to group {slip.group_index}: its metadata was altered"
            )

    # By group, then by SLIP-39 member index: copies and repeats collapse, conflicts are refused.
    groups: dict[int, dict[int, tuple[int, CustodyShare, Any]]] = {}
    spare: list[str] = []
    for n, share, slip in parsed:
        members = groups.setdefault(slip.group_index, {})
        seen = members.get(slip.index)
        if seen is None:
            members[slip.index] = (n, share, slip)
        elif seen[2].value != slip.value:
            raise CustodyError(
                f"shares {seen[0]} and {n} both claim member {slip.index + 1} of group "
                f"{share.group!r} but differ: one of them is damaged"
            )
        else:
            spare.append(share.fingerprint)

    group_threshold, group_count = first_slip.group_threshold, first_slip.group_count
    complete = sorted(
        index
        for index, members in groups.items()
        if len(members) >= next(iter(members.values()))[2].member_threshold
    )
    if len(complete) < group_threshold:
        states = []
        for index in range(group_count):
            members = groups.get(index, {})
            if not members:
                states.append(f"group {index + 1}: no share given")
                continue
            name = next(iter(members.values()))[1].group
            need = next(iter(members.values()))[2].member_threshold
            state = "complete" if index in complete else "not enough"
            states.append(f"group {name!r}: {len(members)} of {need} needed ({state})")
        raise CustodyError(
            f"not enough shares: {group_threshold} of {group_count} groups must be complete, "
            f"complete: {len(complete)}; " + "; ".join(states)
        )

    selected: list[tuple[int, CustodyShare, Any]] = []
    for index in complete[:group_threshold]:
        in_order = sorted(groups[index].values(), key=lambda entry: entry[0])
        need = in_order[0][2].member_threshold
        selected += in_order[:need]
        spare += [entry[1].fingerprint for entry in in_order[need:]]
    for index in complete[group_threshold:]:
        spare += [entry[1].fingerprint for entry in groups[index].values()]
    for index, members in groups.items():
        if index not in complete:
            spare += [entry[1].fingerprint for entry in members.values()]

    try:
        secret: bytes = combine_mnemonics([entry[1].mnemonic for entry in selected], phrase)
    except MnemonicError as exc:
        numbers = _numbers(sorted(entry[0] for entry in selected))
        if "digest" in str(exc):
            raise CustodyError(
                f"{numbers} do not combine (SLIP-39 digest mismatch): one of them is "
                "damaged or belongs to another split"
            ) from None
        raise CustodyError(f"{numbers} do not combine: {exc}") from None

    recovered_check = check_value(secret, first.ceremony)
    if not constant_time.bytes_eq(recovered_check, first.check):
        raise CustodyError(
            "the combined secret does not match the set's check value: a wrong passphrase, "
            "or shares whose metadata was altered"
        )
    if expected_check is not None and not constant_time.bytes_eq(recovered_check, expected_check):
        raise CustodyError(
            "the combined secret does not match the check value the ceremony recorded: "
            "these shares are of another secret"
        )
    return Recovery(
        secret,
        recovered_check,
        tuple(entry[1].fingerprint for entry in selected),
        tuple(spare),
    )


def slip39_layout(share: CustodyShare) -> tuple[int, int, int]:
    """(member threshold, group threshold, group count) as the share's words state them."""
    slip = _parse(share)
    return slip.member_threshold, slip.group_threshold, slip.group_count


def _parse(share: CustodyShare) -> Any:
    """The shamir-mnemonic Share of ``share``'s words; CustodyError naming the fault."""
    for position, word in enumerate(share.words, start=1):
        if word.lower() not in WORD_INDEX_MAP:
            raise CustodyError(f"share {share.label()}: word {position} is not a SLIP-39 word")
    try:
        return Share.from_mnemonic(share.mnemonic)
    except MnemonicError as exc:
        reason = str(exc)
        if "checksum" in reason:
            raise CustodyError(
                f"share {share.label()} fails its RS1024 checksum: a word is wrong, missing or swapped"
            ) from None
        if "length" in reason:
            raise CustodyError(
                f"share {share.label()} has {len(share.words)} words: no valid SLIP-39 share length"
            ) from None
        if "padding" in reason:
            raise CustodyError(f"share {share.label()} has invalid padding: damaged") from None
        raise CustodyError(f"share {share.label()} is no valid SLIP-39 share") from None


def _decode_body(body: bytes) -> CustodyShare:
    at = len(_RECORD_MAGIC)
    ceremony, at = _read_text(body, at)
    group, at = _read_text(body, at)
    group_index, member, members = body[at], body[at + 1], body[at + 2]
    at += 3
    check = body[at : at + CHECK_LENGTH]
    at += CHECK_LENGTH
    count = body[at]
    at += 1
    packed = body[at:]
    if len(check) != CHECK_LENGTH or len(packed) != (count * 10 + 7) // 8:
        raise ValueError("its length does not match its word count")
    value = int.from_bytes(packed, "big") >> (-count * 10 % 8)
    indices = [(value >> (10 * (count - 1 - i))) & 0x3FF for i in range(count)]
    mnemonic = " ".join(WORDLIST[i] for i in indices)
    return CustodyShare(ceremony, group, group_index, member, members, check, mnemonic)


def _text(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise CustodyError(f"{value[:20]!r}... is too long for a share record")
    return bytes([len(data)]) + data


def _read_text(body: bytes, at: int) -> tuple[str, int]:
    length = body[at]
    data = body[at + 1 : at + 1 + length]
    if len(data) != length:
        raise ValueError("a text field runs past its end")
    return data.decode(), at + 1 + length


def _fingerprint(body: bytes) -> bytes:
    return hashlib.sha256(_FINGERPRINT_CONTEXT + body).digest()[:FINGERPRINT_LENGTH]


def _check_ceremony(ceremony: str) -> None:
    if not _CEREMONY.fullmatch(ceremony):
        raise CustodyError(
            f"ceremony id {ceremony!r} must be 1 to 64 letters, digits or ._:- (starting with a letter or digit)"
        )


def _passphrase(passphrase: str) -> bytes:
    """SLIP-39's passphrase: printable ASCII only (its rule), NFKD as its spec suggests."""
    text = unicodedata.normalize("NFKD", passphrase)
    if not all(32 <= ord(c) <= 126 for c in text):
        raise CustodyError("a SLIP-39 passphrase may hold only printable ASCII characters")
    return text.encode("ascii")


def _numbers(numbers: Sequence[int]) -> str:
    """``share 3`` or ``shares 1, 2``: shares are numbered by their place in the input."""
    return ("share " if len(numbers) == 1 else "shares ") + ", ".join(str(n) for n in numbers)
