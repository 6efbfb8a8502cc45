"""The host's password policy and the one memory-hard derivation behind every logon.

One scrypt call per logon yields 64 bytes: the first 32 are the verifier kept in
the user store, the last 32 the AES-256-GCM key that seals the user's PIN slot.
Knowing the verifier does not give the sealing key: they are independent halves
of one scrypt output.
"""

from __future__ import annotations

import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from meter.errors import ConfigurationError, InvalidInput

__all__ = [
    "CHARACTER_CLASSES",
    "MAX_LOG2_N",
    "MAX_PASSWORD_LENGTH",
    "MIN_LOG2_N",
    "SALT_BYTES",
    "SCRYPT_P",
    "SCRYPT_R",
    "PasswordPolicy",
    "derive",
    "normalize",
]

CHARACTER_CLASSES = ("lower-case", "upper-case", "digit", "symbol")
_ARTICLED = {
    "lower-case": "a lower-case letter",
    "upper-case": "an upper-case letter",
    "digit": "a digit",
    "symbol": "a symbol",
}
SCRYPT_R = 8
SCRYPT_P = 1
MIN_LOG2_N = 14  # 16 MiB with r = 8: the floor the security policy allows
MAX_LOG2_N = 20  # 1 GiB: beyond this a logon takes seconds and a policy file could starve the host
SALT_BYTES = 16
MAX_PASSWORD_LENGTH = 1024
_MIN_MIN_LENGTH = 8
_KEYS = {"min_length", "min_classes", "required", "scrypt_log2_n"}


def normalize(password: str) -> str:
    """NFKC, so the same password typed on different keyboards derives the same key."""
    return unicodedata.normalize("NFKC", password)


def derive(password: str, salt: bytes, log2_n: int) -> tuple[bytes, bytes]:
    """scrypt(NFKC UTF-8 password, salt, n = 2**log2_n, r = 8, p = 1) -> (verifier, sealing key)."""
    if not MIN_LOG2_N <= log2_n <= MAX_LOG2_N:
        raise InvalidInput(f"scrypt log2(n) must be {MIN_LOG2_N}..{MAX_LOG2_N}, not {log2_n}")
    if len(salt) != SALT_BYTES:
        raise InvalidInput(f"scrypt salt must be {SALT_BYTES} bytes, not {len(salt)}")
    kdf = Scrypt(salt=salt, length=64, n=2**log2_n, r=SCRYPT_R, p=SCRYPT_P)
    out = kdf.derive(normalize(password).encode("utf-8"))
    return out[:32], out[32:]


def _classes_of(password: str) -> set[str]:
    found: set[str] = set()
    for ch in password:
        if ch.islower():
            found.add("lower-case")
        elif ch.isupper():
            found.add("upper-case")
        elif ch.isdigit():
            found.add("digit")
        else:
            found.add("symbol")
    return found


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class PasswordPolicy:
    """What the host demands of a password, and how hard the KDF works."""

    min_length: int = 12
    min_classes: int = 3  # of: lower-case, upper-case, digit, symbol (anything else)
    required: frozenset[str] = frozenset()  # class names that must be present, e.g. {"digit"}
    scrypt_log2_n: int = 15  # n = 2**15, r = 8, p = 1 (32 MiB); never below 14

    def __post_init__(self) -> None:
        problem = _problem(self.min_length, self.min_classes, self.required, self.scrypt_log2_n)
        if problem:
            raise ConfigurationError(f"password policy: {problem}")

    @classmethod
    def load(cls, path: Path | None) -> PasswordPolicy:
        """Read the [password] table of the host policy TOML; no file (or None) means defaults."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"{path}: cannot read the host policy: {exc}") from exc
        table = data.get("password", {})
        if not isinstance(table, dict):
            raise ConfigurationError(f"{path}: [password] must be a table")
        unknown = set(table) - _KEYS
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ConfigurationError(f"{path}: unknown key(s) in [password]: {names}")
        defaults = cls()
        min_length = _int(table, "min_length", defaults.min_length, path)
        min_classes = _int(table, "min_classes", defaults.min_classes, path)
        log2_n = _int(table, "scrypt_log2_n", defaults.scrypt_log2_n, path)
        raw = table.get("required", [])
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigurationError(f"{path}: [password] required must be a list of strings")
        required = frozenset(raw)
        problem = _problem(min_length, min_classes, required, log2_n)
        if problem:
            raise ConfigurationError(f"{path}: [password] {problem}")
        return cls(min_length, min_classes, required, log2_n)

    def check(self, password: str, user_id: str) -> None:
        """Raise InvalidInput naming everything the password lacks; the message never quotes it."""
        if not isinstance(password, str):
            raise InvalidInput("password must be a string")
        text = normalize(password)
        problems: list[str] = []
        if len(text) < self.min_length:
            problems.append(
                f"it has {len(text)} characters, at least {self.min_length} are required"
            )
        elif len(text) > MAX_PASSWORD_LENGTH:
            problems.append(
                f"it has {len(text)} characters, at most {MAX_PASSWORD_LENGTH} are allowed"
            )
        present = _classes_of(text)
        absent = [c for c in CHARACTER_CLASSES if c not in present]
        missing_required = [c for c in CHARACTER_CLASSES if c in self.required - present]
        if len(present) < self.min_classes:
            rule = f"{self.min_classes} of {', '.join(CHARACTER_CLASSES)} are required"
            if missing_required:
                rule += f", and the host always requires {_and_list(missing_required)}"
            lacks = _and_list([_ARTICLED[c] for c in absent])
            problems.append(f"it lacks {lacks} ({rule})")
        elif missing_required:
            lacks = _and_list([_ARTICLED[c] for c in missing_required])
            problems.append(f"it lacks {lacks}, which the host requires")
        if user_id and user_id.casefold() in text.casefold():
            problems.append("it contains the user id")
        if problems:
            raise InvalidInput("password does not meet the host's policy: " + "; ".join(problems))


def _int(table: dict[str, Any], key: str, default: int, path: Path) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{path}: [password] {key} must be an integer")
    return value


def _problem(min_length: int, min_classes: int, required: frozenset[str], log2_n: int) -> str:
    """The first thing wrong with a policy's values, or "" when it is sound."""
    if not _MIN_MIN_LENGTH <= min_length <= MAX_PASSWORD_LENGTH:
        return f"min_length must be {_MIN_MIN_LENGTH}..{MAX_PASSWORD_LENGTH}, not {min_length}"
    if not 1 <= min_classes <= len(CHARACTER_CLASSES):
        return f"min_classes must be 1..{len(CHARACTER_CLASSES)}, not {min_classes}"
    unknown = sorted(set(required) - set(CHARACTER_CLASSES))
    if unknown:
        return (
            f"required names unknown class(es) {', '.join(unknown)}; "
            f"the classes are {', '.join(CHARACTER_CLASSES)}"
        )
    if not MIN_LOG2_N <= log2_n <= MAX_LOG2_N:
        return f"scrypt_log2_n must be {MIN_LOG2_N}..{MAX_LOG2_N}, not {log2_n}"
    return ""
