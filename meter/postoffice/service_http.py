"""The service's one error shape, and reading what a request sends.

Every refusal is ``{"error": <kind>, "message": <what is wrong>, "next_step":
<what to do>}`` with a 4xx or 5xx status, whatever refused it (a route, a
guard, the framework's 404 and 405, an unexpected failure).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

__all__ = [
    "Rejected",
    "batch_items",
    "error_response",
    "form_input",
    "from_hex",
    "hex_body",
    "json_body",
    "media_type",
    "non_empty",
]

# What a clerk or a client should do next, by kind, where the message alone does not say.
NEXT_STEPS = {
    "InvalidInput": "send the hex of one indicium, or a PNG, JPEG or TIFF image of the label",
    "BarcodeError": "rescan the label flat and in focus; if it still cannot be read, "
    "hold the piece for inspection",
    "PayloadTooLarge": "send a smaller image: a label scanned at 200 to 300 dpi",
    "UnsupportedMediaType": "send a PNG, JPEG or TIFF image, or the hex as JSON",
    "Unauthorized": "enter this station's key (meter postoffice stations add)",
    "Forbidden": "use a station key with the role this needs",
    "CrossOrigin": "use the clerk's page of this post office, not another site",
    "HostNotAllowed": "use the post office's own address (--allowed-host)",
    "Busy": "wait a moment and send it again",
    "Timeout": "send the whole request at once, and check the network",
    "ReplayStoreError": "check the piece again once the service is ready (/readyz)",
    "LedgerError": "the verdicts stand; ask the site's operator to look at the ledger",
    "NotFound": "see docs/postoffice.md for the endpoints",
    "MethodNotAllowed": "see docs/postoffice.md for the endpoints",
    "InternalError": "try again; if it persists, call the site's operator",
}
_DEFAULT_NEXT = "see docs/postoffice.md"


class Rejected(Exception):
    """A request the service refuses before verifying anything (or, for 503, cannot serve)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "InvalidInput",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}


def error_body(kind: str, message: str) -> dict[str, str]:
    return {"error": kind, "message": message, "next_step": NEXT_STEPS.get(kind, _DEFAULT_NEXT)}


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request) -> Any:
    if media_type(request) != "application/json":
        raise Rejected(415, "send application/json", "UnsupportedMediaType")
    try:
        return json.loads(await request.body())
    except RecursionError:
        # The C decoder recurses once per level: 100,000 levels would otherwise be a 500.
        raise Rejected(400, "request body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected(400, f"request body is not JSON: {exc}") from exc


async def form_input(request: Request) -> tuple[str, bytes | str]:
    """("image", the uploaded bytes) or ("hex", the text) from a multipart or urlencoded body."""
    try:
        form = await request.form(max_files=1, max_fields=1)
    except HTTPException as exc:
        raise Rejected(400, f"form body: {exc.detail}") from exc
    try:
        upload, text = form.get("file"), form.get("hex")
        if isinstance(upload, UploadFile) and text is None:
            return "image", await upload.read()
        if isinstance(text, str) and upload is None:
            return "hex", text
    finally:
        await form.close()
    raise Rejected(400, 'form body must hold either a "file" (label image) or a "hex" field')


def batch_items(body: Any, limit: int) -> list[bytes]:
    if not isinstance(body, dict) or set(body) != {"items"} or not isinstance(body["items"], list):
        raise Rejected(400, 'JSON body must be {"items": ["<hex>", ...]}')
    items = body["items"]
    if not items:
        raise Rejected(400, "items is empty: nothing to verify")
    if len(items) > limit:
        raise Rejected(400, f"{len(items)} items: at most {limit} per batch, split the batch")
    decoded = []
    for number, item in enumerate(items):
        if not isinstance(item, str):
            raise Rejected(400, f"items[{number}] is not a string of hexadecimal")
        decoded.append(from_hex(item, f"items[{number}]"))
    return decoded


def hex_body(body: Any) -> bytes:
    if not isinstance(body, dict) or set(body) != {"hex"} or not isinstance(body["hex"], str):
        raise Rejected(400, 'JSON body must be {"hex": "<indicium in hexadecimal>"}')
    return from_hex(body["hex"], "hex")


def from_hex(text: str, what: str) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise Rejected(400, f"{what} is empty: nothing to verify")
    try:
        return bytes.fromhex(compact)
    except ValueError:
        digits = len(compact)
        if digits % 2 and all(c in "0123456789abcdefABCDEF" for c in compact):
            raise Rejected(400, f"{what} has an odd number of hex digits ({digits})") from None
        raise Rejected(400, f"{what} is not hexadecimal") from None


def non_empty(data: bytes, what: str) -> bytes:
    if not data:
        raise Rejected(400, f"{what} is empty: nothing to verify")
    return data
