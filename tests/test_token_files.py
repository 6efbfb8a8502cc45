"""SoftHSM2 token.object crash recovery: verified copies, restore before C_Initialize, a real SIGKILL.

SoftHSM2 reads token.object once, at C_Initialize, and this process has the
module loaded already: every "does the token open now" check runs in a child
process, which initializes SoftHSM2 afresh from the files.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meter.errors import AuthenticationFailed, ConfigurationError, TokenError
from meter.token import (
    KeyAlgorithm,
    Restored,
    Token,
    check_token_object,
    ensure_token,
    guard_token_files,
    keep_verified_copy,
    load_module,
    load_profile,
    softhsm_env,
    token_copies_dir,
    token_dir,
)

pytestmark = pytest.mark.softhsm

LABEL = "guarded"
KEY = "signing"
MESSAGE = b"postage after a crash"
PIN_VARIABLE = "TEST_TOKEN_FILES_PIN"  # the child's PIN comes from its environment, never argv

# Opens the token in a fresh process; prints its object count, public key and a signature.
_OPEN_CHILD = """
import json, os, sys
from pathlib import Path
from meter.token import KeyAlgorithm, Token, load_module, load_profile, softhsm_env
home, label, key, message = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].encode()
profile = load_profile()
module = load_module(profile.module, softhsm_env(profile, home))
with Token.open(module, label, os.environ[sys.argv[5]], lock_dir=home / "locks") as token:
    with token._call("count objects") as session:
        objects = sum(1 for _ in session.get_objects())
    print(json.dumps({
        "objects": objects,
        "spki": token.public_key_spki(key).hex(),
        "signature": token.sign(key, KeyAlgorithm.ECDSA_P256, message).hex(),
    }))
"""

# Logs in and out of the token as fast as it can, until killed.
_LOGIN_LOOP_CHILD = """
import os, sys
from pathlib import Path
from meter.token import Token, load_module, load_profile, softhsm_env
home, label = Path(sys.argv[1]), sys.argv[2]
profile = load_profile()
module = load_module(profile.module, softhsm_env(profile, home))
pin = os.environ[sys.argv[3]]
Token.open(module, label, pin, lock_dir=home / "locks").close()
print("ready", flush=True)
while True:
    Token.open(module, label, pin, lock_dir=home / "locks").close()
"""


@dataclass(frozen=True)
class Guarded:
    """A home with one SoftHSM2 token holding an ECDSA key pair."""

    home: Path
    pin: str
    folder: Path
    spki: bytes

    @property
    def tokens(self) -> Path:
        return token_dir(self.home)

    @property
    def copies(self) -> Path:
        return token_copies_dir(self.home)

    @property
    def live(self) -> Path:
        return self.folder / "token.object"

    @property
    def copy(self) -> Path:
        return self.copies / self.folder.name / "token.object"

    def child_env(self) -> dict[str, str]:
        return {**os.environ, PIN_VARIABLE: self.pin}


@pytest.fixture
def guarded(softhsm: None, tmp_path: Path) -> Guarded:
    profile = load_profile()
    home = tmp_path / "home"
    home.mkdir()
    pin = secrets.token_urlsafe(12)  # throwaway test PINs, never written down
    assert ensure_token(profile, home, LABEL, secrets.token_urlsafe(12), pin)
    module = load_module(profile.module, softhsm_env(profile, home))
    with Token.open(module, LABEL, pin, lock_dir=home / "locks") as token:
        spki = token.generate_signing_keypair(KEY, KeyAlgorithm.ECDSA_P256)
    (folder,) = [p for p in token_dir(home).iterdir() if p.is_dir()]
    return Guarded(home, pin, folder, spki)


def open_in_child(g: Guarded) -> int:
    """Open the token in a fresh process, check its key signs; return its object count."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _OPEN_CHILD,
            str(g.home),
            LABEL,
            KEY,
            MESSAGE.decode(),
            PIN_VARIABLE,
        ],
        env=g.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert bytes.fromhex(out["spki"]) == g.spki
    raw = bytes.fromhex(out["signature"])
    public = serialization.load_der_public_key(g.spki)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, MESSAGE, ec.ECDSA(hashes.SHA256()))  # raises unless the key signed it
    objects: int = out["objects"]
    return objects


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


# -- copies -------------------------------------------------------------------------


def test_ensure_token_keeps_a_private_copy_that_softhsm_does_not_load(guarded: Guarded) -> None:
    g = guarded
    assert g.copy.is_file()
    assert stat.S_IMODE(g.copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(g.copy.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(g.copies.stat().st_mode) == 0o700
    assert g.tokens.resolve() not in g.copy.resolve().parents
    check_token_object(g.copy)
    # Same token (label, serial, PINs) as the live file; only the generation number moved on.
    assert g.copy.read_bytes()[8:] == g.live.read_bytes()[8:]
    assert g.copy.read_bytes()[:8] != g.live.read_bytes()[:8]
    assert open_in_child(g) == 2  # the key pair, and no object made from the copy
    assert open_in_child(g) == 2


def test_logins_do_not_rewrite_the_copy_but_a_stale_copy_is_refreshed(guarded: Guarded) -> None:
    g = guarded
    before = snapshot(g.copy)
    open_in_child(g)  # a login rewrites the live file
    assert g.live.read_bytes()[:8] != before[0][:8]
    assert keep_verified_copy(g.tokens, g.copies, LABEL) is False
    assert snapshot(g.copy) == before

    stale = bytearray(before[0])
    serial_at = stale.index(b"\x00\x00\x00\x00\x80\x00\x53\x4a") + 24  # CKA_OS_TOKENSERIAL's value
    stale[serial_at : serial_at + 16] = b"0" * 16
    g.copy.write_bytes(bytes(stale))
    check_token_object(g.copy)  # still well-formed, but another token's
    assert keep_verified_copy(g.tokens, g.copies, LABEL) is True
    assert g.copy.read_bytes() == g.live.read_bytes()
    assert stat.S_IMODE(g.copy.stat().st_mode) == 0o600


def test_keeping_a_copy_of_an_unknown_label_fails(guarded: Guarded) -> None:
    with pytest.raises(TokenError, match="labelled 'no-such-token'"):
        keep_verified_copy(guarded.tokens, guarded.copies, "no-such-token")


def test_copies_inside_the_token_folder_are_refused(guarded: Guarded) -> None:
    with pytest.raises(ConfigurationError, match="must not be inside SoftHSM2's token folder"):
        guard_token_files(guarded.tokens, guarded.tokens / "copies")
    with pytest.raises(ConfigurationError, match="must not be inside SoftHSM2's token folder"):
        keep_verified_copy(guarded.tokens, guarded.folder, LABEL)


# -- the structural check -------------------------------------------------------------


def test_check_accepts_real_files_and_rejects_every_cut_and_stray_tail(
    guarded: Guarded, tmp_path: Path
) -> None:
    g = guarded
    profile = load_profile()
    module = load_module(profile.module, softhsm_env(profile, g.home))
    with pytest.raises(AuthenticationFailed):
        Token.open(module, LABEL, "wrong-pin", lock_dir=g.home / "locks")
    after_failure = g.live.read_bytes()
    assert after_failure[8:] != g.copy.read_bytes()[8:]  # CKF_USER_PIN_COUNT_LOW is set now
    check_token_object(g.live)
    open_in_child(g)  # a good login clears the flag again
    good = g.live.read_bytes()
    check_token_object(g.live)

    probe = tmp_path / "token.object"
    for cut in range(len(good)):
        probe.write_bytes(good[:cut])
        with pytest.raises(TokenError, match=re.escape(str(probe))):
            check_token_object(probe)
    for tail in range(1, 9):  # SoftHSM2 itself ignores up to 7 stray bytes
        probe.write_bytes(good + b"\x00" * tail)
        with pytest.raises(TokenError):
            check_token_object(probe)
    rng = random.Random(20261122)
    for _ in range(200):
        probe.write_bytes(rng.randbytes(len(good)))
        with pytest.raises(TokenError):
            check_token_object(probe)


# -- guarding -------------------------------------------------------------------------


def test_a_healthy_token_object_is_left_untouched(guarded: Guarded) -> None:
    g = guarded
    live, copy = snapshot(g.live), snapshot(g.copy)
    assert guard_token_files(g.tokens, g.copies) == []
    assert snapshot(g.live) == live
    assert snapshot(g.copy) == copy


def _empty(good: bytes) -> bytes:
    return b""


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _garbage(good: bytes) -> bytes:
    return random.Random(7).randbytes(len(good))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_empty, "was empty (0 bytes)"), (_truncated, "was truncated"), (_garbage, "was malformed")],
)
def test_a_broken_token_object_is_restored_and_the_token_opens_with_its_keys(
    guarded: Guarded, damage: Callable[[bytes], bytes], reason: str
) -> None:
    g = guarded
    g.live.write_bytes(damage(g.live.read_bytes()))
    with pytest.raises(TokenError):
        check_token_object(g.live)

    restored = guard_token_files(g.tokens, g.copies)

    assert [(r.token_dir, r.label) for r in restored] == [(g.folder, LABEL)]
    assert isinstance(restored[0], Restored)
    assert str(g.live) in restored[0].reason and reason in restored[0].reason
    assert g.live.read_bytes() == g.copy.read_bytes()
    assert stat.S_IMODE(g.live.stat().st_mode) == 0o600
    assert open_in_child(g) == 2
    assert guard_token_files(g.tokens, g.copies) == []


def test_a_missing_token_object_beside_objects_is_restored(guarded: Guarded) -> None:
    g = guarded
    g.live.unlink()
    restored = guard_token_files(g.tokens, g.copies)
    assert len(restored) == 1 and "was missing (the folder holds 2 object file(s))" in (
        restored[0].reason
    )
    assert open_in_child(g) == 2


def test_a_broken_token_object_without_a_copy_is_an_error_naming_the_file(
    guarded: Guarded,
) -> None:
    g = guarded
    g.copy.unlink()
    g.live.write_bytes(b"")
    with pytest.raises(TokenError, match=re.escape(f"{g.live} is empty (0 bytes)")) as caught:
        guard_token_files(g.tokens, g.copies)
    assert f"{g.copy} is missing" in str(caught.value)
    assert g.live.read_bytes() == b""  # nothing made up


def test_a_broken_copy_is_never_restored(guarded: Guarded) -> None:
    g = guarded
    g.copy.write_bytes(g.copy.read_bytes()[:-1])
    g.live.write_bytes(b"")
    with pytest.raises(TokenError, match=re.escape(f"its copy {g.copy} is truncated")):
        guard_token_files(g.tokens, g.copies)
    assert g.live.read_bytes() == b""


# -- a real crash -----------------------------------------------------------------------


def test_sigkill_during_login_loses_no_token(guarded: Guarded) -> None:
    """A child logs in in a loop; kill it the moment token.object is 0 bytes (SoftHSM2 between
    its ftruncate and its write), else at random once the time is up; then guard and open."""
    g = guarded
    deadline = time.monotonic() + 15
    caught = False
    while not caught:
        child = subprocess.Popen(
            [sys.executable, "-c", _LOGIN_LOOP_CHILD, str(g.home), LABEL, PIN_VARIABLE],
            env=g.child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            fd = os.open(g.live, os.O_RDONLY)  # SoftHSM2 rewrites this very inode in place
            try:
                killed = False
                while not killed and time.monotonic() < deadline:
                    for _ in range(10_000):
                        if os.fstat(fd).st_size == 0:
                            os.kill(child.pid, signal.SIGKILL)
                            killed = True
                            break
                if not killed:
                    time.sleep(random.uniform(0, 0.05))
                    os.kill(child.pid, signal.SIGKILL)
            finally:
                os.close(fd)
        finally:
            child.kill()
            child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
        caught = g.live.stat().st_size == 0
        if time.monotonic() >= deadline:
            break

    try:
        check_token_object(g.live)
        broken = False
    except TokenError:
        broken = True
    assert broken or not caught  # a 0-byte file is broken
    restored = guard_token_files(g.tokens, g.copies)
    assert len(restored) == int(broken)
    if caught:
        assert "was empty (0 bytes)" in restored[0].reason
    assert open_in_child(g) == 2


def test_a_token_another_process_holds_is_left_to_its_holder(guarded: Guarded) -> None:
    # While a process holds the token (the device: it logs in and rewrites the file),
    # an empty token.object may be a login in progress: nobody else touches it.
    guarded.live.write_bytes(b"")
    locks = guarded.home / "locks"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(locks / f"token-{LABEL}.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert guard_token_files(token_dir(guarded.home), guarded.copies, locks) == []
        assert guarded.live.read_bytes() == b""
    finally:
        holder.communicate("")
    # Released: the next guard puts it back.
    (entry,) = guard_token_files(token_dir(guarded.home), guarded.copies, locks)
    assert entry.label == LABEL and "was empty" in entry.reason
    assert open_in_child(guarded) >= 2
