"""Processes for tests/test_logon_kills.py: open the meter token as the device does, then log
out and in again until SIGKILL.

Run as ``python tests/_logon_child.py HOME PROFILE`` with the meter token's user PIN in
``$TEST_LOGON_KILLS_PIN`` (never in argv). It is a fork server, so that a hundred fresh
processes cost no hundred interpreter starts: it imports the meter once and never loads the
PKCS#11 module itself; for each line ``go`` on stdin it forks a child, which initializes
SoftHSM2 for the first time in its life and so reads the token files afresh, as the device
process does when it starts. JSON lines on stdout:

- ``{"child": PID}`` when forked;
- from the child, ``{"ok": PID, "restored": [...], "registers": {...}, ...}`` once it ran the
  guard (``Home.open_device_token(restored)``: ``Home.module(restored)`` first), logged in with
  the PIN, opened the meter's records (identity, registers under their MAC, state,
  certificates) and signed a message that verifies with the certified public key; or
  ``{"failed": PID, "error": "..."}``;
- ``{"exited": PID, "status": N}`` once the child is gone (N < 0: killed by signal -N).

After its ok line the child logs out and in again in a tight loop: every login makes SoftHSM2
rewrite the token's token.object (truncate, then write), which is the window the test aims at.
The server and its children die with their parent (PR_SET_PDEATHSIG): a runner killed mid-test
leaves no process logging in.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives import serialization

from meter.cli.home import Home
from meter.indicium.codec import Algorithm
from meter.indicium.signature import verify_signature
from meter.psd import Meter
from meter.psd.device import SIGNING_KEY_LABEL
from meter.token import Restored

PIN_VARIABLE = "TEST_LOGON_KILLS_PIN"


def _say(record: dict[str, Any]) -> None:
    # One write(2) per line, shorter than PIPE_BUF: lines of the server and of its children
    # never interleave.
    line = (json.dumps(record) + "\n").encode()
    assert len(line) < 4096, "a report line must fit one atomic pipe write"
    os.write(1, line)


def _die_with_parent() -> None:
    """SIGKILL this process when its parent ends: a test runner killed mid-test leaves no
    child logging in forever (Linux prctl PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the prctl
        os._exit(1)


def _plain(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


def _child(home: Home, pin: str) -> NoReturn:
    restored: list[Restored] = []
    token = home.open_device_token(restored)  # the guard runs before C_Initialize
    token.login(pin)
    meter = Meter.open(token)  # identity, registers (MAC checked in the token), certificates
    registers = meter.registers
    registers.check()
    if meter.certificates is None:
        raise RuntimeError("the meter has no certificate chain")
    certified = meter.certificates.meter.public_key()
    certified_spki = certified.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if certified_spki != meter.public_key_spki:
        raise RuntimeError("the token's signing key is not the certified one")
    message = f"logon-kill child {os.getpid()}".encode()
    algorithm = meter.identity.algorithm
    signature = token.sign(SIGNING_KEY_LABEL, algorithm, message)
    verify_signature(Algorithm[algorithm.name], certified, message, signature)  # raises if not
    _say(
        {
            "ok": os.getpid(),
            "restored": [{"label": r.label, "reason": r.reason} for r in restored],
            "registers": {k: _plain(v) for k, v in asdict(registers).items()},
            "identity": {k: _plain(v) for k, v in asdict(meter.identity).items()},
            "spki": meter.public_key_spki.hex(),
            "signature_verified": True,
        }
    )
    while True:
        token.logout()
        token.login(pin)


def main() -> None:
    _die_with_parent()
    home = Home.at(Path(sys.argv[1]), Path(sys.argv[2]))
    pin = os.environ[PIN_VARIABLE]
    for line in sys.stdin:
        if line.strip() != "go":
            raise SystemExit(f"unknown command {line!r}")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _die_with_parent()
                _child(home, pin)
            except BaseException as exc:
                _say({"failed": os.getpid(), "error": f"{exc!r}\n{traceback.format_exc()}"[-2000:]})
            os._exit(1)
        _say({"child": pid})
        _, status = os.waitpid(pid, 0)
        _say({"exited": pid, "status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
