"""The device API's reload routes (docs/reload-protocol.md): Download Postage Value over
the provider's two-phase protocol, and the reload key the Certificate Authority certifies."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from meter.errors import ProtocolError
from meter.psd.firmware import PSD
from meter.psd.server_bodies import ReloadBeginBody, ReloadCertificateBody, ReloadMessageBody
from meter.psd.server_calls import Runner

__all__ = ["register_reload"]


def register_reload(app: FastAPI, run: Runner) -> None:
    """``/v1/reload/*``: the hello, each next message, the end; the reload key and its
    certificate."""

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
