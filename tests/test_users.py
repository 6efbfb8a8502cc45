"""The user store: host password policy, scrypt, sealed PIN slots, growing lockout."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meter.errors import AuthenticationFailed, ConfigurationError, InvalidInput, LockedOut
from meter.psd.passwords import PasswordPolicy, derive
from meter.psd.roles import Role
from meter.psd.users import (
    LogonFailed,
    UserLockedOut,
    UserStore,
    lockout_delay,
)

POLICY = PasswordPolicy(scrypt_log2_n=14)  # the floor: fast tests
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
PASSWORD = "Correct-Horse-42"
OTHER_PASSWORD = "Battery-Staple-77"
PIN = "user-pin-5839-1177"
SO_PIN = "so-pin-9921-4406"
SECRETS = {"user_pin": PIN}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "meter"


@pytest.fixture
def store(folder: Path) -> UserStore:
    return UserStore.open(folder, POLICY)


def raw(folder: Path) -> bytes:
    return (folder / "users.json").read_bytes()


def edit(folder: Path, change: object) -> None:
    """Rewrite users.json by hand, as an attacker with the file could."""
    path = folder / "users.json"
    data = json.loads(path.read_text())
    change(data["users"])  # type: ignore[operator]
    path.write_text(json.dumps(data))


# -- the host's policy -----------------------------------------------------------------------


def test_policy_message_lists_everything_missing_and_never_the_password() -> None:
    with pytest.raises(InvalidInput) as err:
        POLICY.check("abcdefgh1", "alice")
    message = str(err.value)
    assert message == (
        "password does not meet the host's policy: it has 9 characters, at least 12 are "
        "required; it lacks an upper-case letter and a symbol (3 of lower-case, upper-case, "
        "digit, symbol are required)"
    )
    assert "abcdefgh1" not in message


def test_policy_required_class_and_user_id() -> None:
    policy = PasswordPolicy(required=frozenset({"digit"}), scrypt_log2_n=14)
    with pytest.raises(InvalidInput, match="it lacks a digit, which the host requires"):
        policy.check("Abcdefghijk!", "bob")
    with pytest.raises(InvalidInput, match="it contains the user id") as err:
        policy.check("xx-ALICE-Secret-9", "alice")
    assert "Secret" not in str(err.value)
    policy.check("Abcdefghijk!7", "bob")  # meets every rule: no exception


def test_policy_load_reads_host_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[password]\nmin_length = 16\nmin_classes = 2\nrequired = ["symbol"]\nscrypt_log2_n = 16\n'
    )
    policy = PasswordPolicy.load(path)
    assert policy == PasswordPolicy(16, 2, frozenset({"symbol"}), 16)
    assert PasswordPolicy.load(tmp_path / "missing.toml") == PasswordPolicy()
    assert PasswordPolicy.load(None) == PasswordPolicy()


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('min_length = "twelve"', "min_length"),
        ("min_length = 4", "min_length"),
        ("min_classes = 5", "min_classes"),
        ('required = ["vowel"]', "required"),
        ("scrypt_log2_n = 12", "scrypt_log2_n"),
        ("scrypt_log2_n = true", "scrypt_log2_n"),
        ("max_length = 40", "max_length"),
    ],
)
def test_policy_load_names_the_bad_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"[password]\n{body}\n")
    with pytest.raises(ConfigurationError, match=key) as err:
        PasswordPolicy.load(path)
    assert str(path) in str(err.value)


def test_derive_splits_one_scrypt_and_normalizes() -> None:
    salt = bytes(range(16))
    verifier, key = derive("Pässword-1", salt, 14)
    assert len(verifier) == len(key) == 32 and verifier != key
    # NFKC: a full-width letter derives the same as its ASCII form.
    assert derive("\uff30ässword-1", salt, 14) == (verifier, key)
    assert derive("Pässword-1", bytes(16), 14) != (verifier, key)
    with pytest.raises(InvalidInput):
        derive("Pässword-1", salt, 13)


# -- records, hashing and slots --------------------------------------------------------------


def test_create_and_authenticate_returns_the_sealed_secrets(folder: Path, store: UserStore) -> None:
    info = store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    assert (info.user_id, info.role, info.created, info.failures) == (
        "alice",
        Role.CUSTOMER,
        NOW,
        0,
    )
    later = NOW + timedelta(minutes=5)
    user, secrets = UserStore.open(folder, POLICY).authenticate("alice", PASSWORD, later)
    assert secrets == SECRETS
    assert user.last_logon == later
    assert UserStore.open(folder, POLICY).get("alice").last_logon == later  # persisted
    assert stat.S_IMODE((folder / "users.json").stat().st_mode) == 0o600


def test_same_password_twice_gives_different_salt_verifier_and_slot(
    folder: Path, store: UserStore
) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    store.create("bob", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    users = json.loads(raw(folder))["users"]
    a, b = users["alice"], users["bob"]
    assert a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["verifier"] != b["verifier"]
    assert a["slot"]["ciphertext"] != b["slot"]["ciphertext"]
    assert a["kdf"] == {"salt": a["kdf"]["salt"], "log2_n": 14, "r": 8, "p": 1}


def test_no_secret_or_password_in_the_file(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    store.create("sam", Role.SECURITY_OFFICER, OTHER_PASSWORD, {"so_pin": SO_PIN}, NOW)
    store.authenticate("alice", PASSWORD, NOW)
    store.change_password("alice", PASSWORD, "Horse-Correct-43", NOW)
    data = raw(folder)
    for secret in (PIN, SO_PIN, PASSWORD, OTHER_PASSWORD, "Horse-Correct-43"):
        for form in (secret.encode(), secret.encode().hex().encode()):
            assert form not in data
    listed = [u.to_json() for u in store.users()]
    assert [u["user_id"] for u in listed] == ["alice", "sam"]
    assert set(listed[0]) == {
        "user_id",
        "role",
        "created",
        "modified",
        "failures",
        "locked_until",
        "last_logon",
    }


def test_wrong_password_fails_without_secrets(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    with pytest.raises(AuthenticationFailed) as err:
        store.authenticate("alice", OTHER_PASSWORD, NOW)
    assert isinstance(err.value, LogonFailed)
    assert str(err.value) == "logon failed for user 'alice': unknown user or wrong password"
    assert OTHER_PASSWORD not in str(err.value) and PIN not in str(err.value)
    assert err.value.failure.failures == 1 and err.value.failure.locked_until is None
    assert UserStore.open(folder, POLICY).get("alice").failures == 1  # durable


def test_unknown_user_fails_like_a_wrong_password(store: UserStore) -> None:
    with pytest.raises(LogonFailed) as err:
        store.authenticate("nobody", PASSWORD, NOW)
    assert str(err.value) == "logon failed for user 'nobody': unknown user or wrong password"
    assert (err.value.failure.failures, err.value.failure.locked_until) == (0, None)
    # A password typed into the user id field is not echoed.
    with pytest.raises(LogonFailed) as err:
        store.authenticate(PASSWORD, PASSWORD, NOW)
    assert PASSWORD not in str(err.value) and err.value.failure.user_id != PASSWORD


def test_lockout_grows_and_expires_with_the_clock(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    for n in (1, 2):
        with pytest.raises(LogonFailed) as err:
            store.authenticate("alice", "wrong-Guess-1", NOW)
        assert (err.value.failure.failures, err.value.failure.locked_until) == (n, None)
    with pytest.raises(LogonFailed) as err:
        store.authenticate("alice", "wrong-Guess-1", NOW)
    assert err.value.failure.locked_until == NOW + timedelta(seconds=30)

    # While locked even the right password is refused, unchecked, and the lock is not extended.
    before = raw(folder)
    with pytest.raises(LockedOut) as locked:
        store.authenticate("alice", PASSWORD, NOW + timedelta(seconds=29))
    assert isinstance(locked.value, UserLockedOut)
    assert str(locked.value).startswith(
        "user 'alice' is locked out until 2026-03-01T12:00:30Z after 3 failed logons"
    )
    assert raw(folder) == before

    # After it ends, the next failure locks for twice as long.
    t = NOW + timedelta(seconds=30)
    with pytest.raises(LogonFailed) as err:
        store.authenticate("alice", "wrong-Guess-1", t)
    assert not isinstance(err.value, LockedOut)
    assert err.value.failure.failures == 4
    assert err.value.failure.locked_until == t + timedelta(seconds=60)

    _, secrets = store.authenticate("alice", PASSWORD, t + timedelta(seconds=60))
    assert secrets == SECRETS
    assert store.get("alice").failures == 0 and store.get("alice").locked_until is None


def test_lockout_schedule() -> None:
    assert [lockout_delay(n) for n in (0, 1, 2)] == [None, None, None]
    seconds = [lockout_delay(n).total_seconds() for n in range(3, 12)]  # type: ignore[union-attr]
    assert seconds == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_administrator_unlocks(store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    for _ in range(3):
        with pytest.raises(LogonFailed):
            store.authenticate("alice", "wrong-Guess-1", NOW)
    assert store.get("alice").locked_until is not None
    info = store.unlock("alice", NOW)
    assert (info.failures, info.locked_until) == (0, None)
    assert store.authenticate("alice", PASSWORD, NOW)[1] == SECRETS


def test_slot_is_bound_to_its_user(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    store.create("bob", Role.CUSTOMER, OTHER_PASSWORD, {"user_pin": "bob-pin-0000"}, NOW)

    def move_alices_credentials_to_bob(users: dict[str, dict[str, object]]) -> None:
        for key in ("kdf", "verifier", "slot"):
            users["bob"][key] = users["alice"][key]

    edit(folder, move_alices_credentials_to_bob)
    with pytest.raises(ConfigurationError, match="slot of user 'bob' is damaged") as err:
        store.authenticate("bob", PASSWORD, NOW)
    assert PIN not in str(err.value) and PASSWORD not in str(err.value)


def test_slot_is_bound_to_its_role(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)

    def promote(users: dict[str, dict[str, object]]) -> None:
        users["alice"]["role"] = "administrator"

    edit(folder, promote)
    with pytest.raises(ConfigurationError, match="slot of user 'alice' is damaged"):
        store.authenticate("alice", PASSWORD, NOW)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe not json",
        b'{"format": "meter-users-v0", "users": {}}',
        b'{"format": "meter-users-v1", "users": {"Alice": {}}}',
        b"[]",
    ],
)
def test_corrupt_file_is_a_clear_error_and_stays_untouched(
    folder: Path, store: UserStore, content: bytes
) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    path = folder / "users.json"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=str(path)):
        UserStore.open(folder, POLICY)
    with pytest.raises(ConfigurationError, match=str(path)):
        store.create("bob", Role.CUSTOMER, OTHER_PASSWORD, SECRETS, NOW)
    with pytest.raises(ConfigurationError, match=str(path)):
        store.authenticate("alice", PASSWORD, NOW)
    assert path.read_bytes() == content


def test_file_open_to_others_is_refused(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    os.chmod(folder / "users.json", 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        UserStore.open(folder, POLICY)


def test_delete_removes_the_slot(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    store.create("bob", Role.AUDITOR, OTHER_PASSWORD, SECRETS, NOW)
    slot = json.loads(raw(folder))["users"]["alice"]["slot"]
    store.delete("alice")
    data = raw(folder)
    assert slot["ciphertext"].encode() not in data and slot["nonce"].encode() not in data
    assert sorted(p.name for p in folder.iterdir()) == ["users.json", "users.lock"]
    with pytest.raises(InvalidInput, match="no user 'alice'"):
        store.get("alice")
    with pytest.raises(InvalidInput, match="no user 'alice'"):
        store.delete("alice")
    assert store.count() == 1


def test_writes_leave_no_temporary_files(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    # A writer that crashed before its rename left a copy of the old file, slots included.
    (folder / ".users.json.99999.tmp").write_bytes(raw(folder))
    store.create("bob", Role.CUSTOMER, OTHER_PASSWORD, SECRETS, NOW)
    with pytest.raises(LogonFailed):
        store.authenticate("bob", PASSWORD, NOW)
    store.set_password("bob", "Fresh-Start-2026", SECRETS, NOW)
    store.delete("alice")
    assert sorted(p.name for p in folder.iterdir()) == ["users.json", "users.lock"]


def test_bad_input_changes_nothing(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    before = raw(folder)
    cases = [
        lambda: store.create("bob", Role.CUSTOMER, "short", SECRETS, NOW),
        lambda: store.create("alice", Role.CUSTOMER, OTHER_PASSWORD, SECRETS, NOW),
        lambda: store.create("Bob", Role.CUSTOMER, OTHER_PASSWORD, SECRETS, NOW),
        lambda: store.create("bob", Role.NO_ROLE, OTHER_PASSWORD, SECRETS, NOW),
        lambda: store.create("bob", Role.CUSTOMER, OTHER_PASSWORD, {"user_pin": 5}, NOW),  # type: ignore[dict-item]
        lambda: store.create("bob", Role.CUSTOMER, OTHER_PASSWORD, SECRETS, datetime(2026, 3, 1)),
        lambda: store.modify("alice", Role.NO_ROLE, OTHER_PASSWORD, SECRETS, NOW),
        lambda: store.modify("carol", Role.AUDITOR, OTHER_PASSWORD, SECRETS, NOW),
        lambda: store.set_password("alice", "alice-Is-Me-2026", SECRETS, NOW),
        lambda: store.change_password("alice", PASSWORD, PASSWORD, NOW),
        lambda: store.change_password("alice", PASSWORD, "weak", NOW),
    ]
    for case in cases:
        with pytest.raises(InvalidInput) as err:
            case()
        assert PASSWORD not in str(err.value) and OTHER_PASSWORD not in str(err.value)
        assert raw(folder) == before


def test_change_password_reseals_the_same_secrets(folder: Path, store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    old = json.loads(raw(folder))["users"]["alice"]
    with pytest.raises(LogonFailed) as err:
        store.change_password("alice", "wrong-Guess-1", OTHER_PASSWORD, NOW)
    assert err.value.failure.failures == 1
    store.change_password("alice", PASSWORD, OTHER_PASSWORD, NOW)
    new = json.loads(raw(folder))["users"]["alice"]
    assert new["kdf"]["salt"] != old["kdf"]["salt"]
    assert new["slot"]["nonce"] != old["slot"]["nonce"]
    assert store.authenticate("alice", OTHER_PASSWORD, NOW)[1] == SECRETS
    with pytest.raises(LogonFailed):
        store.authenticate("alice", PASSWORD, NOW)


def test_modify_changes_role_and_reseals(store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    later = NOW + timedelta(days=1)
    info = store.modify("alice", Role.AUDITOR, OTHER_PASSWORD, SECRETS, later)
    assert (info.role, info.created, info.modified) == (Role.AUDITOR, NOW, later)
    user, secrets = store.authenticate("alice", OTHER_PASSWORD, later)
    assert (user.role, secrets) == (Role.AUDITOR, SECRETS)
    assert store.count(Role.AUDITOR) == 1 and store.count(Role.CUSTOMER) == 0


def test_set_password_clears_a_lockout(store: UserStore) -> None:
    store.create("alice", Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    for _ in range(3):
        with pytest.raises(LogonFailed):
            store.authenticate("alice", "wrong-Guess-1", NOW)
    store.set_password("alice", OTHER_PASSWORD, {"user_pin": "new-pin-1"}, NOW)
    assert store.authenticate("alice", OTHER_PASSWORD, NOW)[1] == {"user_pin": "new-pin-1"}


def _create_one(args: tuple[str, str]) -> str:
    folder, user_id = args
    UserStore.open(Path(folder), POLICY).create(user_id, Role.CUSTOMER, PASSWORD, SECRETS, NOW)
    return user_id


def test_processes_do_not_lose_each_others_updates(folder: Path, store: UserStore) -> None:
    names = [f"user{i}" for i in range(6)]
    with ProcessPoolExecutor(max_workers=6) as pool:
        done = list(pool.map(_create_one, [(str(folder), n) for n in names]))
    assert done == names
    assert [u.user_id for u in store.users()] == names
