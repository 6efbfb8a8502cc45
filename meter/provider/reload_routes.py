"""The reload protocol's HTTP routes at the provider: an APIRouter the provider's app includes.

Two routes carry the protocol's opaque messages (hex in JSON), relayed by the
meter's host: ``POST /v1/reload/hello`` starts a session, ``POST /v1/reload/next``
carries every later message of it. Errors have the device API's shape,
``{"error": CLASS, "message": TEXT}`` with CLASS a name in meter.errors, so the
host raises the same class again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from meter import errors
from meter.errors import MeterError, ProtocolError
from meter.protocol.reload_messages import MAX_MESSAGE
from meter.provider.reload_server import ReloadServer

__all__ = ["RELOAD_PREFIX", "reload_router"]

RELOAD_PREFIX = "/v1/reload"

_STATUS: list[tuple[type[MeterError], int]] = [
    (errors.AuthenticationFailed, 401),
    (errors.AccessDenied, 403),
    (errors.InsufficientFunds, 409),
    (errors.TokenUnavailable, 503),
    (errors.InvalidInput, 400),
    (errors.ProtocolError, 400),
    (errors.CertificateError, 400),
]


class _Hello(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_hex: str = Field(max_length=2 * MAX_MESSAGE)


class _Next(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str = Field(min_length=32, max_length=32)
    message_hex: str = Field(max_length=2 * MAX_MESSAGE)


def reload_router(server: ReloadServer | Callable[[], ReloadServer]) -> APIRouter:
    """The routes over ``server`` (or a function returning it, for an app that opens its
    token at startup)."""
    router = APIRouter(prefix=RELOAD_PREFIX, tags=["reload"])

    def current() -> ReloadServer:
        return server if isinstance(server, ReloadServer) else server()

    @router.post("/hello", summary="Download Postage Value: the meter's hello starts a session")
    def hello(body: _Hello) -> Any:
        return _answer(lambda: current().hello(_hex(body.message_hex)).to_json())

    @router.post("/next", summary="Download Postage Value: the next message of a session")
    def next_message(body: _Next) -> Any:
        return _answer(
            lambda: current().next(_hex(body.session_id), _hex(body.message_hex)).to_json()
        )

    return router


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProtocolError("a reload message is not hex") from None


def _answer(step: Callable[[], dict[str, Any]]) -> Any:
    try:
        return step()
    except MeterError as exc:
        public = next(
            c
            for c in type(exc).__mro__
            if c.__module__ == errors.__name__ and c.__name__ in errors.__all__
        )
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        return JSONResponse({"error": public.__name__, "message": str(exc)}, status_code=status)
