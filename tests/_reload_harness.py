"""The reload fault harness: a real device process, a real provider service, a relaying host
that can cut the connection; SIGKILL of either process at chosen or random points.

Used by tests/test_reload_faults.py, tests/test_reload_e2e.py, scripts/soak-reload and
scripts/bench_reload.py. As a program it is one of the two processes:

    python tests/_reload_harness.py device HOME
    python tests/_reload_harness.py provider HOME LEDGER STATUS

which SIGKILLs itself the N-th time it reaches POINT during the one reload the harness
armed it for (HOME/fault-device.txt or HOME/fault-provider.txt, "POINT N", read and
removed at that reload's first step). The wrapping happens here, in the harness
(tests/_crash_child.py), never in the meter's or the provider's code.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meter.cli.home import Home  # noqa: E402
from meter.errors import MeterError  # noqa: E402
from tests._crash_child import ANY_POINT, Killer, before_call, wrap_device  # noqa: E402

HERE = Path(__file__).resolve()
CUSTOMER = "DEMO-0001"
PROVIDER_USER = ("provider", "Vendor-pass-0004")
AUTHORITY_USER = ("authority", "Issuer-pass-0005")
AUDITOR_USER = ("auditor", "Review-pass-0006")
FUNDS = 10**12  # mills the customer pays in: never the limit in a soak

DEVICE_FAULT = "fault-device.txt"  # "POINT N": the next reload's fault, read at its begin
PROVIDER_FAULT = "fault-provider.txt"
# Kill points of the device: token and audit operations, the ECDH derivation.
DEVICE_POINTS = [
    ("before-derive", 1),
    ("before-sign", 1),  # the finish signature
    ("after-sign", 1),
    ("before-sign", 2),  # the first statement or the receipt
    ("before-create", 1),  # the credit's register record
    ("after-create", 1),
    ("before-create", 2),  # the receipt object
    ("after-create", 2),
    ("after-sync", 1),
    ("after-destroy", 1),
    ("before-audit", 3),
    ("after-audit", 3),
    ("after-audit", 4),
]
# Kill points of the provider: each protocol step and each ledger write, before and after.
PROVIDER_POINTS = [
    ("before-hello", 1),
    ("after-hello", 1),
    ("before-finish", 1),
    ("after-finish", 1),
    ("before-answers", 1),
    ("before-prepare", 1),
    ("after-prepare", 1),
    ("after-answers", 1),
    ("before-receipt", 1),
    ("before-commit", 1),
    ("after-commit", 1),
    ("after-receipt", 1),
]
# Cuts of the host's link to the provider: request N not sent, or its answer lost.
CUT_POINTS = [(f"{when}-{n}", n) for n in (1, 2, 3, 4) for when in ("cut-before", "cut-after")]


# -- the processes ---------------------------------------------------------------------


def _armed_killer(control: Path, span: int) -> tuple[Killer, Callable[[], None]]:
    """A killer for the wrapped operations, and ``arm()`` for the first step of each
    reload: it reads the fault the harness wrote to ``control`` for this one reload (and
    removes it), or disarms when there is none, so a fault never outlives its run."""
    killer = Killer()

    def arm() -> None:
        killer.disarm()
        try:
            point, nth = control.read_text().split()
        except (OSError, ValueError):
            return
        control.unlink()
        if point == ANY_POINT:  # the k-th of all points reached, k drawn from the seed
            killer.arm(point, random.Random(int(nth)).randint(1, span))
        else:
            killer.arm(point, int(nth))

    return killer, arm


def device_main(home_path: str) -> None:
    from meter.cli.device_process import meterd_main
    from meter.psd import services_reload
    from meter.psd.firmware import PSD

    killer, arm = _armed_killer(Path(home_path) / DEVICE_FAULT, 18)
    wrap_device(killer, sync="make_durable_async")
    killer.wrap(services_reload, "shared_secret", "before-derive", None)
    before_call(PSD, "reload_begin", arm)
    sys.argv = ["meterd", "--home", home_path, "--json"]
    meterd_main()


def provider_main(home_path: str, ledger: str, status: str) -> None:
    import uvicorn

    from meter.provider import Provider
    from meter.provider import reload_server as rs
    from meter.provider.http import create_provider_app
    from meter.provider.http_config import ProviderConfig
    from meter.provider.ledger_sqlite import SqliteLedger
    from meter.provider.reload_routes import reload_router

    killer, arm = _armed_killer(Path(home_path) / PROVIDER_FAULT, 12)
    for step in ("hello", "finish", "answers", "receipt"):
        attr = "_hello" if step == "hello" else f"_on_{step}"
        killer.wrap(rs.ReloadServer, attr, f"before-{step}", f"after-{step}")
    for name in ("prepare", "commit", "abort"):
        killer.wrap(SqliteLedger, name, f"before-{name}", f"after-{name}")
    before_call(rs.ReloadServer, "hello", arm)
    home = Home.at(Path(home_path))
    token = home.open_token("provider")
    provider = Provider.open(token, home.ledger)
    opened = SqliteLedger(Path(ledger))
    server = rs.ReloadServer(provider, opened, Path(status).read_bytes())
    # The provider's own service (meter/provider/http.py), with the reload routes in it.
    config = ProviderConfig(ledger=ledger, keys=home.path / "provider-keys.json")
    app = create_provider_app(config, opened, provider, routers=[reload_router(server)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until the server takes them
    port = sock.getsockname()[1]
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    served = uvicorn.Config(app, log_level="error", access_log=False, workers=1)
    uvicorn.Server(served).run(sockets=[sock])


def _warm(mode: str) -> None:
    """Import what the process will need before it is told to go."""
    if mode == "device":
        import meter.cli.device_process
        import meter.psd.daemon
        import meter.psd.firmware
    else:
        import meter.provider.http
        import meter.provider.ledger_sqlite
        import meter.provider.reload_routes  # noqa: F401


# -- the lab -------------------------------------------------------------------------


@dataclass
class Lab:
    home: Home
    ledger: Path
    status: Path
    serial: int
    baseline: int  # the meter's control total before any reload (local credit of set-up)
    funded: int


def prepare_lab(home: Home) -> Lab:
    """A set-up home (tests/conftest.py's ``device_home``) made ready for reloads: the
    meter's reload key certified, the root's status of the provider, a ledger with the
    customer funded and the meter authorized to it."""
    from cryptography.hazmat.primitives import serialization

    from meter.pki.reload_certs import ProviderStatus, ProviderStatusKind, make_reload_certificate
    from meter.provider import PostalRoot, Provider
    from meter.provider.ledger_sqlite import SqliteLedger
    from meter.psd.firmware import PSD

    now = datetime.now(UTC).replace(microsecond=0)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(*AUTHORITY_USER)
        key = psd.reload_key()
        with home.open_token("provider") as token:
            provider = Provider.open(token, home.ledger)
            cert = make_reload_certificate(
                bytes.fromhex(key["public_key_spki_hex"]),
                key["device_serial"],
                provider.certificate,
                provider.signer(),
                now,
            )
            provider_cert = provider.certificate
        psd.install_reload_certificate(cert.public_bytes(serialization.Encoding.PEM))
        serial = int(key["device_serial"])
        baseline = psd._require_meter().registers.control_total
    with home.open_token("postal-root") as token:
        root = PostalRoot.open(token)
        status = ProviderStatus.issue(provider_cert, ProviderStatusKind.GOOD, root.signer(), now)
    status_path = home.path / "provider-status.bin"
    status_path.write_bytes(status.to_bytes())
    ledger_path = home.path / "accounts.sqlite"
    ledger = SqliteLedger(ledger_path)
    try:
        ledger.create_customer(CUSTOMER, "Demo Mailer", now)
        ledger.fund(CUSTOMER, FUNDS, "lab", now)
        ledger.authorize_meter(CUSTOMER, serial, now)
    finally:
        ledger.close()
    return Lab(home, ledger_path, status_path, serial, baseline, FUNDS)


def make_home(base: Path) -> Home:
    """A new set-up home outside pytest (scripts/soak-reload, scripts/bench_reload.py): the
    test suite's lab PINs and passwords in this process's environment."""
    from meter.cli import provision
    from tests.conftest import TEST_METER_PINS, TEST_PASSWORDS, TEST_PINS, TEST_POLICY, set_up

    os.environ.update(TEST_PINS)
    os.environ.update(TEST_PASSWORDS)
    home = Home.at(base / "home")
    home.device.mkdir(parents=True, mode=0o700)
    (home.device / "policy.toml").write_text(TEST_POLICY)
    provision.init_home(
        home, provision.InitOptions(device_serial=983973031309), meter_pins=TEST_METER_PINS
    )
    set_up(home)
    return home


class Process:
    """One child process of the harness. Started *warm*: it imports what it needs and waits;
    `go` lets it open its token and serve, and returns once it is ready. A warm spare makes
    a restart after a kill cost the start, not the imports."""

    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), *argv],
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

    def run(self, fault: str, nth: int, amount: int) -> Outcome:
        """One reload with one fault (device:POINT, provider:POINT, cut-..., POINT "random"),
        then the recovery: dead processes restarted, the next contact settling."""
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
        if killed is not None or error is not None or not ok:
            self.settle()
            self.recovery_s.append(time.monotonic() - started)
        return Outcome(fault, killed, error, ok)

    def settle(self) -> dict[str, Any]:
        """The next contact: a clean reload, which settles every open transaction first."""
        return self.reload(1000)

    # -- the invariant
    def check(self) -> dict[str, int]:
        """Conservation, from the provider's ledger and the meter's registers."""
        from meter.provider.ledger_sqlite import SqliteLedger

        ledger = SqliteLedger(self.lab.ledger)
        try:
            account = ledger.account(CUSTOMER)
            credited = ledger.credited(self.lab.serial)
            unresolved = len(ledger.open_transactions(self.lab.serial))
            mismatched = ledger.check_totals()
        finally:
            ledger.close()
        with self.client() as client:
            control_total = int(client.get("/v1/status")["registers"]["control_total"])
        applied = control_total - self.lab.baseline
        taken = account.funded + account.refunded - account.available - account.reserved
        return {
            "credited": credited,
            "applied": applied,
            "taken": taken,
            "reserved": account.reserved,
            "credit_created": max(0, applied - credited) + max(0, credited - taken),
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


def fault_plan(runs: int, seed: int) -> list[tuple[str, int]]:
    """Every fixed point once (device kills, provider kills, cuts), then random points."""
    fixed = [(f"device:{p}", n) for p, n in DEVICE_POINTS]
    fixed += [(f"provider:{p}", n) for p, n in PROVIDER_POINTS]
    fixed += [(p, n) for p, n in CUT_POINTS]
    rng = random.Random(seed)
    plan = fixed[:runs]
    while len(plan) < runs:
        kind = rng.choice(["device:random", "provider:random", rng.choice(CUT_POINTS)[0]])
        plan.append((kind, rng.randint(1, 10**6)))
    return plan


def soak(
    lab: Lab, runs: int, seed: int = 1, progress: Callable[[int, Outcome], None] | None = None
) -> dict[str, Any]:
    """The fault runs, with recovery after each; the invariant checked after each run."""
    harness = Harness(lab)
    harness.start_device()
    harness.start_provider()
    failures: list[str] = []
    worst = {"credit_created": 0, "credit_destroyed": 0, "unresolved": 0, "ledger_mismatches": 0}
    rng = random.Random(seed)
    try:
        for number, (fault, nth) in enumerate(fault_plan(runs, seed), 1):
            outcome = harness.run(fault, nth, rng.randint(1, 50_000))
            counts = harness.check()
            for key in worst:
                worst[key] = max(worst[key], counts[key])
            if any(counts[k] for k in worst):
                failures.append(f"run {number} ({fault}, {nth}): {counts} after {outcome}")
            if progress is not None:
                progress(number, outcome)
        final = harness.check()
        twice = harness.applied_twice()
    finally:
        harness.close()
    recovery = sorted(harness.recovery_s)
    return {
        "runs": runs,
        "kills": harness.kills,
        "cuts": harness.cuts,
        "credit_created": worst["credit_created"],
        "credit_destroyed": worst["credit_destroyed"],
        "applied_twice": twice,
        "unresolved": final["unresolved"],
        "ledger_mismatches": worst["ledger_mismatches"],
        "credited": final["credited"],
        "applied": final["applied"],
        "recovery_s_median": recovery[len(recovery) // 2] if recovery else None,
        "recovery_s_max": recovery[-1] if recovery else None,
        "failures": failures,
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    _warm(mode)
    if sys.stdin.readline() != "go\n":  # EOF: the harness let the spare go unused
        raise SystemExit(0)
    if mode == "device":
        device_main(sys.argv[2])
    elif mode == "provider":
        provider_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with suppress(Exception):
        sys.stdout.flush()
