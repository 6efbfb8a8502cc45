"""SIGKILL during logons, over and over: every token reopens with its keys and registers.

SoftHSM2 2.6.1 rewrites a token's token.object on every C_Login (truncate, then write at
fclose); a SIGKILL in between leaves it empty or short, and the token would be gone.
meter/token/token_files.py puts such a file back from its verified copy before the module is
initialized in a process (``Home.module()``). Here:

1. at the token level, a hundred and more processes (tests/_logon_child.py, forked from one
   server so that each costs no interpreter start) each run the guard as the device does, log in
   with the lab PIN, prove the keys and registers are there and log in again in a loop, and die
   by SIGKILL at random moments, many of them aimed at the moment token.object is 0 bytes;
2. the real device: started over an emptied meter token.object, and killed during its first
   logon (the one that logs in to the token), it comes up with the same registers and audits
   each restore;
3. the provider's and postal root's tokens: emptied, they come back in a fresh process that
   opens them with ``Home.open_token`` (and without the guard they are gone).

SoftHSM2 reads token files once, at C_Initialize, and this process has the module loaded
already: every "does the token open now" check runs in a fresh child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.errors import MeterError, TokenError
from meter.host import DeviceClient
from meter.psd import Meter
from meter.token import check_token_object, token_copies_dir, token_dir
from tests._logon_child import PIN_VARIABLE
from tests.conftest import ROLE_USERS, TEST_METER_PINS, open_meter_token

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

CHILD = Path(__file__).with_name("_logon_child.py")
KILLS = 120  # at least 100 kills, each followed by a child that must reopen the token
MAX_KILLS = 400  # kills go on past KILLS until one has left a broken token.object, up to this
EARLY_SHARE = 0.15  # killed before its report: in the guard, C_Initialize, the first login, ...
EARLY_MAX_S = 0.08
AIMED_SHARE = 0.7  # of the rest: killed the moment token.object is seen at 0 bytes
AIM_POLLS = 20_000  # fstat calls an aimed kill waits for the empty file before it kills anyway
RANDOM_MAX_S = 0.01  # random kills: within this while the child logs in and out
DEVICE_KILLS = 5
LOGON_KILL_MAX_S = 0.2  # a logon takes ~0.2 s (scrypt, unseal, C_Login)
REPLY_TIMEOUT_S = 60.0


def token_folder(home: Home, party: str) -> Path:
    """The SoftHSM2 folder of a party's token (its token.object holds the padded label)."""
    wanted = home.token_label(party).encode().ljust(32, b" ")
    found = [
        folder
        for folder in token_dir(home.path).iterdir()
        if folder.is_dir() and wanted in (folder / "token.object").read_bytes()
    ]
    assert len(found) == 1, f"token folders labelled {party}: {found}"
    return found[0]


def file_state(path: Path) -> str:
    """ "whole", or how a kill left it: "empty" (0 bytes) or "short" (cut or malformed)."""
    try:
        check_token_object(path)
    except TokenError:
        return "empty" if path.stat().st_size == 0 else "short"
    return "whole"


REASONS = {"empty": "was empty (0 bytes)", "short": "was truncated"}


def plain(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


# -- 1. the token level: kill after kill -----------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What every child must find: the meter as it was before the first kill."""

    registers: dict[str, object]
    identity: dict[str, object]
    spki: str


def expected_meter(home: Home) -> Expected:
    with open_meter_token(home) as token:
        meter = Meter.open(token)
        assert meter.certificates is not None
        registers, identity = meter.registers, meter.identity
        spki = meter.public_key_spki
    registers.check()
    assert registers.control_total > 0, "the meter was to have credit"
    return Expected(
        {k: plain(v) for k, v in asdict(registers).items()},
        {k: plain(v) for k, v in asdict(identity).items()},
        spki.hex(),
    )


class LogonChildren:
    """tests/_logon_child.py: forks, on request, a child that opens the meter token and then
    logs in and out until killed; reports come back as JSON lines."""

    def __init__(self, home: Home) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), str(home.path), str(home.profile.source)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, PIN_VARIABLE: TEST_METER_PINS["user_pin"]},
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.current: int | None = None  # the child forked last
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self) -> dict[str, Any]:
        try:
            record = self.lines.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"no report from tests/_logon_child.py in {REPLY_TIMEOUT_S} s")
        assert record is not None, "tests/_logon_child.py ended early"
        return record

    def fork(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()
        record = self.next()
        pid: int = record["child"]
        self.current = pid
        return pid

    def report(self, pid: int) -> dict[str, Any]:
        """The child's ok line; a failure report fails the test with the child's error."""
        record = self.next()
        assert record.get("failed") != pid, f"child {pid} could not open the token:\n{record}"
        assert record.get("ok") == pid, record
        return record

    def reap(self, pid: int) -> dict[str, Any] | None:
        """Wait for the killed child's end; its ok line if it printed one before dying."""
        ok = None
        while "exited" not in (record := self.next()):
            assert record.get("failed") != pid, f"child {pid} could not open the token:\n{record}"
            assert record.get("ok") == pid, record
            ok = record
        assert record["exited"] == pid
        assert record["status"] == -signal.SIGKILL, f"child {pid} ended with {record['status']}"
        self.current = None
        return ok

    def close(self) -> None:
        """End the server (it exits at the end of its input) once its last child is reaped."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0

    def __enter__(self) -> LogonChildren:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is not None:
            return
        # A failed test leaves a child logging in: kill it, then its server.
        if self.current is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.current, signal.SIGKILL)
        self.process.kill()
        self.process.wait(timeout=30)


def kill_aimed(pid: int, live: Path) -> bool:
    """SIGKILL ``pid`` once token.object is seen at 0 bytes (SoftHSM2 between its truncate and
    its write), or after AIM_POLLS looks anyway; True if it was seen empty."""
    fd = os.open(live, os.O_RDONLY)  # SoftHSM2 rewrites this very inode in place
    try:
        for _ in range(AIM_POLLS):
            if os.fstat(fd).st_size == 0:
                os.kill(pid, signal.SIGKILL)
                return True
        os.kill(pid, signal.SIGKILL)
        return False
    finally:
        os.close(fd)


def check_child(ok: dict[str, Any], expected: Expected, live: Path, left: str) -> int:
    """The child found the keys and the exact registers, and restored the file iff the last
    kill left it broken; the number of restores it reported."""
    assert ok["signature_verified"] is True
    assert ok["spki"] == expected.spki, "the signing key changed"
    assert ok["identity"] == expected.identity
    assert ok["registers"] == expected.registers, "the registers changed"
    if left == "whole":
        assert ok["restored"] == [], f"restored a whole token.object: {ok['restored']}"
        return 0
    [restored] = ok["restored"]  # the meter's, and no other token's
    assert restored["label"] == "meter"
    assert f"{live} {REASONS[left]}" in restored["reason"], restored["reason"]
    return 1


def test_a_hundred_kills_during_logons_never_lose_the_meter_token(device_home: Home) -> None:
    home = device_home
    expected = expected_meter(home)
    live = token_folder(home, "meter") / "token.object"
    copy = token_copies_dir(home.path) / live.parent.name / "token.object"
    copied = copy.read_bytes()
    check_token_object(copy)
    rng = random.Random()
    left_after: Counter[str] = Counter()  # how each kill left token.object
    modes: Counter[str] = Counter()
    seen_empty = restores = reports = 0
    left = "whole"
    kills = 0
    with LogonChildren(home) as children:
        while kills < KILLS or (restores == 0 and kills < MAX_KILLS):
            pid = children.fork()
            ok = None
            if rng.random() < EARLY_SHARE:
                modes["early"] += 1
                time.sleep(rng.uniform(0, EARLY_MAX_S))
                os.kill(pid, signal.SIGKILL)
            else:
                ok = children.report(pid)
                if rng.random() < AIMED_SHARE:
                    modes["aimed"] += 1
                    seen_empty += kill_aimed(pid, live)
                else:
                    modes["random"] += 1
                    time.sleep(rng.uniform(0, RANDOM_MAX_S))
                    os.kill(pid, signal.SIGKILL)
            ok = children.reap(pid) or ok
            kills += 1
            if ok is not None:  # an early kill may come before the report
                reports += 1
                restores += check_child(ok, expected, live, left)
            left = file_state(live)
            left_after[left] += 1

        pid = children.fork()  # after the last kill, one more must open the token
        restores += check_child(children.report(pid), expected, live, left)
        reports += 1
        os.kill(pid, signal.SIGKILL)
        children.reap(pid)
        children.close()

    summary = (
        f"{kills} kills ({dict(modes)}); token.object left {dict(left_after)}; "
        f"seen at 0 bytes by {seen_empty} aimed kills; {restores} restores reported"
    )
    print(summary)
    assert kills >= 100
    assert reports >= kills - modes["early"] + 1
    assert restores >= 1, f"no kill hit the window in which token.object is broken: {summary}"
    assert left_after["empty"] + left_after["short"] >= restores
    assert copy.read_bytes() == copied, "the verified copy changed"


# -- 2. the device ---------------------------------------------------------------------------

REGISTER_FIELDS = ("ascending", "descending", "control_total", "piece_count")


def device_view(home: Home) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the device, log on as the Customer (the first logon after a start logs the device
    in to its token): its status and Retrieve PSD Status. Then SIGKILL it, idle: that costs
    no state, and no SIGTERM shutdown either."""
    with running_device(home) as device:
        with DeviceClient(home.socket, timeout=REPLY_TIMEOUT_S) as client:
            client.logon(*ROLE_USERS["customer"])
            status = client.get("/v1/status")
            psd = client.get("/v1/psd-status")
        device.kill()
        device.wait(timeout=30)
    return status, psd


def restore_records(home: Home) -> list[dict[str, Any]]:
    path = home.device / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["values"] for r in records if r.get("service") == "token-file-restored"]


def logon_in_background(home: Home, answers: list[object]) -> threading.Thread:
    def logon() -> None:
        try:
            with DeviceClient(home.socket, timeout=REPLY_TIMEOUT_S) as client:
                answers.append(client.logon(*ROLE_USERS["customer"]))
        except (MeterError, OSError) as exc:  # the device died under it: expected
            answers.append(exc)

    thread = threading.Thread(target=logon, daemon=True)
    thread.start()
    return thread


def kill_during_first_logon(home: Home, live: Path, aimed: bool, delay: float) -> str:
    """Start the device, send the first logon and SIGKILL the device: ``aimed``, the moment its
    C_Login has token.object at 0 bytes (else once the logon is answered), or ``delay`` seconds
    after sending it. How token.object was left."""
    with running_device(home) as device:
        answers: list[object] = []
        fd = os.open(live, os.O_RDONLY)  # SoftHSM2 rewrites this very inode in place
        try:
            thread = logon_in_background(home, answers)
            stop = time.monotonic() + delay
            while os.fstat(fd).st_size != 0 and (
                thread.is_alive() if aimed else time.monotonic() < stop
            ):
                pass
            device.kill()
            device.wait(timeout=30)
        finally:
            os.close(fd)
        thread.join(REPLY_TIMEOUT_S)
        assert answers, "the logon neither ended nor failed"
        assert device.returncode == -signal.SIGKILL
    return file_state(live)


def test_the_device_restores_an_emptied_token_file_and_survives_kills_during_logon(
    device_home: Home,
) -> None:
    home = device_home
    live = token_folder(home, "meter") / "token.object"
    with open_meter_token(home) as token:
        expected = Meter.open(token).status()
    registers = {k: expected[k] for k in REGISTER_FIELDS}
    assert registers["control_total"] == 100_000
    assert restore_records(home) == []

    os.truncate(live, 0)  # the crash, while the device was stopped
    status, psd = device_view(home)
    assert status["module_state"] == "authorized"
    assert {k: psd[k] for k in REGISTER_FIELDS} == registers
    assert (psd["device_serial"], psd["key_id"]) == (expected["device_serial"], expected["key_id"])
    [record] = restore_records(home)
    assert record["token"] == "meter"
    assert f"{live} was empty (0 bytes)" in record["reason"]
    check_token_object(live)

    rng = random.Random()
    left_after: Counter[str] = Counter()
    for kill in range(DEVICE_KILLS):
        # Every other kill aimed at the empty file, the others at random during the logon.
        left = kill_during_first_logon(
            home, live, aimed=kill % 2 == 0, delay=rng.uniform(0, LOGON_KILL_MAX_S)
        )
        left_after[left] += 1
        status, psd = device_view(home)  # the next start comes up, with the registers intact
        assert status["module_state"] == "authorized"
        assert {k: psd[k] for k in REGISTER_FIELDS} == registers
        assert psd["key_id"] == expected["key_id"], "the signing key changed"
        records = restore_records(home)
        broken = left_after["empty"] + left_after["short"]
        assert len(records) == 1 + broken, f"token.object was {left} after the kill: {records}"
        if left != "whole":
            assert records[-1]["token"] == "meter"
            assert f"{live} {REASONS[left]}" in records[-1]["reason"]
    print(
        f"{DEVICE_KILLS} device kills during the first logon left token.object {dict(left_after)}"
    )


# -- 3. the provider's and postal root's tokens ----------------------------------------------

_PARTIES_CHILD = """
import json, sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from meter.cli.home import Home
from meter.indicium.codec import Algorithm
from meter.indicium.signature import verify_signature
from meter.provider import Provider
from meter.provider.authority import PostalRoot
from meter.token import KeyAlgorithm
home = Home.at(Path(sys.argv[1]), Path(sys.argv[2]))
out = {}
for party in ("provider", "postal-root"):
    with home.open_token(party) as token:  # Home.module() runs the guard first
        p = Provider.open(token, home.ledger) if party == "provider" else PostalRoot.open(token)
        message = f"{party} after a crash".encode()
        signature = token.sign(p.key_label, KeyAlgorithm.ECDSA_P256, message)
        verify_signature(Algorithm.ECDSA_P256, p.certificate.public_key(), message, signature)
        out[party] = {
            "spki": p.public_key_spki.hex(),
            "certificate": p.certificate.public_bytes(serialization.Encoding.DER).hex(),
        }
print(json.dumps(out))
"""

_UNGUARDED_CHILD = """
import json, sys
from pathlib import Path
from meter.cli.home import Home
from meter.token import load_module, softhsm_env
home = Home.at(Path(sys.argv[1]), Path(sys.argv[2]))
module = load_module(home.profile.module, softhsm_env(home.profile, home.path))
print(json.dumps({p: module.has_token(home.token_label(p)) for p in ("meter", "provider", "postal-root")}))
"""


def run_child(home: Home, script: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", script, str(home.path), str(home.profile.source)],
        capture_output=True,
        text=True,
        timeout=REPLY_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_emptied_provider_and_postal_root_token_files_come_back_with_their_keys(
    provisioned: Home,
) -> None:
    from meter.provider import Provider
    from meter.provider.authority import PostalRoot

    home = provisioned
    expected: dict[str, dict[str, str]] = {}
    for party in ("provider", "postal-root"):
        with home.open_token(party) as token:
            p = Provider.open(token, home.ledger) if party == "provider" else PostalRoot.open(token)
            expected[party] = {
                "spki": p.public_key_spki.hex(),
                "certificate": p.certificate.public_bytes(serialization.Encoding.DER).hex(),
            }
    lives = {party: token_folder(home, party) / "token.object" for party in expected}
    for live in lives.values():
        live.write_bytes(b"")

    # Without the guard, SoftHSM2 has no such tokens: this is what the guard prevents.
    unguarded = json.loads(run_child(home, _UNGUARDED_CHILD).stdout)
    assert unguarded == {"meter": True, "provider": False, "postal-root": False}
    assert all(live.stat().st_size == 0 for live in lives.values())

    result = run_child(home, _PARTIES_CHILD)
    assert json.loads(result.stdout) == expected
    for party, live in lives.items():
        warning = f"warning: token '{party}': {live} was empty (0 bytes); restored from "
        assert warning in result.stderr, result.stderr
        check_token_object(live)
    assert result.stderr.count("warning: token ") == 2, result.stderr

    again = run_child(home, _PARTIES_CHILD)  # restored for good: no warning the next time
    assert json.loads(again.stdout) == expected
    assert "warning" not in again.stderr, again.stderr
