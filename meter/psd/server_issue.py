"""Create Indicium over the device API: its routes, and the fast path that serves them.

One call per piece is the device's hot path; `IssueFastPath` takes ``POST /v1/indicia``
and ``POST /v1/indicia/batch`` straight to the firmware, and the routes `register_issue`
adds describe them in the OpenAPI document (and would serve them otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from meter.errors import MeterError
from meter.indicium import Indicium
from meter.protocol.batch import MAX_BATCH_REQUEST_BYTES
from meter.psd.device import SignedBatch
from meter.psd.host_session import Credential, Peer
from meter.psd.server_bodies import BatchBody, Body, IssueBody
from meter.psd.server_calls import FirmwareThread, credential_of, error_response, peer_of

__all__ = ["BATCH_PATH", "IssueFastPath", "register_issue"]

BATCH_PATH = "/v1/indicia/batch"  # the one route with a larger limit (MAX_BATCH_REQUEST_BYTES)


def register_issue(app: FastAPI, firmware: FirmwareThread) -> None:
    """Create Indicium, one piece or a batch (Customer)."""

    @app.post("/v1/indicia", summary="Create Indicium / Create Correction Indicium (Customer)")
    async def indicia(request: Request, body: IssueBody) -> dict[str, Any]:
        # Served by IssueFastPath; this route documents it (and would serve it otherwise).
        scope = request.scope
        return await _issue(firmware, body, credential_of(scope), peer_of(scope))

    @app.post(
        "/v1/indicia/batch",  # BATCH_PATH, spelled out: tests read the routes from here
        summary="Create Indicium for a batch (Customer): one durable debit for all pieces",
        response_class=JSONResponse,
    )
    async def indicia_batch(request: Request, body: BatchBody) -> JSONResponse:
        # Served by IssueFastPath; this route documents it (and would serve it otherwise).
        scope = request.scope
        answer = await _issue_batch(firmware, body, credential_of(scope), peer_of(scope))
        # Straight to JSON: FastAPI's encoder would walk a thousand entries one by one.
        return JSONResponse(answer)


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


_Handler = Callable[[FirmwareThread, Any, Credential | None, Peer | None], Awaitable[Any]]


class IssueFastPath:
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
            answer = await handler(self._firmware, parsed, credential_of(scope), peer_of(scope))
        except MeterError as exc:
            response = error_response(exc)
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
