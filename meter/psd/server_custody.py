"""The device API's Key Custodian routes: Key Exchange, and the key ceremonies
(docs/custody.md) the Security Officer authorizes and the Key Custodians carry out."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from meter.errors import InvalidInput
from meter.psd.firmware import PSD
from meter.psd.server_bodies import (
    CeremonyBody,
    CeremonyExportBody,
    CeremonyImportBody,
    CeremonyTranscriptBody,
)
from meter.psd.server_calls import Runner

__all__ = ["register_custody"]


def register_custody(app: FastAPI, run: Runner) -> None:
    """Key Exchange, then ``/v1/ceremony/*``: authorize, export, finish a move, sign the
    transcript, import."""

    @app.post("/v1/key-exchange", summary="Key Exchange (Key Custodian)")
    async def key_exchange(request: Request) -> dict[str, Any]:
        return await run(request, PSD.key_exchange)

    # -- key ceremonies: the Security Officer's and the Key Custodians'
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


def _transport_key(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise InvalidInput("the transport key is not 64 hex digits") from exc
