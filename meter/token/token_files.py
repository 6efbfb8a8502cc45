"""Surviving a SoftHSM2 ``token.object`` cut short by a crash.

SoftHSM2 2.6.1 (file object store) rewrites ``<tokendir>/<uuid>/token.object``
in place on every C_Login (the token flags and the file's generation number
change): it ftruncates the file to 0 bytes, then writes it again. A SIGKILL
in between leaves an empty or short file, SoftHSM2 then drops the token
("no such token") and its keys with it. So this module keeps a verified copy
of each token's ``token.object`` outside SoftHSM2's token folder and puts it
back, atomically, when the live file is broken.

The copies live in ``copies/<token-folder-name>/token.object``: never inside
``tokendir``, where SoftHSM2 takes every sub-folder for a token and every
``*.object`` file in a token folder for an object.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meter.durable import sync_directory, write_atomically
from meter.errors import ConfigurationError, TokenError

__all__ = ["Restored", "check_token_object", "guard_token_files", "keep_verified_copy"]

TOKEN_OBJECT = "token.object"

# -- SoftHSM2's object file format ----------------------------------------
#
# From SoftHSM2 2.6.1 src/lib/object_store/ObjectFile.cpp (refresh(),
# writeAttributes()), File.cpp (readULong/readByteString/...) and
# data_mgr/ByteString.cpp: every number is an unsigned long stored as 8 bytes
# big-endian. A file is
#     generation                               ULONG
#     then, per attribute, in ascending type order (a std::map):
#     type (CKA_...)  kind  value              ULONG ULONG ...
# with value by kind: 1 boolean = 1 byte; 2 ulong = 8 bytes; 3 byte string =
# ULONG length + bytes; 4 attribute map = ULONG length + that many bytes;
# 5 mechanism set = ULONG count + count * 8 bytes.
# token.object holds the vendor attributes of OSAttributes.h: CKA_OS_TOKENLABEL
# (32 bytes), CKA_OS_TOKENSERIAL (16 bytes), CKA_OS_TOKENFLAGS (ulong),
# CKA_OS_SOPIN and CKA_OS_USERPIN (encrypted PIN blobs).
#
# SoftHSM2's own reader is lenient: an empty file is "invalid", but a file cut
# at an attribute boundary, or followed by up to 7 stray bytes, loads, without
# the attributes after the cut (a token whose user PIN "is not initialized").
# So the check here is stricter: the file must end exactly after an attribute,
# kinds must be known, types strictly ascending, lengths within the file, the
# label, serial, flags and SO PIN must be there, and the user PIN too when
# the stored flags say CKF_USER_PIN_INITIALIZED (SoftHSM2 writes the user PIN
# before it sets that flag, and clears the flag before removing the PIN, so
# every complete file obeys this, while a cut before the user PIN does not).

_ULONG = struct.Struct(">Q")
_BOOLEAN, _INTEGER, _BYTES, _ATTRIBUTE_MAP, _MECHANISM_SET = 1, 2, 3, 4, 5
_CKA_VENDOR_SOFTHSM = 0x80000000 + 0x5348
_LABEL, _SERIAL, _FLAGS, _SO_PIN, _USER_PIN = (_CKA_VENDOR_SOFTHSM + n for n in range(1, 6))
_CKF_USER_PIN_INITIALIZED = 0x00000008

# A process logging in right now shows an empty file for microseconds (the
# write happens at fclose): look again before calling a file broken.
_SETTLE_TRIES = 5
_SETTLE_PAUSE = 0.02


class _Broken(Exception):
    """What is wrong with one file, phrased to follow "is"/"was"."""


@dataclass(frozen=True)
class _TokenFile:
    raw: bytes
    label: bytes
    serial: bytes
    so_pin: bytes
    user_pin: bytes | None

    @property
    def identity(self) -> tuple[bytes, bytes, bytes, bytes | None]:
        """What a copy must preserve; generation and flags change at every login."""
        return (self.label, self.serial, self.so_pin, self.user_pin)


def _parse(data: bytes) -> _TokenFile:
    if not data:
        raise _Broken("empty (0 bytes)")
    size = len(data)

    def ulong(at: int, what: str) -> int:
        if at + 8 > size:
            raise _Broken(f"truncated: {what} at byte {at} is cut off ({size} bytes)")
        value: int = _ULONG.unpack_from(data, at)[0]
        return value

    ulong(0, "the generation number")
    at, previous = 8, -1
    values: dict[int, tuple[int, bytes]] = {}  # type -> (kind, value bytes)
    while at < size:
        attr = ulong(at, "an attribute type")
        kind = ulong(at + 8, f"the kind of attribute 0x{attr:x}")
        if attr <= previous:
            raise _Broken(f"malformed: attribute 0x{attr:x} at byte {at} is out of order")
        if kind == _BOOLEAN:
            at, length = at + 16, 1
        elif kind == _INTEGER:
            at, length = at + 16, 8
        elif kind in (_BYTES, _ATTRIBUTE_MAP):
            at, length = at + 24, ulong(at + 16, f"the length of attribute 0x{attr:x}")
        elif kind == _MECHANISM_SET:
            at, length = at + 24, 8 * ulong(at + 16, f"the count of attribute 0x{attr:x}")
        else:
            raise _Broken(f"malformed: attribute 0x{attr:x} at byte {at} has unknown kind {kind}")
        if at + length > size:
            raise _Broken(
                f"truncated: attribute 0x{attr:x} needs {length} bytes at byte {at} ({size} bytes)"
            )
        values[attr] = (kind, data[at : at + length])
        at, previous = at + length, attr

    def get(attr: int, kind: int, name: str, length: int | None = None) -> bytes:
        found = values.get(attr)
        if found is None:
            raise _Broken(f"truncated or malformed: it has no {name}")
        if found[0] != kind or (length is not None and len(found[1]) != length):
            raise _Broken(f"malformed: its {name} has the wrong kind or length")
        return found[1]

    label = get(_LABEL, _BYTES, "token label", 32)
    serial = get(_SERIAL, _BYTES, "token serial", 16)
    (flags,) = _ULONG.unpack(get(_FLAGS, _INTEGER, "token flags"))
    so_pin = get(_SO_PIN, _BYTES, "SO PIN")
    user_pin = None
    if _USER_PIN in values or flags & _CKF_USER_PIN_INITIALIZED:
        user_pin = get(_USER_PIN, _BYTES, "user PIN (its flags say it has one)")
    return _TokenFile(data, label, serial, so_pin, user_pin)


def _read(path: Path) -> _TokenFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Broken("missing") from None
    except OSError as exc:
        raise _Broken(f"unreadable: {exc.strerror or exc}") from exc
    return _parse(data)


def _read_settled(path: Path) -> _TokenFile:
    for attempt in range(_SETTLE_TRIES):
        try:
            return _read(path)
        except _Broken:
            if attempt == _SETTLE_TRIES - 1:
                raise
            time.sleep(_SETTLE_PAUSE)
    raise AssertionError("unreachable")


def check_token_object(path: Path) -> None:
    """Raise TokenError naming ``path`` unless it is a complete SoftHSM2 token.object."""
    try:
        _read(path)
    except _Broken as broken:
        raise TokenError(f"{path} is {broken}") from None


# -- guarding and keeping copies ------------------------------------------


@dataclass(frozen=True)
class Restored:
    """One token.object put back from its verified copy: audit it."""

    token_dir: Path
    label: str
    reason: str


def _token_folders(tokens: Path) -> list[Path]:
    """Every sub-folder of SoftHSM2's tokendir: SoftHSM2 takes each one for a token."""
    try:
        return sorted(p for p in tokens.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenError(f"token folder {tokens} is unreadable: {exc.strerror or exc}") from exc


def _copy_path(copies: Path, folder: Path) -> Path:
    return copies / folder.name / TOKEN_OBJECT


def _require_apart(tokens: Path, copies: Path) -> None:
    t, c = tokens.resolve(), copies.resolve()
    if c == t or t in c.parents:
        raise ConfigurationError(
            f"token copies folder {copies} must not be inside SoftHSM2's token folder {tokens}: "
            "SoftHSM2 would take it for a token"
        )


def guard_token_files(tokens: Path, copies: Path, locks: Path | None = None) -> list[Restored]:
    """Check every token's token.object under ``tokens``; put back broken ones from ``copies``.

    Call this BEFORE the PKCS#11 module is initialized (C_Initialize, i.e.
    :func:`meter.token.load_module`) in this process: SoftHSM2 reads each
    token.object once, at initialization, and a token it found broken stays
    gone for the life of the process even after the file is restored.

    ``tokens`` is SoftHSM2's ``directories.tokendir``. A token.object that is
    empty, truncated, malformed, unreadable, or missing from a folder that
    has copies or object files, is replaced (temporary file, fsync, rename,
    folder fsync, mode 0600) by its verified copy, and reported in the list
    returned. Raises TokenError naming the file when it is broken and there
    is no good copy: the token's keys are lost until the file is restored.

    With ``locks`` (the folder of meter.token.Token's process locks), a token
    that another process holds open is left alone: its file looks empty while
    that process logs in and rewrites it, and only the holder may touch it.
    """
    _require_apart(tokens, copies)
    restored: list[Restored] = []
    for folder in _token_folders(tokens):
        live = folder / TOKEN_OBJECT
        try:
            _read_settled(live)
            continue
        except _Broken as broken:
            problem = str(broken)
        copy = _copy_path(copies, folder)
        if not live.exists():
            objects = sum(1 for _ in folder.glob("*.object"))
            if not objects and not copy.exists():
                continue  # a folder SoftHSM2 never finished making: it ignores it, so do we
            problem = f"missing (the folder holds {objects} object file(s))"
        try:
            good = _read(copy)
        except _Broken as broken:
            raise TokenError(
                f"{live} is {problem}, and its copy {copy} is {broken}: the token and its "
                "keys cannot be opened until token.object is restored from a backup"
            ) from None
        label = good.label.decode("utf-8", "replace").rstrip()
        with _unless_in_use(locks, label) as free:
            if not free:
                continue
            try:
                _read_settled(live)
                continue  # it was a login in progress, now finished
            except _Broken:
                pass
            try:
                write_atomically(live, good.raw, mode=0o600)
            except OSError as exc:
                raise TokenError(
                    f"{live} is {problem}; restoring it from {copy} failed: {exc.strerror or exc}"
                ) from exc
        restored.append(Restored(folder, label, f"{live} was {problem}; restored from {copy}"))
    return restored


@contextlib.contextmanager
def _unless_in_use(locks: Path | None, label: str) -> Iterator[bool]:
    """Hold the token's process lock (as meter.token.Token.open takes it) if it is free."""
    if locks is None:
        yield True
        return
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"token-{label}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # its holder opened it with a good file and may be rewriting it now
            return
        yield True
    finally:
        os.close(fd)


def keep_verified_copy(tokens: Path, copies: Path, label: str) -> bool:
    """Copy the live token.object of token ``label`` to ``copies``; True when written now.

    Call it once the token has been opened (so the live file is proven good),
    and while no other thread of this process is in the module (hold its
    lock). The copy is rewritten only when label, serial or PINs differ from
    it (its generation number and flags change at every login and do not
    matter), atomically, mode 0600 in a folder of mode 0700.
    """
    _require_apart(tokens, copies)
    wanted = label.encode().ljust(32, b" ")
    found: list[tuple[Path, _TokenFile]] = []
    for folder in _token_folders(tokens):
        try:
            live = _read_settled(folder / TOKEN_OBJECT)
        except _Broken:
            continue  # guard_token_files deals with it in the next process
        if live.label == wanted:
            found.append((folder, live))
    if len(found) != 1:
        how = "no" if not found else f"{len(found)}"
        raise TokenError(
            f"{how} token folder(s) under {tokens} hold a readable token.object labelled "
            f"'{label}': cannot keep a verified copy"
        )
    folder, live = found[0]
    copy = _copy_path(copies, folder)
    try:
        if _read(copy).identity == live.identity:
            return False
    except _Broken:
        pass  # missing or broken copy: write it
    try:
        for directory in (copies, copy.parent):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True)
                sync_directory(directory.parent)
            os.chmod(directory, 0o700)
        write_atomically(copy, live.raw, mode=0o600)
    except OSError as exc:
        raise TokenError(
            f"cannot keep a verified copy of {folder / TOKEN_OBJECT} at {copy}: "
            f"{exc.strerror or exc}"
        ) from exc
    return True
