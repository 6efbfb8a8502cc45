"""The device as its own account, as packaging/systemd/meterd.service runs it.

A device account (``meterd-ci``) provisions a home and serves it with
``--group meter-ci``; a client account in that group (``meter-ci-client``)
cannot read a byte of the home but can use every service its users' roles
allow through the socket; an outsider (``meter-ci-outsider``) is refused by
the socket itself with one clear line. The audit log names the client's uid.
The unit file is checked with ``systemd-analyze verify`` and for the hardening
its README promises.

Needs root (it makes the accounts, idempotently, and switches to them with
setpriv) and a checkout every account can reach. Crediting is out of scope:
the provider is a party of its own, and the development provider's token lives
in the device's home, where a client cannot go; the device account credits the
meter while it sets it up, before the device starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pwd
import select
import shlex
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meter.cli.device_process import stop_device
from tests.conftest import (
    ROLE_USERS,
    SOFTHSM_MODULE,
    TEST_PASSWORDS,
    TEST_PINS,
    TEST_POLICY,
    require_service,
)

pytestmark = [pytest.mark.softhsm]

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "packaging" / "systemd" / "meterd.service"
BIN = Path(sys.executable).parent  # the venv's bin/: python, meter, meterd
DEVICE, CLIENTS, CLIENT, OUTSIDER = "meterd-ci", "meter-ci", "meter-ci-client", "meter-ci-outsider"
CREDIT = 50_000  # mills the device account credits while it sets the meter up
START_TIMEOUT_S = 60.0  # a guard against a hung start, not a measurement
# What every account's processes get: nothing of root's environment.
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
# What no account but the device's may read (relative to the home).
SECRETS = ["tokens", "meter/users.json", "meter/audit/audit.jsonl", "token-copies"]
ISSUE = [
    *("issue", "--postage", "0.73", "--from-zip", "94043", "--to-zip", "62704"),
    *("--to", "Jane Q. Public|1234 Main St.|Springfield, IL 62704"),
]


# -- the unit file ---------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a systemd unit file: each key's values in order (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{UNIT}:{number}: not 'Key=value' in a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# The settings packaging/systemd/README.md promises, as their last value.
PROMISED = {
    "User": "meterd",
    "Group": "meterd",
    "SupplementaryGroups": "meter",
    "StateDirectory": "meterd",
    "StateDirectoryMode": "0710",
    "UMask": "0077",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "LimitCORE": "0",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateMounts": "yes",
    "PrivateDevices": "yes",
    "PrivateNetwork": "yes",
    "IPAddressDeny": "any",
    "RestrictAddressFamilies": "AF_UNIX",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProcSubset": "pid",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RemoveIPC": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}
# Each would break the device: see the unit's comments.
ABSENT = ["ProtectProc", "PrivateUsers", "DynamicUser"]


def test_the_unit_promises_its_hardening() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    wrong = {
        k: service.get(k, ["<missing>"])[-1]
        for k, v in PROMISED.items()
        if service.get(k, [None])[-1] != v
    }
    assert wrong == {}, f"{UNIT}: settings differ from the README's promise"
    assert [k for k in ABSENT if k in service] == []
    assert service["SystemCallFilter"] == ["@system-service", "~@resources"]
    [start] = service["ExecStart"]
    argv = shlex.split(start)
    assert argv[0].endswith("/bin/meterd")
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--home"] == "/var/lib/meterd"
    assert pairs["--group"] == "meter"
    # The device sets SOFTHSM2_CONF itself, from the home.
    assert not any("SOFTHSM2_CONF" in value for value in service.get("Environment", []))
    readme = (UNIT.parent / "README.md").read_text()
    assert "DeviceAllow=" in readme
    for key in PROMISED:
        assert key in readme, f"{key} is not explained in {UNIT.parent / 'README.md'}"


def _verify(unit: Path) -> list[str]:
    """systemd-analyze verify's complaints about ``unit`` (none about other units)."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in lines if unit.name in line]
    if result.returncode != 0 and not complaints:
        complaints = lines or [f"exit status {result.returncode}"]
    return complaints


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    require_service(shutil.which("systemd-analyze") is not None, "systemd-analyze")
    meterd = BIN / "meterd"
    assert os.access(meterd, os.X_OK), f"{meterd} is not installed"
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/meter/.venv/bin/meterd ") == 1
    # The installed binary's path on this machine: verify checks that it exists.
    unit = tmp_path / "meterd.service"
    unit.write_text(text.replace("ExecStart=/opt/meter/.venv/bin/meterd ", f"ExecStart={meterd} "))
    assert _verify(unit) == []
    # The exposure systemd itself computes from the hardening (0 best, 10 worst).
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=15", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    # The check sees a typo: a misspelled hardening line would be ignored by systemd.
    typo = tmp_path / "typo" / "meterd.service"
    typo.parent.mkdir()
    typo.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    assert any("ProtectSytem" in line for line in _verify(typo))


# -- the accounts ----------------------------------------------------------------------


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        _run(["groupadd", "--system", name])


def _ensure_user(name: str, *, member_of: str | None) -> None:
    """A system account with a group of its own; in ``member_of`` (or out of CLIENTS)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(
            [
                *("useradd", "--system", "--user-group", "--no-create-home"),
                *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name),
            ]
        )
    members = grp.getgrnam(CLIENTS).gr_mem
    if member_of is not None and name not in members:
        _run(["usermod", "--append", "--groups", member_of, name])
    if member_of is None and name in members:
        _run(["gpasswd", "--delete", name, CLIENTS])


def _unreachable() -> Path | None:
    """The first directory on the way to the interpreter or the checkout that other accounts
    cannot pass through (no o+x), if any."""
    targets = [
        REPO / "meter",
        REPO / "hsm_profiles",
        REPO / "tests",
        BIN,
        Path(os.path.realpath(sys.executable)).parent,
        *(Path(p) for p in site.getsitepackages() if os.path.isdir(p)),
    ]
    for target in targets:
        for folder in [target, *target.parents]:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return folder
    return None


@dataclasses.dataclass
class Deployment:
    base: Path  # 0755, removed at the end
    home: Path
    client_dir: Path  # the client's own folder (its labels)
    device: subprocess.Popen[str]
    ready: dict[str, Any]

    @property
    def socket(self) -> Path:
        return self.home / "run" / "meterd.sock"


def setpriv(account: str) -> list[str]:
    """The command prefix that runs as ``account``: its uid, group and supplementary groups."""
    return ["setpriv", f"--reuid={account}", f"--regid={account}", "--init-groups", "--"]


def as_account(
    account: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``account``, files it makes its own (umask 077), secrets in ``env``."""
    result = subprocess.run(
        [*setpriv(account), *argv],
        env={**ENV, **(env or {})},
        cwd="/",
        umask=0o077,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, f"{argv[:3]}... as {account}: {result.stderr[-2000:]}"
    return result


# Runs as the device account: the users of every role, the audit key, the customer and the
# credit, in the firmware itself (tests/conftest.py set_up), before the device starts.
SET_UP = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from meter.cli.home import Home
from tests.conftest import set_up
set_up(Home.at(Path(sys.argv[2])), int(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    require_service(os.path.exists(SOFTHSM_MODULE), f"SoftHSM2 ({SOFTHSM_MODULE})")
    require_service(os.geteuid() == 0, "root (to make accounts and run as them)")
    for tool in ("setpriv", "useradd", "groupadd", "usermod", "gpasswd"):
        require_service(shutil.which(tool) is not None, tool)
    blocked = _unreachable()
    require_service(
        blocked is None,
        f"a checkout and interpreter every account can reach ({blocked} is not o+x: "
        "the device and client accounts cannot get through it)",
    )
    _ensure_group(CLIENTS)
    _ensure_user(DEVICE, member_of=CLIENTS)  # it gives its home and socket to CLIENTS
    _ensure_user(CLIENT, member_of=CLIENTS)
    _ensure_user(OUTSIDER, member_of=None)

    # Not tmp_path: /tmp/pytest-of-root is 0700, nobody else could reach the home.
    base = Path(tempfile.mkdtemp(prefix="meter-accounts-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        (home / "meter").mkdir(parents=True, mode=0o700)
        (home / "meter" / "policy.toml").write_text(TEST_POLICY)  # quick logons
        for path in [home, *home.rglob("*")]:
            shutil.chown(path, DEVICE, DEVICE)
        client_dir = base / "client"
        client_dir.mkdir(mode=0o700)
        shutil.chown(client_dir, CLIENT, CLIENT)

        # The device's first run, as its own account, as an admin would with runuser.
        init = [str(BIN / "meter"), "--home", str(home), "init"]
        as_account(DEVICE, init, env={**TEST_PINS, **TEST_PASSWORDS}, check=True)
        setup = [str(BIN / "python"), "-c", SET_UP, str(REPO), str(home), str(CREDIT)]
        as_account(DEVICE, setup, env=TEST_PINS, check=True)
        with serving(home) as (device, ready):
            yield Deployment(base, home, client_dir, device, ready)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def serving(home: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """The device on ``home`` as the device account, its socket in CLIENTS; SIGTERM after."""
    command = [str(BIN / "python"), "-m", "meter.cli.device_process", "--home", str(home)]
    with tempfile.TemporaryFile("w+") as stderr:
        device = subprocess.Popen(
            [*setpriv(DEVICE), *command, "--json", "--group", CLIENTS],
            env=ENV,
            cwd="/",
            umask=0o077,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        try:
            assert device.stdout is not None
            readable, _, _ = select.select([device.stdout], [], [], START_TIMEOUT_S)
            line = device.stdout.readline() if readable else ""
            if not line:
                stderr.seek(0)
                pytest.fail(f"the device did not start as {DEVICE}: {stderr.read()[-2000:]}")
            yield device, json.loads(line)
        finally:
            stop_device(device)


def uid(account: str) -> int:
    return pwd.getpwnam(account).pw_uid


# -- the home --------------------------------------------------------------------------


def test_the_device_runs_as_its_account_and_locks_its_home(deployment: Deployment) -> None:
    status = Path(f"/proc/{deployment.device.pid}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(uid(DEVICE))] * 4
    assert deployment.ready["pid"] == deployment.device.pid
    gid = grp.getgrnam(CLIENTS).gr_gid
    for path, mode in [
        (deployment.home, 0o710),
        (deployment.home / "run", 0o750),
        (deployment.socket, 0o660),
    ]:
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, uid(DEVICE), gid), (
            path
        )
    for name in SECRETS:
        assert os.stat(deployment.home / name).st_uid == uid(DEVICE), name


@pytest.mark.parametrize("account", [CLIENT, OUTSIDER])
@pytest.mark.parametrize("name", SECRETS)
def test_no_other_account_reads_the_home(deployment: Deployment, account: str, name: str) -> None:
    path = deployment.home / name
    assert path.exists()  # root sees it: a refusal below is about permissions, not absence
    tool = "ls" if path.is_dir() else "cat"
    result = as_account(account, [tool, str(path)])
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert result.stdout == ""


def test_only_the_group_gets_through_the_home_to_the_socket(deployment: Deployment) -> None:
    run = str(deployment.home / "run")
    assert as_account(CLIENT, ["ls", run], check=True).stdout.split() == ["meterd.sock"]
    listed = as_account(CLIENT, ["ls", str(deployment.home)])
    assert listed.returncode != 0 and "Permission denied" in listed.stderr
    outsider = as_account(OUTSIDER, ["ls", run])
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr


# -- the socket, through the library client ---------------------------------------------

# Runs as the client account: one service per role it holds a password for, through
# meter.host.DeviceClient (what every `meter` command uses). Prints one JSON object.
CLIENT_CALLS = """
import json, sys
from pathlib import Path
from meter.cli import workflows
from meter.errors import MeterError
from meter.host import DeviceClient
from meter.indicium import RateCategory
from meter.protocol.issue import IssueRequest

socket, out, passwords = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
found = {}
with DeviceClient(socket) as client:
    found["status"] = client.get("/v1/status")
with DeviceClient(socket) as client:
    client.logon("customer", passwords["customer"])
    request = IssueRequest(
        postage=730,
        rate_category=RateCategory.FIRST_CLASS_LETTER,
        origin_zip="94043",
        destination_zip="62704",
        address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
    )
    issued = workflows.issue_on(client, out.parent, request, out)
    found["issued"] = {"descending": issued.indicium.descending, "png": str(issued.png),
                       "pdf": str(issued.pdf)}
    found["psd_status"] = client.get("/v1/psd-status")
    try:
        client.get("/v1/users")
    except MeterError as exc:
        found["customer_users"] = {"error": type(exc).__name__, "message": str(exc)}
with DeviceClient(socket) as client:
    client.logon("auditor", passwords["auditor"])
    found["audit"] = client.get("/v1/audit")["records"]
with DeviceClient(socket) as client:
    client.logon("admin", passwords["admin"])
    found["users"] = client.get("/v1/users")["users"]
print(json.dumps(found))
"""


def test_a_client_account_uses_its_roles_through_the_socket(deployment: Deployment) -> None:
    passwords = json.dumps(dict(ROLE_USERS.values()))
    out = deployment.client_dir / "library-label"
    argv = [str(BIN / "python"), "-c", CLIENT_CALLS, str(deployment.socket), str(out), passwords]
    found = json.loads(as_account(CLIENT, argv, check=True).stdout)

    assert found["status"]["role"] == "no-role"
    assert found["status"]["self_tests"]["passed"] is True
    # Create Indicium as the Customer: the label is the client's own file.
    for suffix in ("png", "pdf"):
        label = Path(found["issued"][suffix])
        assert label == out.with_suffix(f".{suffix}")
        assert label.stat().st_uid == uid(CLIENT) and label.stat().st_size > 0
    assert found["psd_status"]["descending"] == found["issued"]["descending"] < CREDIT
    # A cell Table 2 denies comes back as the firmware's refusal, not the socket's.
    assert found["customer_users"]["error"] == "AccessDenied"
    assert "Customer" in found["customer_users"]["message"]
    assert any(
        r["service"] == "create-indicium" and r["user_id"] == "customer" for r in found["audit"]
    )
    assert {u["user_id"] for u in found["users"]} == {user for user, _ in ROLE_USERS.values()}


def test_the_socket_refuses_an_outsider(deployment: Deployment) -> None:
    script = (
        "import json, sys\n"
        "from meter.errors import MeterError\n"
        "from meter.host import DeviceClient\n"
        "try:\n"
        "    DeviceClient(sys.argv[1]).get('/v1/status')\n"
        "except MeterError as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__, 'message': str(exc)}))\n"
    )
    argv = [str(BIN / "python"), "-c", script, str(deployment.socket)]
    refused = json.loads(as_account(OUTSIDER, argv, check=True).stdout)
    assert refused["error"] == "AccessDenied"
    assert "not in the group the device serves" in refused["message"]
    assert str(deployment.socket) in refused["message"]


def test_the_audit_log_names_the_client_account(deployment: Deployment) -> None:
    script = (
        "import sys\n"
        "from meter.host import DeviceClient\n"
        "with DeviceClient(sys.argv[1]) as client:\n"
        "    client.logon('auditor', sys.argv[2])\n"
    )
    password = dict(ROLE_USERS.values())["auditor"]
    logon = subprocess.Popen(
        [*setpriv(CLIENT), str(BIN / "python"), "-c", script, str(deployment.socket), password],
        env=ENV,
        cwd="/",
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = logon.communicate(timeout=120)
    assert logon.returncode == 0, err
    log = deployment.home / "meter" / "audit" / "audit.jsonl"  # root reads it
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # setpriv execs the interpreter: the process that logged on has the Popen's pid.
    [mine] = [r for r in records if r["values"].get("client_pid") == logon.pid]
    assert (mine["service"], mine["outcome"], mine["user_id"]) == ("logon", "ok", "auditor")
    assert mine["values"]["client_uid"] == uid(CLIENT)
    assert not any(r["values"].get("client_uid") == uid(OUTSIDER) for r in records)


# -- the same through the `meter` command ------------------------------------------------


def meter(
    deployment: Deployment, account: str, *args: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``meter --home H [--user U] ARGS`` as ``account``, the user's password in METER_PASSWORD."""
    env = {}
    argv = [str(BIN / "meter"), "--home", str(deployment.home)]
    if user is not None:
        argv += ["--user", user]
        env["METER_PASSWORD"] = dict(ROLE_USERS.values())[user]
    return as_account(account, [*argv, *args], env=env)


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_the_cli_serves_a_client_account(deployment: Deployment) -> None:
    status = meter(deployment, CLIENT, "--json", "status")
    assert status.returncode == 0, status.stderr
    assert _json(status)["role"] == "no-role"
    out = deployment.client_dir / "cli-label"
    issued = meter(deployment, CLIENT, "--json", *ISSUE, "--out", str(out), user="customer")
    assert issued.returncode == 0, issued.stderr
    assert Path(_json(issued)["label_png"]).stat().st_uid == uid(CLIENT)
    psd = meter(deployment, CLIENT, "--json", "psd-status", user="customer")
    assert _json(psd)["descending"] == _json(issued)["fields"]["descending"]
    audit = meter(deployment, CLIENT, "--json", "audit", "view", user="auditor")
    assert audit.returncode == 0 and _json(audit)["records"]
    users = meter(deployment, CLIENT, "--json", "users", "list", user="admin")
    assert users.returncode == 0 and len(_json(users)["users"]) == len(ROLE_USERS)
    denied = meter(deployment, CLIENT, "--json", "users", "list", user="customer")
    assert denied.returncode == 1
    assert _json(denied)["error"] == "AccessDenied"


def test_the_cli_refuses_an_outsider_in_one_line(deployment: Deployment) -> None:
    result = meter(deployment, OUTSIDER, "status")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "not in the group the device serves" in line
