"""The provider's HTTP service: customer accounts, payments in, meters authorized to customers.

Endpoints (JSON; every refusal ``{"error", "message", "next_step"}`` with a
4xx or 5xx status; amounts in integer mills):

- ``GET /healthz``: public, no figures.
- ``POST /v1/customers`` ``{"customer": ID, "name": TEXT}``: open an account (201).
- ``POST /v1/customers/{id}/fund`` ``{"amount": MILLS, "reference": TEXT}``: a
  payment in (stands in for a payment system); the reference is unique per customer.
- ``GET /v1/customers/{id}``: balance, meters and latest transactions.
- ``POST /v1/customers/{id}/meters`` ``{"device_serial": N}``: authorize a meter to
  the customer; answers the provider-signed record for the meter's Authorize Customer.
- ``GET /v1/transactions/{txid}``: one credit transaction (32 hex digits).

Changes need an operator key, reads an operator's or auditor's
(``Authorization: Bearer <key>``, meter provider keys). Every request first
passes the post office's RequestGuard (Host allowlist, Origin and
Sec-Fetch-Site on writes, body size and time, security headers); the server's
head timeout and connection limit are the post office's uvicorn protocol
(meter.postoffice.service_server.uvicorn_config).

Routers of other parts (the reload protocol) are added with
``app.include_router``; they reach the ledger, the provider and the clock through
``context(request)``, check keys with ``require_key`` and refuse with ``Refused``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from meter.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigurationError,
    InsufficientFunds,
    InvalidInput,
    MeterError,
    ProtocolError,
    TokenUnavailable,
)
from meter.postoffice.service_guard import RequestGuard
from meter.postoffice.service_http import Rejected, json_body
from meter.provider.api_keys import ApiKey, ApiKeys, KeyRole
from meter.provider.customers import authorize_meter
from meter.provider.http_config import ProviderConfig
from meter.provider.ledger import Ledger, Transaction
from meter.provider.service import Provider

__all__ = [
    "ProviderContext",
    "Refused",
    "context",
    "create_provider_app",
    "error_response",
    "require_key",
    "transaction_json",
]

NEXT_STEPS = {
    "InvalidInput": "correct the request; see docs/provider.md for each endpoint's body",
    "NotFound": "check the customer or transaction id; see docs/provider.md for the endpoints",
    "InsufficientFunds": "fund the customer's account first (POST /v1/customers/{id}/fund)",
    "ProtocolError": "start a new transaction with a new id; do not reuse one",
    "Unauthorized": "send an operator key: Authorization: Bearer <key> (meter provider keys add)",
    "Forbidden": "use a key with the operator role",
    "UnsupportedMediaType": "send application/json",
    "MethodNotAllowed": "see docs/provider.md for the endpoints",
    "Unavailable": "try again shortly; if it persists, ask the provider's operator",
    "InternalError": "try again; if it persists, ask the provider's operator",
}
_STATUS = {
    InvalidInput: 400,
    InsufficientFunds: 409,
    ProtocolError: 409,
    AuthenticationFailed: 401,
    AccessDenied: 403,
    ConfigurationError: 503,
    TokenUnavailable: 503,
}
_HTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed", 400: "InvalidInput"}
_READERS = (KeyRole.OPERATOR, KeyRole.AUDITOR)


class Refused(Exception):
    """A request this service refuses: the status, the kind and what is wrong."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass(frozen=True)
class ProviderContext:
    """What every route works with."""

    config: ProviderConfig
    ledger: Ledger
    provider: Provider
    keys: ApiKeys
    clock: Callable[[], datetime]

    def now(self) -> datetime:
        return self.clock().astimezone(UTC)


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    next_step = NEXT_STEPS.get(kind, "see docs/provider.md")
    headers = {"WWW-Authenticate": 'Bearer realm="provider"'} if status == 401 else None
    return JSONResponse(
        {"error": kind, "message": message, "next_step": next_step},
        status_code=status,
        headers=headers,
    )


def context(request: Request) -> ProviderContext:
    found = request.app.state.provider
    assert isinstance(found, ProviderContext)
    return found


def require_key(request: Request, *roles: KeyRole) -> ApiKey:
    """The key the request presents, if it is active and has one of ``roles``."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Refused(401, "Unauthorized", "this needs a provider key: Authorization: Bearer <key>")
    try:
        return context(request).keys.require(key, *roles)
    except AuthenticationFailed as exc:
        raise Refused(401, "Unauthorized", str(exc)) from exc
    except AccessDenied as exc:
        raise Refused(403, "Forbidden", str(exc)) from exc


def transaction_json(t: Transaction) -> dict[str, Any]:
    return {
        "transaction_id": t.transaction_id.hex(),
        "customer": t.customer,
        "device_serial": t.device_serial,
        "amount": t.amount,
        "state": t.state.value,
        "prepared_at": t.prepared_at.isoformat(),
        "expires_at": t.expires_at.isoformat(),
        "settled_at": t.settled_at.isoformat() if t.settled_at else None,
        "receipt": t.receipt.hex() if t.receipt is not None else None,
        "reason": t.reason,
    }


def create_provider_app(
    config: ProviderConfig,
    ledger: Ledger,
    provider: Provider,
    *,
    clock: Callable[[], datetime] | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The service over an open ledger and the provider's open token (both the caller's:
    it closes them after the app's lifespan, as `meter provider serve` does)."""
    state = ProviderContext(
        config, ledger, provider, ApiKeys(config.keys), clock or (lambda: datetime.now(UTC))
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="Provider service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.provider = state
    app.add_middleware(RequestGuard, config=config.guard_config(), refused=lambda _: None)

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return error_response(exc.status, exc.kind, exc.message)

    @app.exception_handler(Rejected)
    async def rejected(_: Request, exc: Rejected) -> JSONResponse:
        return error_response(exc.status, exc.kind, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "InvalidInput")
        return error_response(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "InvalidInput", "the request does not fit this endpoint")

    @app.exception_handler(MeterError)
    async def failed(_: Request, exc: MeterError) -> JSONResponse:
        status = next((s for kind, s in _STATUS.items() if isinstance(exc, kind)), 500)
        return error_response(status, type(exc).__name__, str(exc))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "InternalError", "the service failed on this request")

    app.include_router(_health_routes())
    app.include_router(_customer_routes())
    for router in routers:
        app.include_router(router)
    return app


def _health_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return router


def _customer_routes() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/customers", status_code=201)
    async def create_customer(request: Request) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        body = _members(await json_body(request), {"customer": str, "name": str})
        ctx = context(request)
        await run_in_threadpool(
            ctx.ledger.create_customer, body["customer"], body["name"], ctx.now()
        )
        return {"customer": body["customer"], "name": body["name"], "available": 0}

    @router.post("/customers/{customer}/fund")
    async def fund(request: Request, customer: str) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        body = _members(await json_body(request), {"amount": int, "reference": str})
        ctx = context(request)
        available = await run_in_threadpool(
            ctx.ledger.fund, customer, body["amount"], body["reference"], ctx.now()
        )
        return {"customer": customer, "amount": body["amount"], "available": available}

    @router.get("/customers/{customer}")
    async def account(request: Request, customer: str) -> dict[str, Any]:
        require_key(request, *_READERS)
        ledger = context(request).ledger

        def read() -> dict[str, Any]:
            try:
                found = ledger.account(customer)
            except InvalidInput as exc:  # the one refusal of account(): no such customer
                raise Refused(404, "NotFound", str(exc)) from exc
            return {
                "customer": found.customer,
                "name": found.name,
                "available": found.available,
                "funded": found.funded,
                "refunded": found.refunded,
                "reserved": found.reserved,
                "credited": found.credited,
                "created_at": found.created_at.isoformat(),
                "meters": list(found.meters),
                "transactions": [transaction_json(t) for t in ledger.transactions_of(customer)],
            }

        return await run_in_threadpool(read)

    @router.post("/customers/{customer}/meters", status_code=201)
    async def authorize(request: Request, customer: str) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        body = _members(await json_body(request), {"device_serial": int})
        ctx = context(request)
        record = await run_in_threadpool(
            authorize_meter, ctx.provider, ctx.ledger, customer, body["device_serial"], ctx.now()
        )
        return {"authorization": record.to_json()}

    @router.get("/transactions/{transaction_id}")
    async def transaction(request: Request, transaction_id: str) -> dict[str, Any]:
        require_key(request, *_READERS)
        try:
            raw = bytes.fromhex(transaction_id)
        except ValueError:
            raw = b""
        if len(raw) != 16:
            raise Refused(400, "InvalidInput", "a transaction id is 32 hexadecimal digits")
        found = await run_in_threadpool(context(request).ledger.transaction, raw)
        if found is None:
            raise Refused(404, "NotFound", f"no transaction {transaction_id} in this ledger")
        return transaction_json(found)

    return router


def _members(body: Any, members: dict[str, type]) -> dict[str, Any]:
    """A JSON object with exactly these members of these types (bool is no integer)."""
    shape = ", ".join(f'"{name}": {kind.__name__}' for name, kind in members.items())
    if not isinstance(body, dict) or set(body) != set(members):
        raise Refused(400, "InvalidInput", f"the body must be {{{shape}}}")
    for name, kind in members.items():
        value = body[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise Refused(400, "InvalidInput", f"member {name!r} must be a {kind.__name__}")
    return body
