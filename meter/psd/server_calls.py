"""How a request of the device API reaches the firmware, and how a refusal comes back.

`FirmwareThread` runs each call; `credential_of` and `peer_of` read who is asking from
the ASGI scope (the ``Authorization`` header; the connection's peer, which the device's
socket protocol puts in the scope's state); `error_response` gives every refusal the one
shape ``{"error": CLASS, "message": TEXT}``. The routes (meter.psd.server and its
``server_*`` modules) and Create Indicium's fast path share them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import Scope

from meter import errors
from meter.errors import MeterError
from meter.psd.firmware import PSD
from meter.psd.host_session import Credential, Peer

__all__ = [
    "LINK_STATE_KEY",
    "PEER_STATE_KEY",
    "FirmwareThread",
    "Runner",
    "credential_of",
    "error_response",
    "peer_of",
]

# Where a request finds its connection's peer and link in the ASGI scope's "state".
PEER_STATE_KEY = "meter_peer"
LINK_STATE_KEY = "meter_link"

T = TypeVar("T")

# Status codes by what the caller should do (meter.errors groups them the same way).
_STATUS: list[tuple[type[MeterError], int]] = [
    (errors.AuthenticationFailed, 401),
    (errors.AccessDenied, 403),
    (errors.SessionActive, 409),
    (errors.DeviceLocked, 409),
    (errors.InsufficientFunds, 409),
    (errors.RegisterCorrupt, 409),
    (errors.TokenUnavailable, 503),
    (errors.InvalidInput, 400),
    (errors.ProtocolError, 400),
    (errors.CertificateError, 400),
    (errors.IndiciumError, 400),
]


class FirmwareThread:
    """Runs the firmware on the event loop's own thread, one call at a time.

    Calls are serialized anyway (one token, one user at a time). Handing each to a
    worker thread would keep the loop free meanwhile, but on this hardware every
    hand-over between threads costs more than the loop could do in the time (about
    a millisecond a request, a tenth of a piece); a blocked loop only makes other
    clients' connections wait in the socket's backlog, as their calls would wait
    for the firmware anyway.
    """

    def __init__(self, psd: PSD) -> None:
        self.psd = psd

    async def call(
        self, fn: Callable[[PSD], T], credential: Credential | None, peer: Peer | None
    ) -> T:
        with self.psd.request(credential, peer):
            return fn(self.psd)

    async def reap(self) -> None:
        """End a session whose client has gone or whose idle time ran out."""
        self.psd.reap()


class Runner(Protocol):
    """The app's ``run``: ``fn`` on the firmware, as the caller the request shows."""

    def __call__(self, request: Request, fn: Callable[[PSD], T], /) -> Awaitable[T]: ...


def peer_of(scope: Scope) -> Peer | None:
    peer: Peer | None = scope.get("state", {}).get(PEER_STATE_KEY)
    return peer


def credential_of(scope: Scope) -> Credential | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return Credential.parse(value.decode("latin-1"))
    return None


def error_response(exc: MeterError) -> JSONResponse:
    """The nearest class of meter.errors (LogonFailed is reported as AuthenticationFailed)."""
    public = next(
        c
        for c in type(exc).__mro__
        if c.__module__ == errors.__name__ and c.__name__ in errors.__all__
    )
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    return JSONResponse({"error": public.__name__, "message": str(exc)}, status_code=status)
