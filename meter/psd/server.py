"""The device's API: HTTP/JSON over its Unix socket, one route per service of Table 2.

Every route hands its call to the firmware (`FirmwareThread`, one call at a
time), inside ``PSD.request``: the call runs as the open
session's user only when the request presents that session's credential
(``Authorization: Bearer ID.SECRET``) from the process that logged on (the
kernel's ``SO_PEERCRED`` for the connection); otherwise as No-Role. The
firmware enforces Table 2 and audits every call, allowed or not.

Errors have one shape, ``{"error": CLASS, "message": TEXT}``, where CLASS is
the name of a class in meter.errors (the client raises that class again).
Bodies are JSON, at most `MAX_REQUEST_BYTES`; anything else is refused before
the firmware sees it. The OpenAPI description is at ``/openapi.json``.

This module makes the app: its limits, its error handlers, the sessions, status
reports and credit routes; the other route groups register onto it from their own
modules (``server_admin``, ``server_audit``, ``server_custody``, ``server_issue``,
``server_reload``), in the order the OpenAPI document lists them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from meter import errors
from meter.errors import InvalidInput, MeterError, ProtocolError
from meter.protocol.batch import MAX_BATCH_REQUEST_BYTES
from meter.protocol.credit import CreditGrant
from meter.psd.firmware import PSD
from meter.psd.server_admin import register_administration
from meter.psd.server_audit import register_audit_log, register_device_audit, register_withdrawal
from meter.psd.server_bodies import GrantBody, LogonBody
from meter.psd.server_calls import (
    LINK_STATE_KEY,
    PEER_STATE_KEY,
    FirmwareThread,
    credential_of,
    error_response,
    peer_of,
)
from meter.psd.server_custody import register_custody
from meter.psd.server_issue import BATCH_PATH, IssueFastPath, register_issue
from meter.psd.server_reload import register_reload

__all__ = [
    "BATCH_PATH",
    "LINK_STATE_KEY",
    "MAX_REQUEST_BYTES",
    "PEER_STATE_KEY",
    "FirmwareThread",
    "create_device_app",
    "device_asgi",
    "openapi_description",
]

MAX_REQUEST_BYTES = 64 * 1024  # the largest real request (a certificate chain) is ~3 KB

T = TypeVar("T")


def create_device_app(firmware: FirmwareThread) -> FastAPI:
    app = FastAPI(
        title="meterd",
        summary="The postage meter's device API (one route per service of Table 2)",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(
        _RequestLimit, limit=MAX_REQUEST_BYTES, larger={BATCH_PATH: MAX_BATCH_REQUEST_BYTES}
    )

    def run(request: Request, fn: Callable[[PSD], T]) -> Awaitable[T]:
        return firmware.call(fn, credential_of(request.scope), peer_of(request.scope))

    @app.exception_handler(MeterError)
    async def meter_error(request: Request, exc: MeterError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return error_response(InvalidInput(f"malformed request: {problems}"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such service: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not how {request.url.path} is called"
        else:
            message = str(exc.detail)
        return JSONResponse(
            {"error": "InvalidInput", "message": message}, status_code=exc.status_code
        )

    # -- sessions
    @app.post("/v1/logon", summary="Logon (No-Role): opens the session, bound to this process")
    async def logon(request: Request, body: LogonBody) -> dict[str, Any]:
        peer, link = peer_of(request.scope), request.scope.get("state", {}).get(LINK_STATE_KEY)
        if peer is None:
            raise errors.AccessDenied("the device cannot tell who is connected: logon refused")
        return await run(request, lambda psd: psd.logon(body.user_id, body.password, peer, link))

    @app.post("/v1/logoff", summary="Logoff")
    async def logoff(request: Request) -> dict[str, Any]:
        return await run(request, PSD.logoff)

    @app.get("/v1/session", summary="Session Management (No-Role)")
    async def session(request: Request) -> dict[str, Any]:
        return await run(request, PSD.session_management)

    # -- reports
    @app.get("/v1/status", summary="Request Status (every role)")
    async def status(request: Request) -> dict[str, Any]:
        return await run(request, PSD.request_status)

    @app.get("/v1/psd-status", summary="Retrieve PSD Status (Customer)")
    async def psd_status(request: Request) -> dict[str, Any]:
        return await run(request, PSD.retrieve_psd_status)

    @app.get("/v1/public-key", summary="Retrieve PSD Public Key (No-Role)")
    async def public_key(request: Request) -> dict[str, Any]:
        return await run(request, PSD.retrieve_psd_public_key)

    register_device_audit(app, run)
    register_administration(app, run)

    # -- provider: Download Postage Value
    @app.post("/v1/credit/request", summary="Download Postage Value (Provider): the request")
    async def credit_request(request: Request) -> dict[str, Any]:
        credit = await run(request, PSD.request_credit)
        return {"request_hex": credit.to_bytes().hex()}

    @app.post("/v1/credit/grant", summary="Download Postage Value (Provider): apply the grant")
    async def credit_grant(request: Request, body: GrantBody) -> dict[str, Any]:
        try:
            grant = CreditGrant.from_bytes(bytes.fromhex(body.grant_hex))
        except ValueError as exc:
            raise ProtocolError("the credit grant is not hex") from exc
        return await run(request, lambda p: p.apply_credit(grant))

    register_reload(app, run)
    register_withdrawal(app, run)
    register_issue(app, firmware)
    register_custody(app, run)
    register_audit_log(app, run)
    return app


def device_asgi(firmware: FirmwareThread) -> ASGIApp:
    """What the device serves: the API, with Create Indicium's fast path in front of it."""
    return IssueFastPath(create_device_app(firmware), firmware, MAX_REQUEST_BYTES)


def openapi_description() -> dict[str, Any]:
    """The API's OpenAPI description, without a device (for docs/device-openapi.json)."""
    return create_device_app(FirmwareThread(cast(PSD, None))).openapi()


class _RequestLimit:
    """Refuses bodies over the limit, and bodies without a length, before anything reads them.

    ``larger`` gives a route its own limit (a batch's pieces).
    """

    def __init__(self, app: ASGIApp, limit: int, larger: dict[str, int] | None = None) -> None:
        self._app = app
        self._default = limit
        self._larger = dict(larger or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            limit = self._larger.get(scope["path"], self._default)
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            if b"transfer-encoding" in headers or (
                declared is None and scope["method"] in ("POST", "PUT", "PATCH")
            ):
                await _refuse(send, 411, "a request body needs a Content-Length")
                return
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                await _refuse(send, 413, f"request body is larger than the limit of {limit} bytes")
                return
        await self._app(scope, receive, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": "InvalidInput", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
