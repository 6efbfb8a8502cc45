"""The post office's HTTP verification service and the clerk's page.

Checking is not cancelling. Endpoints (JSON; every refusal in one shape,
``{"error", "message", "next_step"}``):

- ``POST /v1/check``, ``POST /v1/check-batch``: verdicts, nothing recorded,
  no credential. One indicium as JSON {"hex": ...}, raw bytes
  (application/octet-stream), a label image (PNG, JPEG or TIFF body, or a
  multipart field "file"), or a form field "hex"; a batch as {"items": [...]}.
- ``POST /v1/cancel``, ``POST /v1/cancel-batch``: the same verdicts, and the
  VALID pieces are recorded as used by the calling station. JSON only, with
  ``Authorization: Bearer <station key>`` of a station (not an auditor).
- ``GET /v1/station``: who the presented key is.
- ``GET /v1/reconciliation``, ``GET /v1/counters``, ``GET /metrics``: any
  station or auditor key.
- ``GET /healthz``, ``GET /readyz``: public, no paths, no figures of trade.
- ``GET /``: the clerk's page.

Every request first passes service_guard.RequestGuard (Host, Origin, body
size and time, security headers); label images are decoded a few at a time
(service_images.ImageGate); the server's own timeouts and connection limit
are in service_server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from meter.errors import AccessDenied, AuthenticationFailed, MeterError
from meter.postoffice import Verdict, VerificationResult
from meter.postoffice.ledger import FirstAccepted
from meter.postoffice.plain import plain_fields
from meter.postoffice.service_config import DEFAULT_MAX_BATCH, DEFAULT_MAX_UPLOAD, ServiceConfig
from meter.postoffice.service_guard import RequestGuard
from meter.postoffice.service_http import (
    Rejected,
    batch_items,
    error_response,
    form_input,
    from_hex,
    hex_body,
    json_body,
    media_type,
    non_empty,
)
from meter.postoffice.service_images import ImageGate
from meter.postoffice.service_state import CREDITED_FILE, Service
from meter.postoffice.stations import Role, Station

__all__ = [
    "CREDITED_FILE",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_UPLOAD",
    "ServiceConfig",
    "create_app",
]

_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff")
_HTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed", 400: "InvalidInput"}


def create_app(config: ServiceConfig) -> FastAPI:
    """The service over the configuration's certificates, replay store and ledger.

    Loads the certificate directory and opens the store and ledger now, so
    that a broken configuration fails here with a clear MeterError; they are
    closed when the application's lifespan ends.
    """
    page = resources.files("meter.postoffice").joinpath("static/clerk.html").read_text("utf-8")
    service = Service.start(config)
    images = ImageGate(config.image_workers, config.image_queue, config.max_pixels)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            images.close()
            service.close()

    app = FastAPI(
        title="Post office verification service",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.add_middleware(RequestGuard, config=config, refused=service.counters.reject)

    @app.exception_handler(Rejected)
    async def rejected(_: Request, exc: Rejected) -> JSONResponse:
        service.counters.reject(exc.status)
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        service.counters.reject(exc.status_code)
        kind = _HTTP_KINDS.get(exc.status_code, "InvalidInput")
        return error_response(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        service.counters.reject(400)
        return error_response(400, "InvalidInput", "the request does not fit this endpoint")

    @app.exception_handler(MeterError)
    async def failed(_: Request, exc: MeterError) -> JSONResponse:
        return error_response(500, type(exc).__name__, str(exc))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        # Never a traceback or a plain-text 500: the same shape, and nothing internal.
        return error_response(500, "InternalError", "the service failed on this request")

    def station_of(request: Request, *roles: Role) -> Station:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="post office"'}
        if scheme.lower() != "bearer" or not key.strip():
            raise Rejected(
                401,
                "this needs a station key: send Authorization: Bearer <key>",
                "Unauthorized",
                challenge,
            )
        try:
            return service.stations.require(key, *roles)
        except AuthenticationFailed as exc:
            raise Rejected(401, str(exc), "Unauthorized", challenge) from exc
        except AccessDenied as exc:
            raise Rejected(403, str(exc), "Forbidden") from exc

    async def single_input(request: Request) -> tuple[str, bytes]:
        """(what was sent: "hex", "bytes" or "image"; the indicium's bytes)."""
        kind = media_type(request)
        if kind == "application/json":
            return "hex", hex_body(await json_body(request))
        if kind == "application/octet-stream":
            return "bytes", non_empty(await request.body(), "request body")
        if kind in _IMAGE_TYPES:
            images.admit()  # before the body is read: a busy service reads no more images
            try:
                return "image", await images.decode(non_empty(await request.body(), "image"))
            finally:
                images.release()
        if kind == "multipart/form-data":
            images.admit()
            try:
                _, value = await form_input(request)
                if isinstance(value, str):
                    return "hex", from_hex(value, "hex field")
                return "image", await images.decode(non_empty(value, "uploaded file"))
            finally:
                images.release()
        if kind == "application/x-www-form-urlencoded":
            _, value = await form_input(request)
            if isinstance(value, str):
                return "hex", from_hex(value, "hex field")
        raise Rejected(
            415,
            f"content type {kind or '(none)'} is not accepted: send application/json "
            '{"hex": ...}, application/octet-stream, a PNG, JPEG or TIFF image, or a '
            'multipart "file"',
            "UnsupportedMediaType",
        )

    async def one(data: bytes, kind: str, station: Station | None) -> JSONResponse:
        at = datetime.now(UTC).replace(microsecond=0)
        results, first, ledger_error = await service.verify(
            [data], station.name if station else None, at
        )
        result = results[0]
        body = {
            **_result_json(result, first[0], station, at),
            "input": kind,
            "indicium_hex": data.hex(),
        }
        status = {Verdict.ERROR: 503, Verdict.MALFORMED: 400}.get(result.verdict, 200)
        if ledger_error is not None:
            body.update(error="LedgerError", message=ledger_error)
            status = 500
        return JSONResponse(body, status_code=status)

    async def many(items: list[bytes], station: Station | None) -> JSONResponse:
        at = datetime.now(UTC).replace(microsecond=0)
        results, first, ledger_error = await service.verify(
            items, station.name if station else None, at
        )
        counts = Counter(r.verdict.value for r in results)
        body: dict[str, Any] = {
            "results": [
                _result_json(r, f, station, at) for r, f in zip(results, first, strict=True)
            ],
            "counts": dict(counts),
            "recorded": station is not None,
        }
        status = 503 if counts[Verdict.ERROR.value] else 200
        if ledger_error is not None:
            body.update(error="LedgerError", message=ledger_error)
            status = 500
        return JSONResponse(body, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    async def clerk_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = await run_in_threadpool(service.problems)
        described = await run_in_threadpool(service.describe)
        body = {"ready": not problems, "problems": problems, **described}
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.post("/v1/check")
    async def check(request: Request) -> JSONResponse:
        kind, data = await single_input(request)
        service.counters.request("check")
        return await one(data, kind, None)

    @app.post("/v1/check-batch")
    async def check_batch(request: Request) -> JSONResponse:
        items = batch_items(await json_body(request), config.max_batch)
        service.counters.request("check_batch")
        return await many(items, None)

    @app.post("/v1/cancel")
    async def cancel(request: Request) -> JSONResponse:
        station = station_of(request, Role.STATION)
        data = hex_body(await json_body(request))  # JSON only: no form can post it
        service.counters.request("cancel")
        return await one(data, "hex", station)

    @app.post("/v1/cancel-batch")
    async def cancel_batch(request: Request) -> JSONResponse:
        station = station_of(request, Role.STATION)
        items = batch_items(await json_body(request), config.max_batch)
        service.counters.request("cancel_batch")
        return await many(items, station)

    @app.get("/v1/station")
    async def whoami(request: Request) -> dict[str, str]:
        station = station_of(request, Role.STATION, Role.AUDITOR)
        return {"name": station.name, "role": station.role.value, "id": station.id}

    @app.get("/v1/counters")
    async def counters(request: Request) -> dict[str, Any]:
        station_of(request, Role.STATION, Role.AUDITOR)
        return service.counters.to_json()

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        station_of(request, Role.STATION, Role.AUDITOR)
        problems = await run_in_threadpool(service.problems)
        text = service.counters.prometheus(ready=not problems)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/reconciliation")
    async def reconciliation(request: Request) -> dict[str, Any]:
        station_of(request, Role.STATION, Role.AUDITOR)
        return await service.reconciliation()

    return app


def _result_json(
    result: VerificationResult,
    first: FirstAccepted | None,
    station: Station | None,
    at: datetime,
) -> dict[str, Any]:
    body = result.to_json()
    if result.indicium is not None:
        body["plain"] = plain_fields(result.indicium)
    recorded = station is not None and result.verdict in (Verdict.VALID, Verdict.SPECIMEN)
    body["recorded"] = recorded
    if recorded and station is not None:
        body["station"] = station.name
        body["accepted_at"] = at.isoformat()
    if result.verdict is Verdict.DUPLICATE:
        body["first_accepted"] = first.to_json() if first is not None else None
    return body
