"""SIGKILL of the device process at many points of issuing and of crediting.

On each meter-token profile of tests/conftest.py's METER_PROFILES (SoftHSM2, and
openCryptoki's soft token with fewer kills).

The device runs as its own process (tests/_crash_device.py: `meter device
serve`, dying on cue) and the test is its client, as a mailer's program or
the provider would be. After every kill the registers are read straight
from the token: they conserve, every indicium the client received has its
debit and its audit record, no piece sequence is released twice, and every
credit the device acknowledged is there; a grant whose answer the kill cut
off is either in the registers already or applies once on the next start.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meter.cli.home import Home
from meter.errors import ProtocolError, TokenUnavailable
from meter.host import DeviceClient
from meter.indicium import Indicium, RateCategory
from meter.protocol.credit import CreditGrant
from meter.protocol.issue import IssueRequest
from meter.provider import Provider
from meter.psd import Meter
from meter.psd.registers import Registers
from tests.conftest import ROLE_USERS, open_meter_token, set_up

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

CHILD = Path(__file__).with_name("_crash_device.py")
CREDIT = 2_000_000
REQUEST = IssueRequest(
    postage=100,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="62704",
    address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
)
# (point, n): die the n-th time the device reaches the point once issuing has begun.
ISSUE_POINTS = [
    ("before-create", 3),
    ("after-create", 2),
    ("after-sync", 4),
    ("after-destroy", 2),
    ("before-hmac", 3),
    ("before-sign", 3),
    ("after-sign", 2),
    ("before-audit", 3),
    ("after-audit", 2),
]
ISSUE_RANDOM_KILLS = 16
CREDIT_POINTS = [
    ("before-create", 1),  # the request's nonce
    ("after-create", 1),
    ("after-sync", 2),  # the grant's register record
    ("after-destroy", 2),
    ("before-hmac", 2),
    ("before-create", 4),
    ("after-create", 4),
    ("before-audit", 2),
    ("after-audit", 2),
]
CREDIT_RANDOM_KILLS = 16
# Kills per test on a profile where each costs more (openCryptoki: every device start logs in
# to the machine-wide soft token): the first half of the fixed points, then random ones.
REDUCED_KILLS = {"opencryptoki": 10}


def runs_for(
    profile: str, points: list[tuple[str, int]], random_kills: int
) -> list[tuple[str, int]]:
    kills = REDUCED_KILLS.get(profile)
    if kills is None:
        return [*points, *[("random", 0)] * random_kills]
    fixed = min(len(points), kills // 2)
    return [*points[:fixed], *[("random", 0)] * (kills - fixed)]


@contextmanager
def device(home: Home, point: str = "none", nth: int = 0) -> Iterator[subprocess.Popen[str]]:
    """The device for ``home``, which dies by SIGKILL at ``point``; killed if still alive after."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(home.path), point, str(nth)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "socket" in json.loads(ready), ready
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


def killed(proc: subprocess.Popen[str]) -> None:
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"the device ended with {proc.returncode}"


def registers(home: Home) -> Registers:
    with open_meter_token(home) as token:
        r = Meter.open(token).registers
    r.check()
    return r


def audited_sequences(home: Home) -> set[int]:
    path = home.device / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if '"index"' in line]
    return {
        int(r["values"]["sequence"])
        for r in records
        if r["service"] == "create-indicium" and r["outcome"] == "ok"
    }


def logged_on(home: Home, role: str) -> DeviceClient:
    client = DeviceClient(home.socket)
    client.logon(*ROLE_USERS[role])
    return client


def check_issuing(home: Home, released: list[Indicium], last: int) -> int:
    r = registers(home)
    assert r.control_total == CREDIT, "a crash must never create or destroy credit"
    sequences = [ind.sequence for ind in released]
    assert len(sequences) == len(set(sequences)), "a piece sequence was released twice"
    assert max(sequences, default=0) <= r.sequence, "a released piece lacks its debit"
    assert sum(ind.postage for ind in released) <= r.ascending
    missing = set(sequences) - audited_sequences(home)
    assert not missing, f"released pieces without their audit record: {sorted(missing)}"
    assert r.sequence >= last, "the piece sequence went backwards"
    return r.sequence


def test_sigkill_of_the_device_while_issuing(device_home_on: Home, meter_profile: str) -> None:
    home = device_home_on
    _fund(home)
    released: list[Indicium] = []
    last = 0
    runs = runs_for(meter_profile, ISSUE_POINTS, ISSUE_RANDOM_KILLS)
    for point, nth in runs:
        with device(home, "none" if point == "random" else point, nth) as proc:
            with logged_on(home, "customer") as client:
                if point == "random":
                    threading.Timer(random.uniform(0.0, 0.4), proc.kill).start()
                for _ in range(5_000):
                    try:
                        released.append(client.issue(REQUEST))
                    except TokenUnavailable:
                        break
                else:
                    pytest.fail(f"the device was not killed at {point}")
            killed(proc)
        last = check_issuing(home, released, last)
    assert len(released) > len(runs), "the device released too few pieces to test anything"
    # After all the crashes the device issues the next sequence, never a used one.
    with device(home), logged_on(home, "customer") as client:
        piece = client.issue(REQUEST)
    assert piece.sequence == last + 1
    assert piece.sequence not in {ind.sequence for ind in released}


def _fund(home: Home) -> None:
    with device(home), logged_on(home, "provider") as client:
        request = client.request_credit()
        client.apply_credit(_grant(home, request, CREDIT - 100_000))


def _grant(home: Home, request: object, amount: int) -> CreditGrant:
    with home.open_token("provider") as token:
        return Provider.open(token, home.ledger).grant_credit(
            request,  # type: ignore[arg-type]
            amount,
            datetime.now(UTC).replace(microsecond=0),
        )


def test_sigkill_of_the_device_while_crediting(provisioned_on: Home, meter_profile: str) -> None:
    home = provisioned_on
    set_up(home, credit_mills=0)
    granted = 0
    pending: CreditGrant | None = None
    runs = [*runs_for(meter_profile, CREDIT_POINTS, CREDIT_RANDOM_KILLS), ("none", 0)]
    for point, nth in runs:
        with device(home, "none" if point == "random" else point, nth) as proc:
            with logged_on(home, "provider") as client:
                if pending is not None:  # the grant whose answer a kill cut off
                    try:
                        client.apply_credit(pending)
                    except ProtocolError as exc:
                        assert "replayed" in str(exc), exc  # it was in before the kill
                    pending = None
                shown = client.get("/v1/status")["registers"]["control_total"]
                assert shown == granted, "a credit was lost or made"
                if point == "random":
                    threading.Timer(random.uniform(0.0, 0.3), proc.kill).start()
                for _ in range(200 if point == "none" else 2_000):
                    try:
                        request = client.request_credit()
                    except TokenUnavailable:
                        break
                    grant = _grant(home, request, 1_000)
                    granted += grant.amount
                    pending = grant
                    try:
                        client.apply_credit(grant)
                    except TokenUnavailable:
                        break
                    pending = None
                else:
                    if point != "none":
                        pytest.fail(f"the device was not killed at {point}")
            if point != "none":
                killed(proc)
        credited = registers(home).control_total
        # Acknowledged credits are all there; the one in flight may or may not be.
        in_flight = pending.amount if pending is not None else 0
        assert granted - in_flight <= credited <= granted
    assert pending is None and registers(home).control_total == granted > 0
    with home.open_token("provider") as token:
        serial = registers(home).device_serial
        assert Provider.open(token, home.ledger).credited(serial) == granted
