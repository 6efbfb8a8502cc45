"""The post office's HTTP verification service and the clerk's page.

Endpoints (JSON unless said):

- ``POST /v1/verify``: one indicium, as JSON {"hex": ...}, as the raw bytes
  (application/octet-stream), or as a label image (multipart field "file", or
  an image/* body). 200 with the verdict; 400 when the input is not an
  indicium (bad hex, no barcode, MALFORMED bytes); 413 too big; 415 unknown
  content type; 503 when the replay store failed (verdict ERROR).
- ``POST /v1/verify-batch``: {"items": [hex, ...]}, one replay store call.
- ``GET /healthz``, ``GET /readyz``, ``GET /v1/counters``, ``GET /metrics``
  (Prometheus text), ``GET /v1/reconciliation``, ``GET /`` (the clerk's page).

Verification runs in the threadpool: decoding an image and checking
signatures are CPU-bound. The replay store and the register ledger
serialize their own writers.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meter.errors import BarcodeError, InvalidInput, MeterError, ReplayStoreError
from meter.label import decode_image
from meter.postoffice import ReplayStore, Verdict, VerificationResult, Verifier, open_replay_store
from meter.postoffice.plain import plain_fields
from meter.postoffice.reconcile import RegisterLedger, load_credited, reconcile
from meter.postoffice.service_config import DEFAULT_MAX_BATCH, DEFAULT_MAX_UPLOAD, ServiceConfig
from meter.postoffice.trustdir import CertificateDirectory

__all__ = [
    "CREDITED_FILE",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_UPLOAD",
    "ServiceConfig",
    "create_app",
]

CREDITED_FILE = "credited.json"  # the provider's export, in the certificate directory
STORE_RETRY_SECONDS = 1.0  # a failed replay store is opened again at most this often

_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class _Rejected(Exception):
    """A request the service refuses before verifying anything."""

    def __init__(self, status: int, message: str, kind: str = "InvalidInput") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def create_app(config: ServiceConfig) -> FastAPI:
    """The service over the configuration's certificates, replay store and ledger.

    Loads the certificate directory and opens the store and ledger now, so
    that a broken configuration fails here with a clear MeterError; they are
    closed when the application's lifespan ends.
    """
    page = resources.files("meter.postoffice").joinpath("static/clerk.html").read_text("utf-8")
    service = _Service.start(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="Post office verification service",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.add_middleware(_BodyLimit, limit=config.max_upload, counters=service.counters)

    @app.exception_handler(_Rejected)
    async def rejected(_: Request, exc: _Rejected) -> JSONResponse:
        service.counters.reject(exc.status)
        return _error(exc.status, exc.kind, exc.message)

    @app.exception_handler(MeterError)
    async def failed(_: Request, exc: MeterError) -> JSONResponse:
        return _error(500, type(exc).__name__, str(exc))

    @app.get("/", response_class=HTMLResponse)
    async def clerk_page() -> HTMLResponse:
        headers = {"Content-Security-Policy": _PAGE_POLICY, "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(page, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = await run_in_threadpool(service.problems)
        described = await run_in_threadpool(service.describe)
        body = {"ready": not problems, "problems": problems, **described}
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.post("/v1/verify")
    async def verify(request: Request) -> JSONResponse:
        kind, data = await _single_input(request)
        service.counters.request("verify")
        results, ledger_error = await service.verify([data])
        result = results[0]
        body = {**_result_json(result), "input": kind, "indicium_hex": data.hex()}
        status = {Verdict.ERROR: 503, Verdict.MALFORMED: 400}.get(result.verdict, 200)
        if ledger_error is not None:
            body.update(error="LedgerError", message=ledger_error)
            status = 500
        return JSONResponse(body, status_code=status)

    @app.post("/v1/verify-batch")
    async def verify_batch(request: Request) -> JSONResponse:
        items = _batch_items(await _json_body(request), config.max_batch)
        service.counters.request("verify_batch")
        results, ledger_error = await service.verify(items)
        counts = Counter(r.verdict.value for r in results)
        body: dict[str, Any] = {
            "results": [_result_json(r) for r in results],
            "counts": dict(counts),
        }
        status = 503 if counts[Verdict.ERROR.value] else 200
        if ledger_error is not None:
            body.update(error="LedgerError", message=ledger_error)
            status = 500
        return JSONResponse(body, status_code=status)

    @app.get("/v1/counters")
    async def counters() -> dict[str, Any]:
        return service.counters.to_json()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        problems = await run_in_threadpool(service.problems)
        text = service.counters.prometheus(ready=not problems)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/reconciliation")
    async def reconciliation() -> dict[str, Any]:
        return await service.reconciliation()

    return app


class _Counters:
    """Verdicts and refused requests since the service started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = datetime.now(UTC).replace(microsecond=0)
        self._verdicts: Counter[str] = Counter({v.value: 0 for v in Verdict})
        self._requests: Counter[str] = Counter(verify=0, verify_batch=0)
        self._rejected: Counter[str] = Counter()

    def add(self, results: Sequence[VerificationResult]) -> None:
        with self._lock:
            self._verdicts.update(r.verdict.value for r in results)

    def request(self, endpoint: str) -> None:
        with self._lock:
            self._requests[endpoint] += 1

    def reject(self, status: int) -> None:
        with self._lock:
            self._rejected[str(status)] += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "since": self._since.isoformat(),
                "verdicts": dict(self._verdicts),
                "requests": dict(self._requests),
                "rejected": dict(self._rejected),
            }

    def prometheus(self, ready: bool) -> str:
        data = self.to_json()
        lines = [
            "# HELP meter_postoffice_verdicts_total Verdicts given since the service started.",
            "# TYPE meter_postoffice_verdicts_total counter",
            *(
                f'meter_postoffice_verdicts_total{{verdict="{k}"}} {v}'
                for k, v in data["verdicts"].items()
            ),
            "# HELP meter_postoffice_requests_total Verification requests accepted.",
            "# TYPE meter_postoffice_requests_total counter",
            *(
                f'meter_postoffice_requests_total{{endpoint="{k}"}} {v}'
                for k, v in data["requests"].items()
            ),
            "# HELP meter_postoffice_rejected_total Requests refused before verification.",
            "# TYPE meter_postoffice_rejected_total counter",
            *(
                f'meter_postoffice_rejected_total{{status="{k}"}} {v}'
                for k, v in sorted(data["rejected"].items())
            ),
            "# HELP meter_postoffice_ready 1 when trust and replay store are usable.",
            "# TYPE meter_postoffice_ready gauge",
            f"meter_postoffice_ready {int(ready)}",
        ]
        return "\n".join(lines) + "\n"


class _StoreSlot:
    """The replay store, opened again after it failed (e.g. Redis down, then back)."""

    def __init__(self, location: str | Path) -> None:
        self._location = location
        self._lock = threading.Lock()
        self._store: ReplayStore | None = None
        self._problem: str | None = None
        self._last_attempt = 0.0
        self._open()

    @property
    def is_url(self) -> bool:
        return "://" in str(self._location)

    @property
    def problem(self) -> str | None:
        with self._lock:
            return self._problem

    def get(self) -> ReplayStore:
        """The open store, or one whose every call fails with the reason it is not open."""
        with self._lock:
            retry = time.monotonic() - self._last_attempt >= STORE_RETRY_SECONDS
            if self._problem is not None and retry:
                self._close()
                self._open()
            if self._store is None:
                return _Unavailable(self._problem or "replay store is not open")
            return self._store

    def observe(self, results: Sequence[VerificationResult]) -> None:
        """Note whether the store answered this batch."""
        failed = next((r for r in results if r.verdict is Verdict.ERROR), None)
        answered = any(r.verdict in (Verdict.VALID, Verdict.DUPLICATE) for r in results)
        with self._lock:
            if failed is not None:
                self._problem = failed.reason
            elif answered:
                self._problem = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            if not self.is_url:
                Path(self._location).parent.mkdir(parents=True, exist_ok=True)
            self._store = open_replay_store(self._location)
            self._problem = None
        except ReplayStoreError as exc:
            self._store, self._problem = None, str(exc)
        except OSError as exc:
            self._store = None
            self._problem = f"replay store {self._location}: {exc.strerror or exc}"

    def _close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            with contextlib.suppress(MeterError):  # it failed already; _problem says why
                store.close()


class _Unavailable:
    """A replay store that could not be opened: the verifier turns this into ERROR."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def check_and_set(self, pieces: Sequence[Any]) -> list[bool]:
        raise ReplayStoreError(self._reason)

    def expire(self, today: date) -> int:
        raise ReplayStoreError(self._reason)

    def close(self) -> None:
        pass


class _Service:
    """The state behind the endpoints."""

    def __init__(
        self,
        config: ServiceConfig,
        certs: CertificateDirectory,
        slot: _StoreSlot,
        ledger: RegisterLedger,
    ) -> None:
        self.config = config
        self.certs = certs
        self.slot = slot
        self.ledger = ledger
        self.counters = _Counters()
        self._ledger_problem: str | None = None
        self._expired_on: date | None = None  # the day expiry last ran
        self._expiry_lock = threading.Lock()

    @classmethod
    def start(cls, config: ServiceConfig) -> _Service:
        certs = CertificateDirectory(config.cert_dir)
        slot = _StoreSlot(config.store)
        if slot.problem is not None and not slot.is_url:
            # An embedded store that is corrupt or in use will not heal by itself.
            raise ReplayStoreError(slot.problem)
        try:
            config.ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger = RegisterLedger.open(config.ledger)
        except BaseException:
            slot.close()
            raise
        return cls(config, certs, slot, ledger)

    def today(self) -> date:
        return self.config.today or datetime.now(UTC).date()

    def _expire_once_a_day(self, store: ReplayStore, today: date) -> None:
        """Forget pieces past the 183-day window, on the first verification of each day."""
        with self._expiry_lock:
            if self._expired_on == today:
                return
            try:
                store.expire(today)
            except MeterError:
                return  # the store is failing: the verification will say so; retry next time
            self._expired_on = today

    async def verify(self, items: list[bytes]) -> tuple[list[VerificationResult], str | None]:
        """Verdicts in order, recorded in the ledger; the ledger's failure, if any, apart."""

        def work() -> list[VerificationResult]:
            trust, revocations = self.certs.current()
            store, today = self.slot.get(), self.today()
            self._expire_once_a_day(store, today)
            return Verifier(trust, revocations, store, today).verify_batch(items)

        results = await run_in_threadpool(work)
        self.slot.observe(results)
        self.counters.add(results)
        try:
            await run_in_threadpool(self.ledger.record, results)
        except (MeterError, OSError) as exc:
            self._ledger_problem = str(exc)
            return results, self._ledger_problem
        self._ledger_problem = None
        return results, None

    async def reconciliation(self) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            path = self.config.cert_dir / CREDITED_FILE
            # Signed by the provider: checked against the provider certificates we trust.
            trust, _ = self.certs.current()
            credited = load_credited(path, trust) if path.exists() else None
            return reconcile(self.ledger, credited).to_json()

        return await run_in_threadpool(work)

    def problems(self) -> list[str]:
        self.certs.current_set()  # looks at the directory now
        self.slot.get()  # opens a failed store again if its retry time has come
        found = [self.certs.problem, self.slot.problem, self._ledger_problem]
        return [p for p in found if p is not None]

    def describe(self) -> dict[str, Any]:
        loaded = self.certs.current_set()
        return {
            "certificates": {
                "directory": str(self.certs.path),
                "files": list(loaded.files),
                "meters": len(loaded.trust.credentials),
                "revoked": len(loaded.revocations),
            },
            "store": "redis" if self.slot.is_url else str(self.config.store),
            "today": self.today().isoformat(),
        }

    def close(self) -> None:
        try:
            self.ledger.close()
        finally:
            self.slot.close()


async def _single_input(request: Request) -> tuple[str, bytes]:
    """(what was sent: "hex", "bytes" or "image"; the indicium's bytes)."""
    kind = _media_type(request)
    if kind == "application/json":
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) != {"hex"} or not isinstance(body["hex"], str):
            raise _Rejected(400, 'JSON body must be {"hex": "<indicium in hexadecimal>"}')
        return "hex", _from_hex(body["hex"], "hex")
    if kind == "application/octet-stream":
        return "bytes", _non_empty(await request.body(), "request body")
    if kind.startswith("image/"):
        return "image", await _decode(_non_empty(await request.body(), "image"))
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _form_input(request)
    raise _Rejected(
        415,
        f"content type {kind or '(none)'} is not accepted: send application/json "
        '{"hex": ...}, application/octet-stream, an image/* body or a multipart "file"',
        "UnsupportedMediaType",
    )


async def _form_input(request: Request) -> tuple[str, bytes]:
    try:
        form = await request.form(max_files=1, max_fields=1)
    except HTTPException as exc:
        raise _Rejected(400, f"multipart body: {exc.detail}") from exc
    try:
        upload, text = form.get("file"), form.get("hex")
        if isinstance(upload, UploadFile) and text is None:
            return "image", await _decode(_non_empty(await upload.read(), "uploaded file"))
        if isinstance(text, str) and upload is None:
            return "hex", _from_hex(text, "hex field")
    finally:
        await form.close()
    raise _Rejected(400, 'multipart body must hold either a "file" (label image) or a "hex" field')


async def _json_body(request: Request) -> Any:
    if _media_type(request) != "application/json":
        raise _Rejected(415, "send application/json", "UnsupportedMediaType")
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Rejected(400, f"request body is not JSON: {exc}") from exc


def _batch_items(body: Any, limit: int) -> list[bytes]:
    if not isinstance(body, dict) or set(body) != {"items"} or not isinstance(body["items"], list):
        raise _Rejected(400, 'JSON body must be {"items": ["<hex>", ...]}')
    items = body["items"]
    if not items:
        raise _Rejected(400, "items is empty: nothing to verify")
    if len(items) > limit:
        raise _Rejected(400, f"{len(items)} items: at most {limit} per batch, split the batch")
    decoded = []
    for number, item in enumerate(items):
        if not isinstance(item, str):
            raise _Rejected(400, f"items[{number}] is not a string of hexadecimal")
        decoded.append(_from_hex(item, f"items[{number}]"))
    return decoded


def _from_hex(text: str, what: str) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise _Rejected(400, f"{what} is empty: nothing to verify")
    try:
        return bytes.fromhex(compact)
    except ValueError:
        digits = len(compact)
        if digits % 2 and all(c in "0123456789abcdefABCDEF" for c in compact):
            raise _Rejected(400, f"{what} has an odd number of hex digits ({digits})") from None
        raise _Rejected(400, f"{what} is not hexadecimal") from None


def _non_empty(data: bytes, what: str) -> bytes:
    if not data:
        raise _Rejected(400, f"{what} is empty: nothing to verify")
    return data


async def _decode(image: bytes) -> bytes:
    try:
        return await run_in_threadpool(decode_image, image)
    except (BarcodeError, InvalidInput) as exc:
        raise _Rejected(400, str(exc), type(exc).__name__) from exc


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _result_json(result: VerificationResult) -> dict[str, Any]:
    body = result.to_json()
    if result.indicium is not None:
        body["plain"] = plain_fields(result.indicium)
    return body


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status)


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """Refuses request bodies over the limit: by Content-Length, and while streaming."""

    def __init__(self, app: ASGIApp, limit: int, counters: _Counters) -> None:
        self._app = app
        self._limit = limit
        self._counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._limit):
            await self._refuse(scope, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, limited, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        self._counters.reject(413)
        response: Response = _error(
            413,
            "PayloadTooLarge",
            f"request body is larger than the limit of {self._limit} bytes; nothing was verified",
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
