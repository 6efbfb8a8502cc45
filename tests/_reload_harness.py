"""The reload fault harness: a real device process, a real provider service, a relaying host
that can cut the connection; SIGKILL of either process at chosen or random points.

Used by tests/_reload_plan.py (the fault plans and the soak), the reload tests,
scripts/soak-reload and scripts/bench_reload.py. The two processes are the programs of
tests/_reload_children.py; the provider's ledger is the lab's, SQLite or PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meter.errors import MeterError  # noqa: E402
from tests._reload_children import DEVICE_FAULT, PROVIDER_FAULT  # noqa: E402
from tests._reload_lab import (  # noqa: E402  (the lab's names, for this module's importers)
    AUDITOR_USER,
    AUTHORITY_USER,
    CUSTOMER,
    FUNDS,
    PROVIDER_USER,
    Lab,
    make_home,
    prepare_lab,
)

__all__ = [
    "AUDITOR_USER",
    "AUTHORITY_USER",
    "CUSTOMER",
    "FUNDS",
    "PROVIDER_USER",
    "ROOT",
    "Cut",
    "Harness",
    "Lab",
    "Outcome",
    "make_home",
    "prepare_lab",
]

CHILDREN = Path(__file__).resolve().with_name("_reload_children.py")


class Process:
    """One child process of the harness. Started *warm*: it imports what it needs and waits;
    `go` lets it open its token and serve, and returns once it is ready. A warm spare makes
    a restart after a kill cost the start, not the imports."""

    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILDREN), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=ROOT,
        )
        self.ready: dict[str, Any] = {}

    def go(self) -> Process:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        try:
            self.ready = json.loads(line)
        except ValueError:
            self.stop()
            self._stderr.seek(0)
            raise RuntimeError(
                f"{self._argv[0]} did not start: {self._stderr.read()[-2000:]}"
            ) from None
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def killed(self) -> bool:
        return self.proc.poll() == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        self._stderr.close()


class Cut(MeterError):
    """The harness cut the host's link to the provider."""


@dataclass
class Outcome:
    fault: str
    killed: str | None  # "device" / "provider" / None
    error: str | None
    reload_ok: bool
    opened: int = 0  # the meter's transactions open at the provider when the run began
    settled: bool = True  # False: the run was left unsettled for the next one's settle


@dataclass
class Harness:
    lab: Lab
    device: Process | None = None
    provider: Process | None = None
    kills: int = 0
    cuts: int = 0
    recovery_s: list[float] = field(default_factory=list)
    _spares: dict[str, Process | None] = field(default_factory=dict)
    _session: tuple[Process | None, Any] | None = None

    # -- processes
    def start_device(self) -> None:
        spare, self._spares["device"] = self._spares.get("device"), self._spawn("device")
        self.device = (spare or self._spawn("device")).go()

    def start_provider(self) -> None:
        spare, self._spares["provider"] = self._spares.get("provider"), self._spawn("provider")
        self.provider = (spare or self._spawn("provider")).go()

    def _spawn(self, which: str) -> Process:
        lab = self.lab
        if which == "device":
            return Process(["device", str(lab.home.path)])
        return Process(["provider", str(lab.home.path), str(lab.ledger), str(lab.status)])

    def url(self) -> str:
        assert self.provider is not None
        return f"http://127.0.0.1:{self.provider.ready['port']}"

    def close(self) -> None:
        for proc in (self.device, self.provider, *self._spares.values()):
            if proc is not None:
                proc.stop()
        self.device = self.provider = None
        self._spares.clear()
        if self._session is not None:
            self._session[1].close()
            self._session = None

    @contextmanager
    def client(self, user: tuple[str, str] = PROVIDER_USER) -> Iterator[Any]:
        """A client logged on as ``user``; the Provider's session is kept while the device
        process lives (one logon per device start, as a host relaying reloads would)."""
        from meter.host import DeviceClient

        if user != PROVIDER_USER:
            if self._session is not None:  # one user at a time: its connection ends it
                self._session[1].close()
                self._session = None
                time.sleep(0.05)
            with DeviceClient(self.lab.home.socket, home=self.lab.home.path, timeout=30) as c:
                c.logon(*user)
                yield c
            return
        if self._session is None or self._session[0] is not self.device:
            if self._session is not None:
                self._session[1].close()
            fresh = DeviceClient(self.lab.home.socket, home=self.lab.home.path, timeout=30)
            fresh.logon(*user)
            self._session = (self.device, fresh)
        try:
            yield self._session[1]
        except MeterError:
            self._session[1].close()
            self._session = None
            raise

    # -- one reload, with a fault
    def reload(self, amount: int, cut: str | None = None) -> dict[str, Any]:
        from meter.cli.reload_cli import ProviderLink, relay_reload

        link = ProviderLink(self.url(), timeout=30)
        count = {"n": 0}

        def send(path: str, body: dict[str, Any]) -> dict[str, Any]:
            count["n"] += 1
            if cut == f"cut-before-{count['n']}":
                self.cuts += 1
                raise Cut(f"the harness cut the link before request {count['n']}")
            answer = link.post(path, body)
            if cut == f"cut-after-{count['n']}":
                self.cuts += 1
                raise Cut(f"the harness cut the link after request {count['n']}")
            return answer

        with self.client() as client:
            return relay_reload(client, send, amount)

    def run(self, fault: str, nth: int, amount: int, settle: bool = True) -> Outcome:
        """One reload with one fault (device:POINT, provider:POINT, cut-..., POINT "random"),
        then the recovery: dead processes restarted, the next contact settling. With
        ``settle`` False the settling contact is left out: what the fault left open stays
        open, so that the next run's settle of it is the one that meets the next fault."""
        opened = self.open_count()
        side, _, point = fault.partition(":")
        home = self.lab.home.path
        if side in ("device", "provider"):
            name = DEVICE_FAULT if side == "device" else PROVIDER_FAULT
            (home / name).write_text(f"{point} {nth}")
        error = None
        ok = False
        try:
            result = self.reload(amount, cut=fault if side.startswith("cut") else None)
            ok = bool(result.get("provider_settled"))
        except MeterError as exc:
            error = f"{type(exc).__name__}: {exc}"
        started = time.monotonic()
        for name in (DEVICE_FAULT, PROVIDER_FAULT):
            (home / name).unlink(missing_ok=True)  # a fault the run never reached
        killed = None
        for which in ("device", "provider"):
            proc = getattr(self, which)
            if proc is not None and which == side and (error is not None or not ok):
                # Its sockets close before the kernel reports it dead: a moment to be sure.
                with suppress(subprocess.TimeoutExpired):
                    proc.proc.wait(2)
            if proc is not None and not proc.alive():
                proc.proc.wait(10)
                if proc.killed():
                    killed = which
                    self.kills += 1
                proc.stop()
                self.start_device() if which == "device" else self.start_provider()
        if settle and (killed is not None or error is not None or not ok):
            self.settle()
            self.recovery_s.append(time.monotonic() - started)
        return Outcome(fault, killed, error, ok, opened, settle)

    def settle(self) -> dict[str, Any]:
        """The next contact: a clean reload, which settles every open transaction first."""
        return self.reload(1000)

    # -- the invariant
    @contextmanager
    def ledger(self) -> Iterator[Any]:
        """The lab's ledger, SQLite or PostgreSQL, opened for one look."""
        from meter.provider.ledger_sql import open_ledger

        ledger = open_ledger(self.lab.ledger)
        try:
            yield ledger
        finally:
            ledger.close()

    def open_count(self) -> int:
        with self.ledger() as ledger:
            return len(ledger.open_transactions(self.lab.serial))

    def check(self) -> dict[str, int]:
        """Conservation, from the provider's ledger and the meter's registers.

        Settled (nothing reserved), the credit the meter applied, the ledger's COMMITTED
        credit and the funds taken are one number. With transactions left open, the meter
        may hold credit still PREPARED at the provider (its receipt not there yet), so
        the applied credit lies between the committed and the committed plus reserved."""
        with self.ledger() as ledger:
            account = ledger.account(CUSTOMER)
            credited = ledger.credited(self.lab.serial)
            unresolved = len(ledger.open_transactions(self.lab.serial))
            mismatched = ledger.check_totals()
        with self.client() as client:
            control_total = int(client.get("/v1/status")["registers"]["control_total"])
        applied = control_total - self.lab.baseline
        taken = account.funded + account.refunded - account.available - account.reserved
        return {
            "credited": credited,
            "applied": applied,
            "taken": taken,
            "reserved": account.reserved,
            "credit_created": max(0, applied - credited - account.reserved)
            + max(0, credited - taken),
            "credit_destroyed": max(0, credited - applied) + max(0, taken - credited),
            "unresolved": unresolved,
            "ledger_mismatches": len(mismatched),
        }

    def applied_twice(self) -> int:
        """Transactions the meter's audit log shows credited more than once."""
        with self.client(AUDITOR_USER) as client:
            records = client.get("/v1/audit")["records"]
        seen: dict[str, int] = {}
        for record in records:
            values = record.get("values", {})
            if (
                record.get("service") == "download-postage-value"
                and record.get("outcome") == "ok"
                and values.get("step") == "reload-next"
                and "control_total" in values
            ):
                txid = values["transaction_id"]
                seen[txid] = seen.get(txid, 0) + 1
        return sum(1 for n in seen.values() if n > 1)
