"""SLIP-39 share sets: splits, group rules, exact selection and every refusal (pure logic)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from meter.custody.shares import (
    CustodyShare,
    Group,
    Policy,
    check_value,
    combine,
    split,
)
from meter.errors import CustodyError, MeterError

OFFICERS_AUDITORS = Policy(
    groups=[Group("officers", 2, 3), Group("auditors", 1, 2)], group_threshold=2
)


@pytest.fixture
def secret() -> bytes:
    return os.urandom(32)


def by_group(shares: list[CustodyShare], group: str) -> list[CustodyShare]:
    return [s for s in shares if s.group == group]


def test_custody_error_is_a_meter_error() -> None:
    assert issubclass(CustodyError, MeterError)


def test_two_of_three_officers_and_one_of_two_auditors(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "export-2024-05")
    officers, auditors = by_group(shares, "officers"), by_group(shares, "auditors")
    assert [s.member for s in officers] == [1, 2, 3] and [s.member for s in auditors] == [1, 2]
    assert {s.check for s in shares} == {check_value(secret, "export-2024-05")}
    assert len({s.fingerprint for s in shares}) == 5
    for pair in ([0, 1], [0, 2], [1, 2]):
        for auditor in auditors:
            chosen = [officers[i] for i in pair] + [auditor]
            recovery = combine(chosen)
            assert recovery.secret == secret
            assert recovery.used == tuple(s.fingerprint for s in chosen)


def test_more_shares_than_needed_are_selected_exactly(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    recovery = combine(shares)  # shamir-mnemonic alone refuses 3 shares of a 2-of-3 group
    assert recovery.secret == secret
    assert len(recovery.used) == 3 and len(recovery.spare) == 2
    assert set(recovery.used) | set(recovery.spare) == {s.fingerprint for s in shares}


def test_group_threshold_one_of_two_groups(secret: bytes) -> None:
    policy = Policy([Group("east", 2, 2), Group("west", 3, 4)], group_threshold=1)
    shares = split(secret, policy, "c1")
    assert combine(by_group(shares, "east")).secret == secret
    assert combine(by_group(shares, "west")[1:]).secret == secret


def test_passphrase_protected_set(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1", passphrase="second factor")
    assert combine(shares, passphrase="second factor").secret == secret
    # SLIP-39 itself would give another secret here: the check value refuses it.
    with pytest.raises(CustodyError, match="check value: a wrong passphrase"):
        combine(shares, passphrase="second-factor")
    with pytest.raises(CustodyError, match="check value: a wrong passphrase"):
        combine(shares)


def test_expected_check_from_the_ceremony_record(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    assert combine(shares, expected_check=check_value(secret, "c1")).secret == secret
    with pytest.raises(CustodyError, match="check value the ceremony recorded"):
        combine(shares, expected_check=check_value(os.urandom(32), "c1"))


def test_k_minus_one_shares_name_the_short_group(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    officers, auditors = by_group(shares, "officers"), by_group(shares, "auditors")
    with pytest.raises(CustodyError, match=r"group 'officers': 1 of 2 needed \(not enough\)"):
        combine(officers[:1] + auditors[:1])
    with pytest.raises(CustodyError, match="group 2: no share given"):
        combine(officers)
    with pytest.raises(CustodyError, match="2 of 2 groups must be complete, complete: 0"):
        combine(officers[:1])


def test_copies_of_a_one_of_n_share_do_not_count_twice(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    officers, auditors = by_group(shares, "officers"), by_group(shares, "auditors")
    assert auditors[0].mnemonic == auditors[1].mnemonic  # SLIP-39's 1-of-1, handed out twice
    with pytest.raises(CustodyError, match="'officers': 1 of 2"):
        combine(officers[:1] + auditors)
    with pytest.raises(CustodyError, match="'officers': 1 of 2"):
        combine([officers[0], officers[0], auditors[0]])  # the same share twice is one


def test_share_from_another_split_is_refused(secret: bytes) -> None:
    first = split(secret, OFFICERS_AUDITORS, "c1")
    second = split(secret, OFFICERS_AUDITORS, "c1")  # same secret, same ceremony: another split
    mixed = [first[0], second[1], first[3]]
    with pytest.raises(CustodyError, match=r"2 different splits .*shares 1, 3.*share 2"):
        combine(mixed)
    other = split(os.urandom(32), OFFICERS_AUDITORS, "c2")
    with pytest.raises(CustodyError, match="ceremony c2"):
        combine([first[0], first[1], other[3]])


def test_foreign_share_under_the_same_identifier_fails_the_digest(secret: bytes) -> None:
    from shamir_mnemonic import EncryptedMasterSecret, Share, split_ems

    shares = split(secret, OFFICERS_AUDITORS, "c1")
    identifier = Share.from_mnemonic(shares[0].mnemonic).identifier
    # Another secret split under the same SLIP-39 identifier (1 in 32768 by chance):
    # only the digest of the shared secret can tell its shares apart.
    ems = EncryptedMasterSecret.from_master_secret(os.urandom(32), b"", identifier, True, 1)
    foreign = split_ems(2, [(2, 3), (1, 1)], ems)[0][1]
    impostor = dataclasses.replace(shares[1], mnemonic=foreign.mnemonic())
    with pytest.raises(
        CustodyError, match=r"shares 1, 2, 3 do not combine \(SLIP-39 digest mismatch\)"
    ):
        combine([shares[0], impostor, shares[3]])


def test_tampered_word_fails_the_checksum(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    words = shares[0].words
    words[10] = "academic" if words[10] != "academic" else "acid"
    tampered = dataclasses.replace(shares[0], mnemonic=" ".join(words))
    with pytest.raises(CustodyError, match="fails its RS1024 checksum") as refused:
        combine([tampered, shares[1], shares[3]])
    assert words[10] not in str(refused.value)  # words never appear in messages


def test_unknown_word_and_wrong_length_are_named(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    words = shares[0].words
    with pytest.raises(CustodyError, match="word 4 is not a SLIP-39 word"):
        combine([dataclasses.replace(shares[0], mnemonic=" ".join([*words[:3], "xyzzy"]))])
    with pytest.raises(CustodyError, match="has 19 words"):
        combine([dataclasses.replace(shares[0], mnemonic=" ".join(words[:19]))])


def test_altered_check_value_is_refused(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    forged = dataclasses.replace(shares[1], check=bytes(16))
    with pytest.raises(CustodyError, match="different check values"):
        combine([shares[0], forged, shares[3]])
    all_forged = [dataclasses.replace(s, check=bytes(16)) for s in shares]
    with pytest.raises(CustodyError, match="does not match the set's check value"):
        combine(all_forged)


def test_altered_group_index_is_refused(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    moved = dataclasses.replace(shares[3], group_index=0)
    with pytest.raises(CustodyError, match="its metadata was altered"):
        combine([shares[0], shares[1], moved])


def test_two_different_shares_for_one_member_are_refused(secret: bytes) -> None:
    policy = Policy([Group("officers", 2, 3)], group_threshold=1)
    shares = split(secret, policy, "c1")
    # Member 1's words with member 2's place: its checksum is the only thing telling them
    # apart, so it is a different share claiming one member index only if re-encoded.
    from shamir_mnemonic import Share

    one, two = (Share.from_mnemonic(s.mnemonic) for s in shares[:2])
    clash = dataclasses.replace(two, index=one.index)
    impostor = dataclasses.replace(shares[1], mnemonic=clash.mnemonic())
    with pytest.raises(CustodyError, match="both claim member 1 of group 'officers' but differ"):
        combine([shares[0], impostor])


def test_record_round_trip_and_damage(secret: bytes) -> None:
    share = split(secret, OFFICERS_AUDITORS, "export-2024-05")[0]
    record = share.to_record()
    assert len(record) < 255  # fits the special DOs of common cards
    assert CustodyShare.from_record(record) == share
    damaged = bytearray(record)
    damaged[30] ^= 0x01
    with pytest.raises(CustodyError, match="fingerprint does not match"):
        CustodyShare.from_record(bytes(damaged))
    with pytest.raises(CustodyError, match="no custody share record"):
        CustodyShare.from_record(b"")
    with pytest.raises(CustodyError, match="no custody share record"):
        CustodyShare.from_record(b"XXXX" + record[4:])


def test_empty_and_invalid_input_is_refused(secret: bytes) -> None:
    with pytest.raises(CustodyError, match="no shares given"):
        combine([])
    with pytest.raises(CustodyError, match="16 to 64 bytes"):
        split(b"short", OFFICERS_AUDITORS, "c1")
    with pytest.raises(CustodyError, match="16 to 64 bytes"):
        split(os.urandom(33), OFFICERS_AUDITORS, "c1")
    with pytest.raises(CustodyError, match="ceremony id"):
        split(secret, OFFICERS_AUDITORS, "bad id/with slash")
    with pytest.raises(CustodyError, match="printable ASCII"):
        split(secret, OFFICERS_AUDITORS, "c1", passphrase="caf\u00e9\u2603")


@pytest.mark.parametrize(
    ("groups", "threshold", "message"),
    [
        ([], 1, "1 to 16 groups"),
        ([Group("a", 3, 2)], 1, "threshold 3 must be 1 to its 2 members"),
        ([Group("a", 0, 2)], 1, "threshold 0"),
        ([Group("a", 2, 17)], 1, "SLIP-39 allows 1 to 16"),
        ([Group("a", 1, 1), Group("a", 1, 1)], 1, "used twice"),
        ([Group("a", 1, 1)], 2, "group threshold 2 must be 1 to the 1 groups"),
        ([Group("", 1, 1)], 1, "group name"),
    ],
)
def test_policy_rules(groups: list[Group], threshold: int, message: str) -> None:
    with pytest.raises(CustodyError, match=message):
        Policy(groups, threshold)


def test_secret_never_in_repr(secret: bytes) -> None:
    shares = split(secret, OFFICERS_AUDITORS, "c1")
    recovery = combine(shares)
    assert secret.hex() not in repr(recovery) and repr(secret) not in repr(recovery)
    assert shares[0].mnemonic not in repr(shares[0]) and "mnemonic" not in repr(shares[0])
