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
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from meter import errors
from meter.errors import InvalidInput, MeterError, ProtocolError
from meter.indicium import Indicium
from meter.protocol.batch import MAX_BATCH_REQUEST_BYTES
from meter.protocol.credit import CreditGrant
from meter.protocol.device_audit import AuditAcknowledgement, nonce_from_hex
from meter.psd.device import SignedBatch
from meter.psd.firmware import PSD
from meter.psd.host_session import Credential, Peer
from meter.psd.server_bodies import (
    AcknowledgementBody,
    AuthorizationBody,
    BatchBody,
    Body,
    BundleBody,
    CeremonyBody,
    CeremonyExportBody,
    CeremonyImportBody,
    CeremonyTranscriptBody,
    CertificatesBody,
    ClockBody,
    CustomerBody,
    DeviceAuditBody,
    GrantBody,
    IssueBody,
    KeyAdministrationBody,
    LogonBody,
    ModifyUserBody,
    PasswordBody,
    ReloadBeginBody,
    ReloadCertificateBody,
    ReloadMessageBody,
    UserBody,
    WithdrawBody,
)

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
BATCH_PATH = "/v1/indicia/batch"  # the one route with a larger limit (MAX_BATCH_REQUEST_BYTES)
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
        return firmware.call(fn, _credential(request.scope), _peer(request.scope))

    @app.exception_handler(MeterError)
    async def meter_error(request: Request, exc: MeterError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return _error_response(InvalidInput(f"malformed request: {problems}"))

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
        peer, link = _peer(request.scope), request.scope.get("state", {}).get(LINK_STATE_KEY)
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

    @app.post("/v1/device-audit", summary="Request Device Audit (No-Role)")
    async def device_audit(request: Request, body: DeviceAuditBody | None = None) -> dict[str, Any]:
        nonce = nonce_from_hex(body.nonce_hex) if body and body.nonce_hex is not None else None
        return await run(request, lambda p: p.request_device_audit(nonce))

    @app.post(
        "/v1/device-audit/acknowledgement",
        summary="Request Device Audit (No-Role): the provider's signed acknowledgement",
    )
    async def device_audit_ack(request: Request, body: AcknowledgementBody) -> dict[str, Any]:
        ack = AuditAcknowledgement.from_json(body.acknowledgement, "the acknowledgement")
        return await run(request, lambda p: p.acknowledge_device_audit(ack))

    # -- users
    @app.get("/v1/users", summary="View Users")
    async def users(request: Request) -> dict[str, Any]:
        return {"users": await run(request, PSD.view_users)}

    @app.post("/v1/users", summary="Create User (Administrator)")
    async def create_user(request: Request, body: UserBody) -> dict[str, Any]:
        return await run(request, lambda p: p.create_user(body.user_id, body.role, body.password))

    @app.put("/v1/users/{user_id}", summary="Modify User (Administrator)")
    async def modify_user(request: Request, user_id: str, body: ModifyUserBody) -> dict[str, Any]:
        return await run(request, lambda p: p.modify_user(user_id, body.role, body.password))

    @app.delete("/v1/users/{user_id}", summary="Delete User (Administrator)")
    async def delete_user(request: Request, user_id: str) -> dict[str, Any]:
        return await run(request, lambda p: p.delete_user(user_id))

    @app.post("/v1/password", summary="Change User Password")
    async def password(request: Request, body: PasswordBody) -> dict[str, Any]:
        return await run(
            request, lambda p: p.change_user_password(body.old_password, body.new_password)
        )

    # -- security officer, administrator
    @app.post("/v1/keys", summary="Key Administration (Security Officer)")
    async def keys(request: Request, body: KeyAdministrationBody) -> dict[str, Any]:
        return await run(request, lambda p: p.key_administration(body.action))

    @app.post("/v1/administration", summary="Administration Authorization (Security Officer)")
    async def administration(request: Request, body: AuthorizationBody) -> dict[str, Any]:
        return await run(request, lambda p: p.administration_authorization(body.authorize))

    @app.post("/v1/audit-key", summary="Create Audit Key (Security Officer)")
    async def create_audit_key(request: Request) -> dict[str, Any]:
        return await run(request, PSD.create_audit_key)

    @app.post("/v1/psc", summary="Update PSC (Security Officer)")
    async def update_psc(request: Request, body: BundleBody) -> dict[str, Any]:
        bundle = body.bundle.encode("utf-8")
        return await run(request, lambda p: p.update_psc(bundle))

    @app.post("/v1/clock", summary="Set Clock (Administrator)")
    async def set_clock(request: Request, body: ClockBody) -> dict[str, Any]:
        return await run(request, lambda p: p.set_clock(body.time))

    # -- certificate authority, provider
    @app.post("/v1/certificates", summary="Authorize PSD (Certificate Authority)")
    async def authorize_psd(request: Request, body: CertificatesBody) -> dict[str, Any]:
        pems = (body.meter_pem.encode(), body.provider_pem.encode(), body.root_pem.encode())
        return await run(request, lambda p: p.authorize_psd(*pems))

    @app.post("/v1/customer", summary="Authorize Customer (Provider)")
    async def authorize_customer(request: Request, body: CustomerBody) -> dict[str, Any]:
        return await run(request, lambda p: p.authorize_customer(body.authorization))

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

    @app.post("/v1/reload/begin", summary="Download Postage Value (Provider): reload, the hello")
    async def reload_begin(request: Request, body: ReloadBeginBody) -> dict[str, Any]:
        return await run(request, lambda p: p.reload_begin(body.amount))

    @app.post("/v1/reload/next", summary="Download Postage Value (Provider): reload, next message")
    async def reload_next(request: Request, body: ReloadMessageBody) -> dict[str, Any]:
        try:
            message = bytes.fromhex(body.message_hex)
        except ValueError as exc:
            raise ProtocolError("the reload message is not hex") from exc
        return await run(request, lambda p: p.reload_next(message))

    @app.post("/v1/reload/cancel", summary="Download Postage Value (Provider): end the reload")
    async def reload_cancel(request: Request) -> dict[str, Any]:
        return await run(request, PSD.reload_cancel)

    @app.post("/v1/reload/key", summary="Authorize PSD (Certificate Authority): the reload key")
    async def reload_key(request: Request) -> dict[str, Any]:
        return await run(request, PSD.reload_key)

    @app.post(
        "/v1/reload/certificate",
        summary="Authorize PSD (Certificate Authority): the reload key's certificate",
    )
    async def reload_certificate(request: Request, body: ReloadCertificateBody) -> dict[str, Any]:
        pem = body.certificate_pem.encode()
        return await run(request, lambda p: p.install_reload_certificate(pem))

    @app.post("/v1/withdraw", summary="Withdraw PSD (Provider): final audit, then keys")
    async def withdraw(request: Request, body: WithdrawBody | None = None) -> dict[str, Any]:
        nonce = nonce_from_hex(body.nonce_hex) if body and body.nonce_hex is not None else None
        ack = (
            AuditAcknowledgement.from_json(body.acknowledgement, "the acknowledgement")
            if body and body.acknowledgement is not None
            else None
        )
        return await run(request, lambda p: p.withdraw_psd(nonce, ack))

    # -- customer, key custodian
    @app.post("/v1/indicia", summary="Create Indicium / Create Correction Indicium (Customer)")
    async def indicia(request: Request, body: IssueBody) -> dict[str, Any]:
        # Served by _IssueFastPath; this route documents it (and would serve it otherwise).
        scope = request.scope
        return await _issue(firmware, body, _credential(scope), _peer(scope))

    @app.post(
        "/v1/indicia/batch",  # BATCH_PATH, spelled out: tests read the routes from here
        summary="Create Indicium for a batch (Customer): one durable debit for all pieces",
        response_class=JSONResponse,
    )
    async def indicia_batch(request: Request, body: BatchBody) -> JSONResponse:
        # Served by _IssueFastPath; this route documents it (and would serve it otherwise).
        scope = request.scope
        answer = await _issue_batch(firmware, body, _credential(scope), _peer(scope))
        # Straight to JSON: FastAPI's encoder would walk a thousand entries one by one.
        return JSONResponse(answer)

    @app.post("/v1/key-exchange", summary="Key Exchange (Key Custodian)")
    async def key_exchange(request: Request) -> dict[str, Any]:
        return await run(request, PSD.key_exchange)

    # -- key ceremonies (docs/custody.md): the Security Officer's and the Key Custodians'
    @app.post("/v1/ceremony/authorize", summary="Key Administration (Security Officer): a ceremony")
    async def ceremony_authorize(request: Request, body: CeremonyBody) -> dict[str, Any]:
        return await run(
            request,
            lambda p: p.ceremony_authorize(body.ceremony, body.purpose, body.postal_root_sha256),
        )

    @app.post("/v1/ceremony/export", summary="Key Exchange (Key Custodian): wrap the keys")
    async def ceremony_export(request: Request, body: CeremonyExportBody) -> dict[str, Any]:
        key = _transport_key(body.transport_key_hex)
        return await run(request, lambda p: p.ceremony_export_keys(body.ceremony, key))

    @app.post("/v1/ceremony/finish-move", summary="Key Administration (Security Officer): move")
    async def ceremony_finish(request: Request, body: CeremonyTranscriptBody) -> dict[str, Any]:
        return await run(
            request, lambda p: p.ceremony_finish_move(body.ceremony, dict(body.transcript))
        )

    @app.post("/v1/ceremony/transcript", summary="Key Exchange (Key Custodian): the transcript")
    async def ceremony_transcript(request: Request, body: CeremonyTranscriptBody) -> dict[str, Any]:
        return await run(
            request, lambda p: p.ceremony_sign_transcript(body.ceremony, dict(body.transcript))
        )

    @app.post("/v1/ceremony/import", summary="Key Exchange (Key Custodian): unwrap and check")
    async def ceremony_import(request: Request, body: CeremonyImportBody) -> dict[str, Any]:
        key = _transport_key(body.transport_key_hex)
        return await run(
            request,
            lambda p: p.ceremony_import_keys(dict(body.bundle), key, dict(body.final_registers)),
        )

    # -- auditor
    @app.get("/v1/audit-key", summary="Export Audit Key (Auditor)")
    async def export_audit_key(request: Request) -> dict[str, Any]:
        return await run(request, PSD.export_audit_key)

    @app.get("/v1/audit", summary="View Audit Log (Auditor)")
    async def view_audit(request: Request, since: int | None = None) -> dict[str, Any]:
        records = await run(request, lambda p: p.view_audit_log(since))
        return {"records": [r.to_json() for r in records]}

    @app.post("/v1/audit/save", summary="Save Audit Log (Auditor): the sealed export")
    async def save_audit(request: Request) -> dict[str, Any]:
        return await run(request, PSD.save_audit_log)

    @app.post("/v1/audit/archive", summary="Archive Audit Log (Auditor)")
    async def archive_audit(request: Request) -> dict[str, Any]:
        return await run(request, PSD.archive_audit_log)

    @app.delete("/v1/audit/archived", summary="Delete Audit Records (Auditor): archived ones")
    async def delete_audit(request: Request) -> dict[str, Any]:
        return await run(request, PSD.delete_audit_records)

    return app


def device_asgi(firmware: FirmwareThread) -> ASGIApp:
    """What the device serves: the API, with Create Indicium's fast path in front of it."""
    return _IssueFastPath(create_device_app(firmware), firmware, MAX_REQUEST_BYTES)


def openapi_description() -> dict[str, Any]:
    """The API's OpenAPI description, without a device (for docs/device-openapi.json)."""
    return create_device_app(FirmwareThread(cast(PSD, None))).openapi()


async def _issue(
    firmware: FirmwareThread, body: IssueBody, credential: Credential | None, peer: Peer | None
) -> dict[str, Any]:
    issue = body.issue_request()
    original = issue.correction_of
    indicium: Indicium = await firmware.call(
        (lambda p: p.create_indicium(issue))
        if original is None
        else (lambda p: p.create_correction_indicium(issue, original)),
        credential,
        peer,
    )
    return {"indicium_hex": indicium.to_bytes().hex(), "fields": _fields(indicium)}


async def _issue_batch(
    firmware: FirmwareThread, body: BatchBody, credential: Credential | None, peer: Peer | None
) -> dict[str, Any]:
    requests = body.issue_requests()
    batch = await firmware.call(lambda p: p.create_indicium_batch(requests), credential, peer)
    return _batch_answer(batch)


def _batch_answer(batch: SignedBatch) -> dict[str, Any]:
    return {
        "indicia_hex": [encoded.hex() for encoded in batch.encoded],
        "count": len(batch.encoded),
        "first_sequence": batch.first_sequence,
        "last_sequence": batch.last_sequence,
        "total_postage": sum(batch.postages),
        "ascending": batch.registers.ascending,
        "descending": batch.registers.descending,
    }


def _fields(indicium: Indicium) -> dict[str, Any]:
    return {
        k: v if isinstance(v, int | str | bool) or v is None else str(v)
        for k, v in indicium.fields().items()
    }


def _transport_key(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise InvalidInput("the transport key is not 64 hex digits") from exc


def _peer(scope: Scope) -> Peer | None:
    peer: Peer | None = scope.get("state", {}).get(PEER_STATE_KEY)
    return peer


def _credential(scope: Scope) -> Credential | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return Credential.parse(value.decode("latin-1"))
    return None


_Handler = Callable[[FirmwareThread, Any, Credential | None, Peer | None], Awaitable[Any]]


class _IssueFastPath:
    """``POST /v1/indicia`` and ``POST /v1/indicia/batch`` straight to the firmware: one call
    per piece is the device's hot path, and FastAPI's routing and response machinery would
    cost it a tenth of its time (a batch: its JSON parsed once, by pydantic's own parser).
    Same body models, same checks, same answers as the documented routes."""

    def __init__(self, app: ASGIApp, firmware: FirmwareThread, limit: int) -> None:
        self._app = app
        self._firmware = firmware
        self._routes: dict[str, tuple[type[Body], _Handler, int]] = {
            "/v1/indicia": (IssueBody, _issue, limit),
            BATCH_PATH: (BatchBody, _issue_batch, MAX_BATCH_REQUEST_BYTES),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        model, handler, limit = route
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        json_body = headers.get(b"content-type", b"").split(b";")[0].strip() == b"application/json"
        if (
            not json_body
            or b"transfer-encoding" in headers
            or not declared.isdigit()
            or int(declared) > limit
        ):
            await self._app(scope, receive, send)  # the documented route's own answer
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nothing was asked of the firmware
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            parsed = model.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
            await _send_json(
                send, 400, {"error": "InvalidInput", "message": f"malformed request: {problems}"}
            )
            return
        try:
            answer = await handler(self._firmware, parsed, _credential(scope), _peer(scope))
        except MeterError as exc:
            response = _error_response(exc)
            await response(scope, receive, send)
            return
        await _send_json(send, 200, answer)


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    """One validation problem; in a batch, named by the piece (1 = the first)."""
    if len(loc) > 1 and loc[0] == "pieces" and isinstance(loc[1], int):
        where = ".".join(str(p) for p in loc[2:]) or "the piece"
        return f"piece {loc[1] + 1} of the batch: {where}: {message}"
    return f"{'.'.join(str(p) for p in loc)}: {message}"


async def _send_json(send: Send, status: int, data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_response(exc: MeterError) -> JSONResponse:
    """The nearest class of meter.errors (LogonFailed is reported as AuthenticationFailed)."""
    public = next(
        c
        for c in type(exc).__mro__
        if c.__module__ == errors.__name__ and c.__name__ in errors.__all__
    )
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    return JSONResponse({"error": public.__name__, "message": str(exc)}, status_code=status)


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
