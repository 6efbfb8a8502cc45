"""The device API's audit routes: Request Device Audit and the provider's acknowledgement,
Withdraw PSD (docs/withdrawal.md), and the Auditor's services over the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from meter.protocol.device_audit import AuditAcknowledgement, nonce_from_hex
from meter.psd.firmware import PSD
from meter.psd.server_bodies import AcknowledgementBody, DeviceAuditBody, WithdrawBody
from meter.psd.server_calls import Runner

__all__ = ["register_audit_log", "register_device_audit", "register_withdrawal"]


def register_device_audit(app: FastAPI, run: Runner) -> None:
    """Request Device Audit (No-Role): the signed report, then the acknowledgement."""

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


def register_withdrawal(app: FastAPI, run: Runner) -> None:
    """Withdraw PSD (Provider): the final audit, then the keys."""

    @app.post("/v1/withdraw", summary="Withdraw PSD (Provider): final audit, then keys")
    async def withdraw(request: Request, body: WithdrawBody | None = None) -> dict[str, Any]:
        nonce = nonce_from_hex(body.nonce_hex) if body and body.nonce_hex is not None else None
        ack = (
            AuditAcknowledgement.from_json(body.acknowledgement, "the acknowledgement")
            if body and body.acknowledgement is not None
            else None
        )
        return await run(request, lambda p: p.withdraw_psd(nonce, ack))


def register_audit_log(app: FastAPI, run: Runner) -> None:
    """The Auditor's services: the audit key, the log, its sealed export and archive."""

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
