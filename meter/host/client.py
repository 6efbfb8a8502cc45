"""The host's side of the device socket: one call per service, errors raised as ours.

The client holds no PIN, key or register. It logs on with a user's password;
the device answers with a session id and secret, which the client presents
on every later request (``Authorization: Bearer ID.SECRET``) over the same
Unix socket. The device also checks that the requests come from the process
that logged on, so a session cannot be handed to another process.

HTTP/1.1 over the socket with the standard library's client: it costs a
third of what httpx costs per call (see docs/device.md), and the device's
hot path is one call per piece.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from meter import errors
from meter.errors import DeviceNotRunning, MeterError, ProtocolError
from meter.indicium import Indicium, decode
from meter.protocol.batch import BatchResult, batch_body
from meter.protocol.credit import CreditGrant, CreditRequest
from meter.protocol.device_audit import AuditAcknowledgement, DeviceAuditReport
from meter.protocol.issue import IssueRequest

__all__ = ["DeviceClient"]

# Without a session, an idle connection is opened again after this, well inside the
# device's keep-alive, so a request never races the device closing it. With a session the
# connection is kept whatever the wait: the session lives on the connection it logged on
# over, and the device closes that one only after the session's idle timeout.
_RECONNECT_AFTER_S = 60.0
_SOCKET_PATH_MAX = 107


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("meterd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        path = self._path
        try:
            if len(str(path).encode()) <= _SOCKET_PATH_MAX:
                sock.connect(str(path))
            else:  # sun_path is short: go through the folder
                fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    sock.connect(f"/proc/self/fd/{fd}/{path.name}")
                finally:
                    os.close(fd)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DeviceClient:
    """A connection to one device; use as a context manager."""

    def __init__(self, socket_path: Path, *, home: Path | None = None, timeout: float = 300.0):
        self.socket_path = Path(socket_path)
        self._home = home
        self._timeout = timeout
        self._connection: _UnixConnection | None = None
        self._last_used = 0.0
        self._authorization: str | None = None
        self.session: dict[str, Any] | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; a MeterError subclass for the device's refusals."""
        headers: dict[str, str] = {}
        data: bytes | None = None
        if method != "GET":
            data = json.dumps(body if body is not None else {}, default=_json_default).encode()
            headers = {"content-type": "application/json", "content-length": str(len(data))}
        if self._authorization:
            headers["authorization"] = self._authorization
        connection = self._connect()
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            self.close()
            raise self._not_running() from exc
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise errors.TokenUnavailable(
                f"the device on {self.socket_path} stopped answering ({exc.__class__.__name__}: "
                f"{exc}); whether {method} {path} took effect is in its audit log"
            ) from exc
        self._last_used = time.monotonic()
        try:
            answer = json.loads(payload)
        except ValueError as exc:
            if response.status >= 500:  # refused before the API answered (the server itself)
                text = payload[:200].decode("utf-8", "replace").strip()
                raise errors.TokenUnavailable(
                    f"the device on {self.socket_path} answered {response.status} ({text})"
                ) from exc
            raise ProtocolError(
                f"the device sent a reply that is not JSON ({len(payload)} bytes)"
            ) from exc
        if response.status >= 400:
            raise _error_of(answer, response.status)
        return answer

    def _connect(self) -> _UnixConnection:
        stale = time.monotonic() - self._last_used > _RECONNECT_AFTER_S
        if self._connection is not None and stale and self._authorization is None:
            self.close()
        if self._connection is None:
            connection = _UnixConnection(self.socket_path, self._timeout)
            try:
                connection.connect()
            except PermissionError as exc:
                raise errors.AccessDenied(
                    f"{self.socket_path}: permission denied: this account is not in the group "
                    "the device serves (see docs/device.md, 'Accounts and file modes')"
                ) from exc
            except OSError as exc:
                raise self._not_running() from exc
            self._connection = connection
        return self._connection

    def _not_running(self) -> DeviceNotRunning:
        home = f" --home {self._home}" if self._home else ""
        return DeviceNotRunning(
            f"no device is running on {self.socket_path}: start it with "
            f"`meter{home} device serve` (or `meterd{home}`)"
        )

    # -- sessions ----------------------------------------------------------

    def logon(self, user_id: str, password: str) -> dict[str, Any]:
        answer = self.call("POST", "/v1/logon", {"user_id": user_id, "password": password})
        self._authorization = f"Bearer {answer['session_id']}.{answer['session_secret']}"
        session: dict[str, Any] = answer["session"]
        self.session = session
        return session

    def logoff(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("POST", "/v1/logoff")
        self._authorization = None
        self.session = None
        return answer

    # -- services ----------------------------------------------------------

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", path, body)

    def issue(self, request: IssueRequest) -> Indicium:
        """Create Indicium (or, with ``correction_of``, Create Correction Indicium)."""
        answer = self.post("/v1/indicia", request.to_json())
        try:
            return decode(bytes.fromhex(answer["indicium_hex"]))
        except (KeyError, ValueError) as exc:
            raise ProtocolError("the device's indicium does not decode") from exc

    def issue_batch(self, requests: Sequence[IssueRequest]) -> BatchResult:
        """Create Indicium for a batch (at most MAX_BATCH_PIECES; see `split_batches`): the
        device debits all in one durable write and answers them with consecutive sequences."""
        answer = self.post("/v1/indicia/batch", batch_body(requests))
        return BatchResult.from_json(answer, len(requests))

    def request_credit(self) -> CreditRequest:
        answer = self.post("/v1/credit/request")
        return CreditRequest.from_bytes(bytes.fromhex(answer["request_hex"]))

    def apply_credit(self, grant: CreditGrant) -> dict[str, Any]:
        answer: dict[str, Any] = self.post(
            "/v1/credit/grant", {"grant_hex": grant.to_bytes().hex()}
        )
        return answer

    # Request Device Audit and Withdraw PSD (docs/withdrawal.md).

    def device_audit(self, nonce: bytes) -> DeviceAuditReport:
        """The meter's signed audit report for the provider's ``nonce``."""
        answer = self.post("/v1/device-audit", {"nonce_hex": nonce.hex()})
        return DeviceAuditReport.from_json(answer["signed_report"], "the device's audit report")

    def acknowledge_audit(self, acknowledgement: AuditAcknowledgement) -> dict[str, Any]:
        answer: dict[str, Any] = self.post(
            "/v1/device-audit/acknowledgement", {"acknowledgement": acknowledgement.to_json()}
        )
        return answer

    def withdraw_begin(self, nonce: bytes) -> DeviceAuditReport:
        """Withdraw PSD, step 1: the meter stops issuing; its final signed audit report."""
        answer = self.post("/v1/withdraw", {"nonce_hex": nonce.hex()})
        return DeviceAuditReport.from_json(answer["signed_report"], "the device's final report")

    def withdraw_complete(self, acknowledgement: AuditAcknowledgement) -> dict[str, Any]:
        """Withdraw PSD, steps 3-4: keys destroyed, the device withdrawn."""
        answer: dict[str, Any] = self.post(
            "/v1/withdraw", {"acknowledgement": acknowledgement.to_json()}
        )
        return answer

    # Download Postage Value over the reload protocol: the host relays opaque messages
    # between these and the provider (meter/cli/reload_cli.py); see docs/reload-protocol.md.

    def reload_begin(self, amount: int) -> dict[str, Any]:
        answer: dict[str, Any] = self.post("/v1/reload/begin", {"amount": amount})
        return answer

    def reload_next(self, message: bytes) -> dict[str, Any]:
        answer: dict[str, Any] = self.post("/v1/reload/next", {"message_hex": message.hex()})
        return answer

    def reload_cancel(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.post("/v1/reload/cancel")
        return answer


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _error_of(answer: Any, status: int) -> MeterError:
    name = answer.get("error") if isinstance(answer, dict) else None
    message = answer.get("message") if isinstance(answer, dict) else None
    kind = getattr(errors, name, None) if isinstance(name, str) and name in errors.__all__ else None
    if not (isinstance(kind, type) and issubclass(kind, MeterError)):
        kind = MeterError
    return kind(str(message or f"the device answered {status}"))
