"""The meter's users: one record per person, holding a role, a password verifier and a PIN slot.

A slot is the dict of token secrets this user may unlock (the User PIN, or the SO
PIN for the Security Officer), sealed with AES-256-GCM under the key that the
user's password derives (see ``passwords.derive``). Its associated data names the
user and the role, so a slot copied into another record, or a record whose role
was edited, does not open. Nobody types a token PIN: logging on unseals it.

The store is one JSON file, ``users.json``, replaced atomically under an flock on
``users.lock``; every read-modify-write happens under that lock, so two processes
cannot lose each other's updates (failure counts included).
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meter.durable import write_atomically
from meter.errors import AuthenticationFailed, ConfigurationError, InvalidInput, LockedOut
from meter.psd.passwords import (
    SALT_BYTES,
    PasswordPolicy,
    derive,
    normalize,
)
from meter.psd.roles import Role
from meter.psd.users_records import (
    _NONCE_BYTES,
    _USER_ID_RULE,
    FORMAT,
    UserInfo,
    _iso,
    _parse_record,
    _Record,
    _valid_user_id,
)

__all__ = [
    "FILE_NAME",
    "FORMAT",
    "LOCK_NAME",
    "LogonFailed",
    "LogonFailure",
    "UserInfo",
    "UserLockedOut",
    "UserStore",
    "lockout_delay",
]

FILE_NAME = "users.json"
LOCK_NAME = "users.lock"
_AD_PREFIX = b"meter-slot-v1|"
_LOCK_AFTER = 3  # the third consecutive failure locks
_LOCK_BASE = timedelta(seconds=30)
_LOCK_MAX = timedelta(hours=1)


def lockout_delay(failures: int) -> timedelta | None:
    """How long the failure number ``failures`` locks the user: none for 1-2, then 30 s doubling to 1 h."""
    if failures < _LOCK_AFTER:
        return None
    return min(_LOCK_BASE * (1 << min(failures - _LOCK_AFTER, 7)), _LOCK_MAX)


@dataclass(frozen=True)
class LogonFailure:
    """A failed logon as the audit log records it."""

    user_id: str
    failures: int
    locked_until: datetime | None

    def to_json(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "failures": self.failures,
            "locked_until": _iso(self.locked_until) if self.locked_until else None,
        }


class LogonFailed(AuthenticationFailed):
    """Unknown user or wrong password; ``failure`` is what the audit log records."""

    def __init__(self, message: str, failure: LogonFailure) -> None:
        super().__init__(message)
        self.failure = failure


class UserLockedOut(LockedOut, LogonFailed):
    """The user is locked out: the password was not even checked, and the lock is not extended."""


class UserStore:
    """The users of one meter, in ``<folder>/users.json``. Holds no state between calls."""

    def __init__(self, folder: Path, policy: PasswordPolicy) -> None:
        self._folder = Path(folder)
        self._policy = policy

    @classmethod
    def open(cls, folder: Path, policy: PasswordPolicy) -> UserStore:
        """Open and check the store; a missing file means no users yet."""
        store = cls(folder, policy)
        if store._folder.exists() and not store._folder.is_dir():
            raise ConfigurationError(f"{store._folder}: the user store's folder is not a folder")
        store._read()
        return store

    @property
    def path(self) -> Path:
        return self._folder / FILE_NAME

    @property
    def policy(self) -> PasswordPolicy:
        return self._policy

    def users(self) -> list[UserInfo]:
        records = self._read()
        return [records[uid].info() for uid in sorted(records)]

    def get(self, user_id: str) -> UserInfo:
        return _require(self._read(), user_id).info()

    def count(self, role: Role | None = None) -> int:
        return sum(1 for r in self._read().values() if role is None or r.role == role)

    def create(
        self, user_id: str, role: Role, password: str, secrets: Mapping[str, str], now: datetime
    ) -> UserInfo:
        _check_user_id(user_id)
        role = _check_role(role)
        clean = _check_secrets(secrets)
        at = _second(_utc(now))
        self._policy.check(password, user_id)
        with self._locked():
            records = self._read()
            if user_id in records:
                raise InvalidInput(f"user '{user_id}' already exists")
            sealed = self._seal(user_id, role, password, clean)
            record = _Record(
                user_id, role, at, at, *sealed, failures=0, locked_until=None, last_logon=None
            )
            self._write({**records, user_id: record})
        return record.info()

    def authenticate(
        self, user_id: str, password: str, now: datetime
    ) -> tuple[UserInfo, dict[str, str]]:
        """Check the password and unseal the user's secrets; failures count towards a lockout."""
        at = _utc(now)
        _check_password_type(password)
        with self._locked():
            records = self._read()
            record, secrets = self._verify(records, user_id, password, at)
            record = replace(record, failures=0, locked_until=None, last_logon=_second(at))
            self._write({**records, user_id: record})
        return record.info(), secrets

    def change_password(
        self, user_id: str, old_password: str, new_password: str, now: datetime
    ) -> UserInfo:
        """The user's own change: the old password first (counted like a logon), then the new one."""
        at = _utc(now)
        _check_password_type(old_password)
        self._policy.check(new_password, user_id)
        if normalize(new_password) == normalize(old_password):
            raise InvalidInput("the new password must differ from the old one")
        with self._locked():
            records = self._read()
            record, secrets = self._verify(records, user_id, password=old_password, at=at)
            sealed = self._seal(user_id, record.role, new_password, secrets)
            record = _Record(
                user_id,
                record.role,
                record.created,
                _second(at),
                *sealed,
                failures=0,
                locked_until=None,
                last_logon=_second(at),
            )
            self._write({**records, user_id: record})
        return record.info()

    def set_password(
        self, user_id: str, new_password: str, secrets: Mapping[str, str], now: datetime
    ) -> UserInfo:
        """An Administrator's reset: seal ``secrets`` under a new password; clears any lockout."""
        return self._reseal(user_id, None, new_password, secrets, now)

    def modify(
        self, user_id: str, role: Role, password: str, secrets: Mapping[str, str], now: datetime
    ) -> UserInfo:
        """Give the user a new role; the slot is sealed again (its associated data names the role)."""
        return self._reseal(user_id, _check_role(role), password, secrets, now)

    def unlock(self, user_id: str, now: datetime) -> UserInfo:
        """An Administrator clears the user's failure count and lockout."""
        at = _second(_utc(now))
        with self._locked():
            records = self._read()
            record = replace(_require(records, user_id), failures=0, locked_until=None, modified=at)
            self._write({**records, user_id: record})
        return record.info()

    def delete(self, user_id: str) -> None:
        """Remove the user's record and with it the slot; no copy stays in the folder."""
        with self._locked():
            records = self._read()
            _require(records, user_id)
            self._write({uid: r for uid, r in records.items() if uid != user_id})

    # -- internals ---------------------------------------------------------------------------

    def _reseal(
        self,
        user_id: str,
        role: Role | None,
        password: str,
        secrets: Mapping[str, str],
        now: datetime,
    ) -> UserInfo:
        _check_user_id(user_id)
        clean = _check_secrets(secrets)
        at = _second(_utc(now))
        self._policy.check(password, user_id)
        with self._locked():
            records = self._read()
            old = _require(records, user_id)
            new_role = old.role if role is None else role
            sealed = self._seal(user_id, new_role, password, clean)
            record = _Record(
                user_id,
                new_role,
                old.created,
                at,
                *sealed,
                failures=0,  # the counted guesses were against the old password
                locked_until=None,
                last_logon=old.last_logon,
            )
            self._write({**records, user_id: record})
        return record.info()

    def _seal(
        self, user_id: str, role: Role, password: str, secrets: Mapping[str, str]
    ) -> tuple[bytes, int, bytes, bytes, bytes]:
        """Fresh salt and nonce: (salt, log2_n, verifier, nonce, ciphertext)."""
        salt = os.urandom(SALT_BYTES)
        log2_n = self._policy.scrypt_log2_n
        verifier, key = derive(password, salt, log2_n)
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = json.dumps(dict(secrets), sort_keys=True, separators=(",", ":")).encode()
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, _associated_data(user_id, role))
        return salt, log2_n, verifier, nonce, ciphertext

    def _verify(
        self, records: dict[str, _Record], user_id: str, password: str, at: datetime
    ) -> tuple[_Record, dict[str, str]]:
        """Called under the lock. Returns the record and its secrets, or records the failure and raises."""
        record = records.get(user_id) if _valid_user_id(user_id) else None
        if record is None:
            # Same work as a wrong password, so timing does not tell which it was.
            derive(password, os.urandom(SALT_BYTES), self._policy.scrypt_log2_n)
            raise LogonFailed(_failed_message(user_id), LogonFailure(_shown(user_id), 0, None))
        if record.locked_until is not None and at < record.locked_until:
            raise UserLockedOut(
                f"user '{user_id}' is locked out until {_iso(record.locked_until)} after "
                f"{record.failures} failed logons; try again then, or ask an Administrator "
                "to unlock the user",
                LogonFailure(user_id, record.failures, record.locked_until),
            )
        verifier, key = derive(password, record.salt, record.log2_n)
        if not hmac.compare_digest(verifier, record.verifier):
            failures = record.failures + 1
            delay = lockout_delay(failures)
            locked_until = _ceil_second(at + delay) if delay else None
            failed = replace(record, failures=failures, locked_until=locked_until)
            self._write({**records, user_id: failed})  # durable before the caller hears of it
            raise LogonFailed(
                _failed_message(user_id), LogonFailure(user_id, failures, locked_until)
            )
        return record, self._unseal(record, key)

    def _unseal(self, record: _Record, key: bytes) -> dict[str, str]:
        damaged = ConfigurationError(
            f"{self.path}: slot of user '{record.user_id}' is damaged (it does not open under "
            "the key of the matching password, or was moved from another user or role); an "
            "Administrator must set the user's password again"
        )
        try:
            plaintext = AESGCM(key).decrypt(
                record.nonce, record.ciphertext, _associated_data(record.user_id, record.role)
            )
            secrets = json.loads(plaintext)
        except (InvalidTag, ValueError) as exc:
            raise damaged from exc
        if not isinstance(secrets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
        ):
            raise damaged
        return secrets

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive flock on users.lock around a read-modify-write."""
        try:
            self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigurationError(
                f"{self._folder / LOCK_NAME}: cannot open the user store's lock: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the flock

    def _read(self) -> dict[str, _Record]:
        path = self.path
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot read the user store: {exc.strerror}") from exc
        if mode & 0o077:
            raise ConfigurationError(
                f"{path}: the user store is open to group or others (mode {mode & 0o777:o}); "
                "run chmod 600 on it"
            )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigurationError(
                f"{path}: the user store is not valid JSON ({exc}); restore it from a backup"
            ) from exc
        if not isinstance(data, dict) or set(data) != {"format", "users"}:
            raise ConfigurationError(
                f"{path}: the user store must be an object with exactly 'format' and 'users'"
            )
        if data["format"] != FORMAT:
            raise ConfigurationError(f"{path}: the user store's format is not {FORMAT!r}")
        users = data["users"]
        if not isinstance(users, dict):
            raise ConfigurationError(f"{path}: 'users' must be an object")
        return {uid: _parse_record(path, uid, obj) for uid, obj in users.items()}

    def _write(self, records: dict[str, _Record]) -> None:
        """Replace users.json atomically and durably; called under the lock."""
        path = self.path
        payload = {"format": FORMAT, "users": {u: records[u].to_json() for u in sorted(records)}}
        data = (json.dumps(payload, indent=2) + "\n").encode("utf-8")
        # A writer that crashed between its temporary file and the rename left it behind,
        # and it may hold a deleted user's slot: we hold the lock, so none is in use now.
        for stale in self._folder.glob(f".{FILE_NAME}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise ConfigurationError(
                f"{path}: cannot write the user store ({exc.strerror}); nothing was changed"
            ) from exc


def _associated_data(user_id: str, role: Role) -> bytes:
    return _AD_PREFIX + user_id.encode("ascii") + b"|" + role.value.encode("ascii")


def _check_user_id(user_id: str) -> None:
    # The offending value is not echoed: a password typed into the wrong field must not spread.
    if not _valid_user_id(user_id):
        raise InvalidInput(f"invalid user id: {_USER_ID_RULE}")


def _shown(user_id: str) -> str:
    return user_id if _valid_user_id(user_id) else "(invalid user id)"


def _failed_message(user_id: str) -> str:
    return f"logon failed for user '{_shown(user_id)}': unknown user or wrong password"


def _require(records: dict[str, _Record], user_id: str) -> _Record:
    _check_user_id(user_id)
    record = records.get(user_id)
    if record is None:
        raise InvalidInput(f"no user '{user_id}'")
    return record


def _check_role(role: Role) -> Role:
    try:
        role = Role(role)
    except ValueError:
        names = ", ".join(r.value for r in Role if r is not Role.NO_ROLE)
        raise InvalidInput(f"unknown role; the roles are {names}") from None
    if role is Role.NO_ROLE:
        raise InvalidInput(
            "role no-role cannot be given to a user: it is the role of a caller who has not "
            "logged on"
        )
    return role


def _check_secrets(secrets: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(secrets, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in secrets.items()
    ):
        raise InvalidInput("a slot's secrets must map non-empty names to strings")
    return dict(secrets)


def _check_password_type(password: object) -> None:
    if not isinstance(password, str):
        raise InvalidInput("password must be a string")


def _utc(now: datetime) -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise InvalidInput("the time passed to the user store must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


def _ceil_second(at: datetime) -> datetime:
    # A lock ends no earlier than the schedule says, even after rounding to the second.
    return _second(at) + timedelta(seconds=1) if at.microsecond else at
