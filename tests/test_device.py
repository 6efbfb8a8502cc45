"""The device process attacked as a hostile local user, client or peer would, on SoftHSM2.

Each attempt is kept as a test: start-up against a busy token or an occupied
socket path, malformed and oversized requests, borrowed and forged session
credentials, rule 4, clients that vanish, the command line's ``--json`` and
shell, label temporaries a killed writer left, and the OpenAPI description.
Most checks share one running device (a start costs about a second); each
compares what it can see (registers, audit log, session) before and after
itself and leaves no session open.

"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import meter.psd.server
from meter import errors
from meter.cli import provision
from meter.cli.device_cli import policy_matrix
from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.main import cli
from meter.errors import AccessDenied, DeviceNotRunning, SessionActive
from meter.host import DeviceClient
from meter.indicium import RateCategory
from meter.protocol.issue import IssueRequest
from meter.psd.daemon import MAX_CONNECTIONS
from meter.psd.host_session import Credential
from meter.psd.server import MAX_REQUEST_BYTES
from tests.conftest import (
    ROLE_USERS,
    SOFTHSM_MODULE,
    TEST_METER_PINS,
    TEST_PASSWORDS,
    TEST_PINS,
    TEST_POLICY,
    open_meter_token,
    require_service,
    set_up,
)

pytestmark = [pytest.mark.softhsm]

REQUEST = IssueRequest(
    postage=550,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="10001",
    address=["ACME Corp", "PO Box 42", "New York NY 10001"],
)
ISSUE = REQUEST.to_json()
REGISTERS = ("ascending", "descending", "control_total", "piece_count")
POLL_LIMIT_S = 15.0  # how long a poll waits before it fails: never a timing assertion


# -- raw HTTP over the device's socket -------------------------------------------------


def _via_folder(path: Path, act: Callable[[str], None]) -> None:
    """Connect or bind through the folder: test paths may be longer than sun_path allows."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        act(f"/proc/self/fd/{folder}/{path.name}")
    finally:
        os.close(folder)


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    _via_folder(path, sock.connect)
    return sock


def _http(
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    authorization: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """One request as bytes; with a body, its true Content-Length unless ``headers`` say else."""
    fields = {"Host": "meterd"}
    if body is not None:
        fields |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if authorization:
        fields["Authorization"] = authorization
    fields |= headers or {}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v)
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + (body or b"")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


def _read_reply(sock: socket.socket) -> Reply:
    response = http.client.HTTPResponse(sock)
    response.begin()
    raw = response.read()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, raw)


def _exchange(home: Home, data: bytes) -> Reply:
    with _connect(home.socket) as sock:
        with suppress(BrokenPipeError):  # the device may answer before it has read it all
            sock.sendall(data)
        return _read_reply(sock)


def _get(home: Home, path: str, authorization: str | None = None) -> Reply:
    return _exchange(home, _http("GET", path, authorization=authorization))


def _post(home: Home, path: str, body: Any, authorization: str | None = None) -> Reply:
    return _exchange(
        home, _http("POST", path, json.dumps(body).encode(), authorization=authorization)
    )


def _assert_error_shape(reply: Reply, status: int, error: str) -> str:
    """The documented refusal: ``{"error": CLASS, "message": TEXT}``; its message."""
    assert reply.status == status, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    body = reply.body
    assert set(body) == {"error", "message"}, body
    assert body["error"] == error and error in errors.__all__, body
    assert isinstance(body["message"], str) and body["message"], body
    return str(body["message"])


# -- the device's records --------------------------------------------------------------


def _audit(home: Home) -> list[dict[str, Any]]:
    lines = (home.device / "audit" / "audit.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "index" in record]


def _last_index(home: Home) -> int:
    records = _audit(home)
    return int(records[-1]["index"]) if records else 0


def _since(home: Home, index: int) -> list[dict[str, Any]]:
    return [r for r in _audit(home) if r["index"] > index]


def _summary(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["service"], r["outcome"], r["role"]) for r in records]


def _wait_for_record(
    home: Home, index: int, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the audit log (no request to the device) until a record after ``index`` fits."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while True:
        found = [r for r in _since(home, index) if wanted(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no such audit record after {POLL_LIMIT_S} s: {_since(home, index)}")
        time.sleep(0.05)


def _registers(home: Home, authorization: str) -> dict[str, int]:
    """The registers as the logged-on Customer sees them (Retrieve PSD Status)."""
    reply = _get(home, "/v1/psd-status", authorization)
    assert reply.status == 200, reply
    return {k: reply.body[k] for k in REGISTERS}


@contextmanager
def _logged_on(home: Home, role: str) -> Iterator[str]:
    """A session of ``role``'s test user held by this process (its logon connection stays open
    until the block ends); yields the ``Authorization`` header its requests carry."""
    user_id, password = ROLE_USERS[role]
    with DeviceClient(home.socket) as client:
        answer = client.call("POST", "/v1/logon", {"user_id": user_id, "password": password})
        yield Credential(answer["session_id"], answer["session_secret"]).header()


def _no_session(home: Home) -> None:
    """Wait until no session is open (a client closed a moment ago ends its session)."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while _get(home, "/v1/session").body["open"]:
        if time.monotonic() > deadline:
            pytest.fail(f"a session is still open on {home.socket}")
        time.sleep(0.05)


def _cli(*args: str, env: dict[str, str | None] | None = None, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), obj={}, env=env, input=stdin)


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meter_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """conftest's ``device_home``, made once for the checks that share one device."""
    require_service(os.path.exists(SOFTHSM_MODULE), f"SoftHSM2 ({SOFTHSM_MODULE})")
    with pytest.MonkeyPatch.context() as env:
        for var, value in {**TEST_PINS, **TEST_PASSWORDS}.items():
            env.setenv(var, value)
        home = Home.at(tmp_path_factory.mktemp("device") / "home")
        home.device.mkdir(parents=True, mode=0o700)
        (home.device / "policy.toml").write_text(TEST_POLICY)
        provision.init_home(
            home, provision.InitOptions(device_serial=983973031309), meter_pins=TEST_METER_PINS
        )
        set_up(home)
        yield home


@dataclass(frozen=True)
class Shared:
    home: Home
    pid: int  # the device process


@pytest.fixture(scope="module")
def shared(meter_home: Home) -> Iterator[Shared]:
    with running_device(meter_home) as child:
        yield Shared(meter_home, child.pid)


@pytest.fixture
def device(shared: Shared) -> Iterator[Shared]:
    """The shared device, with no session open before the test nor after it."""
    _no_session(shared.home)
    yield shared
    _no_session(shared.home)


# == 1. start-up and the socket =========================================================


def _serve(home: Home) -> subprocess.CompletedProcess[str]:
    """`meter --home H device serve` in the foreground, expected to give up by itself."""
    command = [sys.executable, "-m", "meter.cli.main", "--home", str(home.path)]
    command += ["--profile", str(home.profile.source), "device", "serve"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_a_command_without_a_device_names_the_socket_and_how_to_start_it(home: Home) -> None:
    result = _cli("--home", str(home.path), "status")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(home.socket) in lines[0] and "device serve" in lines[0], lines[0]
    as_json = json.loads(_cli("--home", str(home.path), "--json", "status").stdout)
    assert as_json["error"] == "DeviceNotRunning" and str(home.socket) in as_json["message"]


def test_a_second_device_on_the_home_is_refused_and_the_first_serves_on(device_home: Home) -> None:
    with running_device(device_home) as first:
        second = _serve(device_home)
        assert second.returncode != 0
        assert "in use by another process" in second.stderr, second.stderr
        assert str(device_home.path / "locks") in second.stderr, second.stderr
        assert first.poll() is None
        with DeviceClient(device_home.socket) as client:
            assert client.get("/v1/status")["module_state"] == "locked"
            client.logon(*ROLE_USERS["customer"])
            assert client.get("/v1/psd-status")["descending"] == 100_000


def test_the_socket_a_killed_device_left_is_replaced(device_home: Home) -> None:
    with running_device(device_home) as first:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert stat.S_ISSOCK(os.lstat(device_home.socket).st_mode), "SIGKILL leaves the socket file"
    with pytest.raises(DeviceNotRunning, match="device serve"):
        DeviceClient(device_home.socket).get("/v1/status")
    with running_device(device_home), DeviceClient(device_home.socket) as client:
        assert client.get("/v1/status")["role"] == "no-role"
        client.logon(*ROLE_USERS["customer"])
        assert client.get("/v1/psd-status")["descending"] == 100_000


def test_a_socket_path_another_process_listens_on_is_refused(provisioned: Home) -> None:
    provisioned.socket.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        _via_folder(provisioned.socket, listener.bind)
        listener.listen(8)
        listener.settimeout(30)
        result = _serve(provisioned)
        assert result.returncode == 1, result
        assert f"another process is serving on {provisioned.socket}" in result.stderr
        # The listener keeps its path: the device neither removed nor replaced it.
        with _connect(provisioned.socket):
            accepted, _ = listener.accept()
            accepted.close()


def test_a_regular_file_at_the_socket_path_is_refused_and_left_alone(provisioned: Home) -> None:
    provisioned.socket.parent.mkdir(parents=True, exist_ok=True)
    provisioned.socket.write_text("not yours\n")
    result = _serve(provisioned)
    assert result.returncode == 1, result
    assert f"{provisioned.socket} exists and is not a socket" in result.stderr
    assert stat.S_ISREG(os.lstat(provisioned.socket).st_mode)
    assert provisioned.socket.read_text() == "not yours\n"


def test_a_refused_start_in_process_frees_the_home_for_the_next(provisioned: Home) -> None:
    # In one process (CliRunner): a start refused after the token was opened (an unknown
    # socket group, a regular file at the socket path) must close it, or its lock would
    # keep every later start out.
    unknown = _cli("--home", str(provisioned.path), "device", "serve", "--group", "no-such-grp")
    assert unknown.exit_code == 1 and "socket group 'no-such-grp' does not exist" in unknown.stderr
    provisioned.socket.parent.mkdir(parents=True, exist_ok=True)
    provisioned.socket.write_text("not yours\n")
    refused = _cli("--home", str(provisioned.path), "device", "serve")
    assert refused.exit_code == 1 and "is not a socket" in refused.stderr
    provisioned.socket.unlink()
    with open_meter_token(provisioned) as token:  # the lock is free again
        assert token.login_state == "user"


# == 2. bad requests change nothing ======================================================


@dataclass(frozen=True)
class Attack:
    data: Callable[[str], bytes]  # the request's bytes, given the session's Authorization
    status: int | None  # None: the client hangs up before it could be answered
    error: str = "InvalidInput"
    audited: tuple[tuple[str, str, str], ...] = ()  # (service, outcome, role) it records


def _body(method: str, path: str, body: Any) -> Callable[[str], bytes]:
    """A request with a body (JSON unless given as bytes) and its true Content-Length."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda auth: _http(method, path, raw, authorization=auth)


def _bare(
    method: str, path: str, tail: bytes = b"", headers: dict[str, str] | None = None
) -> Callable[[str], bytes]:
    """A request with only ``headers`` of its own, then ``tail`` as sent."""
    return lambda auth: _http(method, path, authorization=auth, headers=headers) + tail


_LOGON = {"user_id": "customer", "password": ROLE_USERS["customer"][1]}
_CHUNKED = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}
_CHUNKS = b"2\r\n{}\r\n0\r\n\r\n"
_HALF = {"Content-Length": "400", "Content-Type": "application/json"}
_OVER = MAX_REQUEST_BYTES + 1
ATTACKS = {
    "malformed-json-indicia": Attack(_body("POST", "/v1/indicia", b'{"postage": 550,'), 400),
    "malformed-json-logon": Attack(_body("POST", "/v1/logon", b"{user_id: customer}"), 400),
    "not-an-object": Attack(_body("POST", "/v1/indicia", [ISSUE]), 400),
    "wrong-type-postage": Attack(_body("POST", "/v1/indicia", ISSUE | {"postage": "lots"}), 400),
    "wrong-type-address": Attack(_body("POST", "/v1/indicia", ISSUE | {"address": "ACME"}), 400),
    "wrong-type-user": Attack(_body("POST", "/v1/logon", _LOGON | {"user_id": 7}), 400),
    "bool-postage": pytest.param(
        Attack(_body("POST", "/v1/indicia", ISSUE | {"postage": True}), 400)
    ),
    "string-postage": pytest.param(
        Attack(_body("POST", "/v1/indicia", ISSUE | {"postage": "550"}), 400)
    ),
    "unknown-field-indicia": Attack(_body("POST", "/v1/indicia", ISSUE | {"free": True}), 400),
    "unknown-field-logon": Attack(_body("POST", "/v1/logon", _LOGON | {"role": "admin"}), 400),
    "unknown-route": Attack(_bare("GET", "/v1/registers"), 404),
    "unknown-route-post": Attack(_body("POST", "/v1/indicia/free", ISSUE), 404),
    "wrong-method-indicia": Attack(_bare("GET", "/v1/indicia"), 405),
    "wrong-method-status": Attack(_bare("DELETE", "/v1/status"), 405),
    "over-limit-indicia": Attack(_body("POST", "/v1/indicia", b" " * _OVER), 413),
    "over-limit-logon": Attack(_body("POST", "/v1/logon", b" " * _OVER), 413),
    # Refused on the declared length alone: the device does not wait for the body.
    "over-limit-declared": Attack(
        _bare("POST", "/v1/indicia", headers={"Content-Length": "9" * 12}), 413
    ),
    "chunked-indicia": Attack(_bare("POST", "/v1/indicia", _CHUNKS, _CHUNKED), 411),
    "chunked-logon": Attack(_bare("POST", "/v1/logon", _CHUNKS, _CHUNKED), 411),
    "no-length": Attack(_bare("POST", "/v1/logon"), 411),
    "half-body-indicia": Attack(
        _bare("POST", "/v1/indicia", json.dumps(ISSUE).encode()[:40], _HALF),
        None,
    ),
    "half-body-logon": Attack(_bare("POST", "/v1/logon", b'{"user_id": "cust', _HALF), None),
    # Well-formed, so it reaches the firmware: refused there, and audited.
    "firmware-refuses-zip": Attack(
        _body("POST", "/v1/indicia", ISSUE | {"origin_zip": "ABCDE"}),
        400,
        audited=(("create-indicium", "failed", "customer"),),
    ),
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_a_bad_request_changes_nothing(device: Shared, attack: Attack) -> None:
    home = device.home
    with _logged_on(home, "customer") as auth:
        before = _registers(home, auth)
        last = _last_index(home)
        with _connect(home.socket) as sock:
            with suppress(BrokenPipeError):
                sock.sendall(attack.data(auth))
            if attack.status is not None:
                _assert_error_shape(_read_reply(sock), attack.status, attack.error)
        # Not audited, so it orders nothing the log could show: only the later requests.
        assert _get(home, "/openapi.json").status == 200
        assert _summary(_since(home, last)) == list(attack.audited)
        assert _registers(home, auth) == before
        session = _get(home, "/v1/session", auth).body
        assert session["open"] and session["user_id"] == "customer" and session["yours"]


# A hostile member of the socket's group holds every connection the device allows.


@contextmanager
def _flood(home: Home) -> Iterator[None]:
    """Every connection the device allows held open; afterwards, the device serving again."""
    held = [_connect(home.socket) for _ in range(MAX_CONNECTIONS)]
    try:
        yield
    finally:
        for sock in held:
            sock.close()
        deadline = time.monotonic() + POLL_LIMIT_S
        while _get(home, "/openapi.json").status == 503:  # until it has seen them close
            assert time.monotonic() < deadline, "the device still refuses after the flood"
            time.sleep(0.05)


def test_a_connection_flood_is_refused_and_the_device_recovers(device: Shared) -> None:
    home = device.home
    with _flood(home):
        assert _get(home, "/openapi.json").status == 503
    reply = _get(home, "/v1/status")
    assert reply.status == 200 and reply.body["role"] == "no-role"


def test_a_connection_flood_refusal_has_the_error_shape(device: Shared) -> None:
    with _flood(device.home):
        reply = _get(device.home, "/v1/status")
    _assert_error_shape(reply, 503, "TokenUnavailable")


# == 3. sessions =========================================================================

# Run in another process: stdlib only, so that it starts fast.
_CHILD_PRELUDE = r"""
import http.client, json, os, socket, sys

def connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{folder}/{os.path.basename(path)}")
    finally:
        os.close(folder)
    return sock

def call(sock, method, path, authorization=None, body=None):
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: meterd\r\nContent-Length: {len(data)}\r\n"
    head += "Content-Type: application/json\r\n"
    if authorization:
        head += f"Authorization: {authorization}\r\n"
    sock.sendall(head.encode() + b"\r\n" + data)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return {"status": response.status, "body": json.loads(response.read())}
"""

# Presents another process's session: argv socket, Authorization, issue body.
_BORROWER = (
    _CHILD_PRELUDE
    + r"""
path, authorization, issue = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
answers = [
    call(connect(path), "GET", "/v1/psd-status", authorization),
    call(connect(path), "POST", "/v1/indicia", authorization, issue),
]
print(json.dumps({"pid": os.getpid(), "answers": answers}))
"""
)

# Inherits a logon connection (argv fd, Authorization) and uses it once told to on stdin.
_HEIR = (
    _CHILD_PRELUDE
    + r"""
fd, authorization = int(sys.argv[1]), sys.argv[2]
sys.stdin.readline()
sock = socket.socket(fileno=fd)
sock.settimeout(30)
print(json.dumps(call(sock, "GET", "/v1/psd-status", authorization)), flush=True)
"""
)

# Logs on (argv socket, user; password from METER_PASSWORD), says so, and waits to be killed;
# with argv[3] "share", first hands its logon connection to an heir (argv[4]: its code).
_HOLDER = (
    _CHILD_PRELUDE
    + r"""
import subprocess, time
path, user_id, mode = sys.argv[1], sys.argv[2], sys.argv[3]
sock = connect(path)
password = os.environ["METER_PASSWORD"]
answer = call(sock, "POST", "/v1/logon", body={"user_id": user_id, "password": password})
body = answer["body"]
heir = None
if mode == "share":
    authorization = f"Bearer {body['session_id']}.{body['session_secret']}"
    heir = subprocess.Popen(
        [sys.executable, "-c", sys.argv[4], str(sock.fileno()), authorization],
        pass_fds=[sock.fileno()],
    ).pid
print(json.dumps({"session": body["session"], "heir": heir}), flush=True)
time.sleep(600)
"""
)


def test_a_request_without_the_session_runs_as_no_role(device: Shared) -> None:
    home = device.home
    with _logged_on(home, "customer") as auth:
        before = _registers(home, auth)
        last = _last_index(home)
        status = _get(home, "/v1/status").body
        assert (status["role"], status["user_id"]) == ("no-role", None)
        assert status["registers"] is None and status["piece_count"] is None
        assert status["session"]["open"] and not status["session"]["yours"]
        for reply in (
            _get(home, "/v1/psd-status"),
            _post(home, "/v1/indicia", ISSUE),
            _post(home, "/v1/logoff", {}),
        ):
            message = _assert_error_shape(reply, 403, "AccessDenied")
            assert "not allowed to the No-Role role" in message
        assert _summary(_since(home, last)) == [
            ("request-status", "ok", "no-role"),
            ("retrieve-psd-status", "denied", "no-role"),
            ("create-indicium", "denied", "no-role"),
            ("logoff", "denied", "no-role"),
        ]
        assert _registers(home, auth) == before
        session = _get(home, "/v1/session", auth).body
        assert session["user_id"] == "customer" and session["yours"]


def test_a_denial_beside_an_open_session_does_not_say_nobody_is_logged_on(
    device: Shared,
) -> None:
    with _logged_on(device.home, "customer"):
        message = _assert_error_shape(_get(device.home, "/v1/psd-status"), 403, "AccessDenied")
    assert "nobody is logged on" not in message


def test_another_process_presenting_the_session_is_refused(device: Shared) -> None:
    home = device.home
    with _logged_on(home, "customer") as auth:
        before = _registers(home, auth)
        last = _last_index(home)
        borrower = subprocess.run(
            [sys.executable, "-c", _BORROWER, str(home.socket), auth, json.dumps(ISSUE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert borrower.returncode == 0, borrower.stderr
        out = json.loads(borrower.stdout)
        why = f"the session belongs to pid {os.getpid()} (uid {os.getuid()}), "
        why += f"the request comes from pid {out['pid']}"
        for answer in out["answers"]:
            assert answer["status"] == 403 and answer["body"]["error"] == "AccessDenied", answer
            assert f"no valid session: {why}" in answer["body"]["message"], answer
        records = _since(home, last)
        assert _summary(records) == [
            ("retrieve-psd-status", "denied", "no-role"),
            ("create-indicium", "denied", "no-role"),
        ]
        assert all(why in r["values"]["reason"] and r["user_id"] is None for r in records)
        assert _registers(home, auth) == before  # and the session is still this process's


@pytest.mark.parametrize("forge", ["secret", "id"])
def test_a_forged_credential_is_refused(device: Shared, forge: str) -> None:
    home = device.home
    with _logged_on(home, "customer") as auth:
        session_id, secret = auth.removeprefix("Bearer ").split(".", 1)
        forged = Credential(
            "0" * len(session_id) if forge == "id" else session_id,
            secret if forge == "id" else secret[::-1] + "x",
        ).header()
        before = _registers(home, auth)
        last = _last_index(home)
        message = _assert_error_shape(_get(home, "/v1/psd-status", forged), 403, "AccessDenied")
        why = "no valid session: the request's session id or secret is not the open session's"
        assert why in message
        (record,) = _since(home, last)
        assert _summary([record]) == [("retrieve-psd-status", "denied", "no-role")]
        assert why in record["values"]["reason"]
        assert _registers(home, auth) == before


def test_a_second_logon_while_a_session_is_open_names_the_holder(device: Shared) -> None:
    home = device.home
    with _logged_on(home, "customer") as auth:
        last = _last_index(home)
        with DeviceClient(home.socket) as other, pytest.raises(SessionActive) as refused:
            other.logon(*ROLE_USERS["administrator"])
        assert "user 'customer' (Customer) is logged on" in str(refused.value)
        (record,) = _since(home, last)
        assert _summary([record]) == [("logon", "denied", "no-role")]
        assert record["values"]["user"] == "admin"
        session = _get(home, "/v1/session", auth).body
        assert session["user_id"] == "customer" and session["yours"]


def test_an_idle_client_keeps_the_connection_its_session_lives_on(
    device: Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client opens an idle connection again only while it holds no session: with one,
    # a new connection would leave the session's own to be closed, and the session with it.
    from meter.host import client as host_client

    monkeypatch.setattr(host_client, "_RECONNECT_AFTER_S", 0.0)  # every gap counts as idle
    home = device.home
    last = _last_index(home)
    with DeviceClient(home.socket) as anybody:
        assert anybody.get("/v1/status")["role"] == "no-role"
        assert anybody.get("/v1/status")["role"] == "no-role"  # on a fresh connection
    with DeviceClient(home.socket) as customer:
        customer.logon(*ROLE_USERS["customer"])
        for _ in range(3):
            time.sleep(0.01)
            assert customer.get("/v1/psd-status")["piece_count"] >= 0
        during = [r for r in _since(home, last) if r["service"] == "session-end"]
        assert during == [], "the session ended while its client was still there"
    deadline = time.monotonic() + POLL_LIMIT_S
    while not (ends := [r for r in _since(home, last) if r["service"] == "session-end"]):
        assert time.monotonic() < deadline, "the session did not end when its client closed"
        time.sleep(0.05)
    assert [r["values"]["reason"] for r in ends] == ["client-gone"]


def test_a_session_ends_when_its_connection_closes(device: Shared) -> None:
    home = device.home
    last = _last_index(home)
    with DeviceClient(home.socket) as first:
        first.logon(*ROLE_USERS["customer"])
    # At once: no wait between the first client's close and the second's logon.
    with DeviceClient(home.socket) as second:
        assert second.logon(*ROLE_USERS["auditor"])["user_id"] == "auditor"
        second.logoff()
    events = [r for r in _since(home, last) if r["service"] in ("logon", "session-end")]
    assert [(r["service"], r["user_id"], r["values"].get("reason")) for r in events] == [
        ("logon", "customer", None),
        ("session-end", "customer", "client-gone"),
        ("logon", "auditor", None),
        ("session-end", "auditor", "logoff"),
    ]


def test_logoff_by_an_administrator_ends_the_session(device: Shared) -> None:
    home = device.home
    last = _last_index(home)
    with DeviceClient(home.socket) as admin:
        admin.logon(*ROLE_USERS["administrator"])
        assert admin.logoff()["open"] is False
        end = _wait_for_record(home, last, lambda r: r["service"] == "session-end")
        assert (end["user_id"], end["values"]) == ("admin", {"reason": "logoff"})
        # The Administrator's connection is still open; the device is free all the same.
        with DeviceClient(home.socket) as customer:
            customer.logon(*ROLE_USERS["customer"])
            with pytest.raises(AccessDenied, match="Logoff is not allowed to the Customer role"):
                customer.logoff()  # Table 2: a Customer's session ends with its client
            assert customer.get("/v1/session")["user_id"] == "customer"


@pytest.mark.parametrize("mode", ["alone", "share"])
def test_a_session_ends_when_its_process_is_killed(device: Shared, mode: str) -> None:
    """SIGKILL of the client that logged on; with "share", an heir process inherited the
    logon connection first and keeps it open, and presents the session after the kill."""
    home = device.home
    last = _last_index(home)
    env = {**os.environ, "METER_PASSWORD": ROLE_USERS["customer"][1]}
    heir: int | None = None  # the heir's pid while it may still be running
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(home.socket), "customer", mode, _HEIR],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdin is not None
            info = json.loads(holder.stdout.readline())
            heir = info["heir"]
            assert info["session"]["client"]["pid"] == holder.pid
            assert _get(home, "/v1/session").body["user_id"] == "customer"
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            # Only the audit log is read until the session has ended: no request helps it.
            end = _wait_for_record(home, last, lambda r: r["service"] == "session-end")
            assert (end["user_id"], end["values"]) == ("customer", {"reason": "client-gone"})
            if heir is not None:
                holder.stdin.write("go\n")
                holder.stdin.flush()
                late = json.loads(holder.stdout.readline())
                heir = None  # it has answered, and exits
                assert late["status"] == 403 and late["body"]["error"] == "AccessDenied", late
                assert "no valid session: no session is open" in late["body"]["message"]
            with DeviceClient(home.socket) as other:
                assert other.logon(*ROLE_USERS["auditor"])["user_id"] == "auditor"
                other.logoff()
        finally:
            holder.kill()  # nothing when it is dead already
            if heir is not None:
                with suppress(ProcessLookupError):
                    os.kill(heir, signal.SIGKILL)


# == 4. the command line ================================================================


def test_json_after_the_command(device: Shared) -> None:
    home = str(device.home.path)
    status = _cli("--home", home, "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["role"] == "no-role"
    auditor, password = ROLE_USERS["auditor"]
    view = _cli(
        *("--home", home, "--user", auditor, "audit", "view", "--json"),
        env={"METER_PASSWORD": password},
    )
    assert view.exit_code == 0, view.output
    records = json.loads(view.stdout)["records"]
    # Its own logon is in it (by role: the rows' other field names are the command's).
    assert any((r["service"], r["role"]) == ("logon", "auditor") for r in records[-5:])
    policy = _cli("policy", "--json")  # no device, no home needed
    assert policy.exit_code == 0, policy.output
    assert json.loads(policy.stdout) == policy_matrix()


def _shell(device: Shared, tmp_path: Path, lines: str) -> Any:
    admin, password = ROLE_USERS["administrator"]
    fake_home = tmp_path / "user"
    fake_home.mkdir()
    result = _cli(
        *("--home", str(device.home.path), "--json", "--user", admin, "shell"),
        env={"METER_PASSWORD": password, "HOME": str(fake_home), "METER_HOME": None},
        stdin=lines,
    )
    assert result.exit_code == 0, result.output
    assert not (fake_home / ".meter").exists()
    return result


def test_the_shell_runs_each_line_with_its_own_home_over_one_session(
    device: Shared, tmp_path: Path
) -> None:
    home = device.home
    last = _last_index(home)
    result = _shell(device, tmp_path, "status\nusers list\nexport-certs\n")
    # Piped, the shell prints no prompt: every line is one command's JSON.
    outputs = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    status, users, certificates = outputs
    assert (status["user_id"], status["role"]) == ("admin", "administrator")
    assert {u["user_id"] for u in users["users"]} == {u for u, _ in ROLE_USERS.values()}
    # export-certs writes where the shell's --home says, not in ~/.meter.
    assert set(certificates.values()) == {
        str(home.certs / f"{n}.pem") for n in ("meter", "provider", "postal-root")
    }
    logons = [r for r in _since(home, last) if r["service"] == "logon"]
    assert [(r["user_id"], r["outcome"]) for r in logons] == [("admin", "ok")]


def test_the_shell_with_json_prints_json_lines(device: Shared, tmp_path: Path) -> None:
    result = _shell(device, tmp_path, "status\nusers list\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


# == 5. labels ==========================================================================


def test_issue_removes_the_label_temporaries_of_dead_writers_only(device: Shared) -> None:
    home = device.home
    home.labels.mkdir(exist_ok=True)
    nobody = int(Path("/proc/sys/kernel/pid_max").read_text())  # pids stay below it
    dead = home.labels / f".983973031309-000042.png.{nobody}.k2j4h5q8.tmp"
    mine = home.labels / f".983973031309-000042.pdf.{os.getpid()}.a8c7d6e5.tmp"
    the_device = home.labels / f".983973031309-000043.png.{device.pid}.z9y8x7w6.tmp"
    old_anonymous, new_anonymous = home.labels / ".orphan.tmp", home.labels / ".fresh.tmp"
    for temp in (dead, mine, the_device, old_anonymous, new_anonymous):
        temp.write_bytes(b"half a label")
    two_hours_ago = time.time() - 7200
    os.utime(old_anonymous, (two_hours_ago, two_hours_ago))
    customer, password = ROLE_USERS["customer"]
    result = _cli(
        *("--home", str(home.path), "--json", "--user", customer, "issue", "--postage", "0.55"),
        *("--from-zip", "94043", "--to-zip", "10001", "--to", "ACME Corp|PO Box 42"),
        env={"METER_PASSWORD": password},
    )
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["label_png"]).parent == home.labels
    assert not dead.exists() and not old_anonymous.exists()
    assert mine.exists() and the_device.exists() and new_anonymous.exists()


# == 6. the OpenAPI description ===========================================================


def test_the_openapi_description_lists_every_route(device: Shared) -> None:
    # The app's routes live in server.py and the server_*.py modules that register onto it.
    here = Path(meter.psd.server.__file__).parent
    source = "\n".join(p.read_text() for p in sorted(here.glob("server*.py")))
    routes = {
        (method.upper(), path)
        for method, path in re.findall(r'@app\.(get|post|put|delete|patch)\(\s*"([^"]+)"', source)
    }
    assert len(routes) >= 29 and ("POST", "/v1/indicia") in routes
    with DeviceClient(device.home.socket) as client:
        described = client.get("/openapi.json")
    listed = {
        (method.upper(), path)
        for path, operations in described["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert listed == routes
