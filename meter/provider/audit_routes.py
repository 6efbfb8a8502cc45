"""The provider service's routes for device audits and withdrawals (docs/withdrawal.md).

Added to the app with ``create_provider_app(..., routers=[audit_router(path)])``:

- ``POST /v1/audits/nonce`` ``{"device_serial": N}``: a fresh nonce (hex) for one audit.
- ``POST /v1/audits`` ``{"report": {...}, "meter_certificate_pem": PEM,
  "post_office": {...}}`` (`meter postoffice reconcile --json`), or with
  ``"without_post_office": true`` instead (the operator's explicit waiver, recorded):
  a routine audit; the signed acknowledgement the meter takes
  (POST /v1/device-audit/acknowledgement). Neither, or both: 400, nothing consumed.
- ``POST /v1/withdrawals`` (same body): a withdrawal's final audit and the refund; the
  ``withdrawal`` acknowledgement that completes Withdraw PSD on the meter.
- ``GET /v1/withdrawals/{serial}/acknowledgement``: the withdrawal acknowledgement of the
  recorded (refunded) final audit, signed again, for a meter that lost it in a crash.
- ``POST /v1/withdrawals/{serial}/revocation``: the meter's certificate revoked.
- ``GET /v1/revocations``: the provider-signed revocation export for post offices.

Writes need an operator key, the export an operator's or auditor's. The nonces live in
the router's audit desk, one per app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from meter.errors import InvalidInput
from meter.postoffice.service_http import json_body
from meter.protocol.device_audit import DeviceAuditReport
from meter.provider.api_keys import KeyRole
from meter.provider.audits import (
    WITHOUT_POST_OFFICE,
    AuditDesk,
    PostOffice,
    PostOfficeFigures,
    require_post_office,
)
from meter.provider.http import ProviderContext, context, require_key
from meter.provider.withdrawal import RevocationBook, Withdrawals

__all__ = ["audit_router"]

_MAX_SERIAL = 2**64 - 1


def audit_router(revocations: Path) -> APIRouter:
    """The routes, with the provider's revocation list kept in the file ``revocations``."""
    router = APIRouter(prefix="/v1", tags=["audits"])
    desks: dict[int, Withdrawals] = {}  # one per provider context (the app's)

    def withdrawals_of(ctx: ProviderContext) -> Withdrawals:
        found = desks.get(id(ctx))
        if found is None:
            provider = ctx.provider
            desk = AuditDesk(
                ctx.ledger,
                provider.certificate,
                provider.signer(),
                provider.authorization_id,
                local_credited=lambda serial: provider.local_credited(serial, ctx.ledger),
            )
            found = desks[id(ctx)] = Withdrawals(desk, RevocationBook(revocations))
        return found

    @router.post("/audits/nonce")
    async def nonce(request: Request) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        serial = _serial(await json_body(request))
        ctx = context(request)
        made = await run_in_threadpool(withdrawals_of(ctx).desk.new_nonce, serial, ctx.now())
        return {"device_serial": serial, "nonce_hex": made.hex()}

    @router.post("/audits")
    async def audit(request: Request) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        report, cert, post_office = _audit_body(await json_body(request))
        ctx = context(request)
        ack = await run_in_threadpool(
            withdrawals_of(ctx).desk.audit, report, cert, ctx.now(), post_office
        )
        return {"acknowledgement": ack.to_json()}

    @router.post("/withdrawals")
    async def withdraw(request: Request) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        report, cert, post_office = _audit_body(await json_body(request))
        ctx = context(request)
        ack = await run_in_threadpool(
            withdrawals_of(ctx).final_audit, report, cert, ctx.now(), post_office
        )
        return {"acknowledgement": ack.to_json(), "refund": ack.descending}

    @router.get("/withdrawals/{device_serial}/acknowledgement")
    async def acknowledgement(request: Request, device_serial: int) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        ctx = context(request)
        ack = await run_in_threadpool(
            withdrawals_of(ctx).acknowledgement, _path_serial(device_serial), ctx.now()
        )
        return {"acknowledgement": ack.to_json(), "refund": ack.descending}

    @router.post("/withdrawals/{device_serial}/revocation")
    async def revoke(request: Request, device_serial: int) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR)
        ctx = context(request)
        at = await run_in_threadpool(withdrawals_of(ctx).revoke, device_serial, ctx.now())
        return {"device_serial": device_serial, "revoked_at": at.isoformat()}

    @router.get("/revocations")
    async def export(request: Request) -> dict[str, Any]:
        require_key(request, KeyRole.OPERATOR, KeyRole.AUDITOR)
        ctx = context(request)
        signed = await run_in_threadpool(withdrawals_of(ctx).export_revocations, ctx.now())
        return signed.to_json()

    return router


def _path_serial(serial: int) -> int:
    if not 0 < serial <= _MAX_SERIAL:
        raise InvalidInput(f"device serial {serial} must be 1 to {_MAX_SERIAL}")
    return serial


def _serial(body: Any) -> int:
    serial = body.get("device_serial") if isinstance(body, dict) else None
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial <= _MAX_SERIAL:
        raise InvalidInput('the body must be {"device_serial": N}, N a meter\'s serial')
    return serial


def _audit_body(body: Any) -> tuple[DeviceAuditReport, x509.Certificate, PostOffice]:
    if not isinstance(body, dict) or not {"report", "meter_certificate_pem"} <= set(body):
        raise InvalidInput(
            "the body must hold 'report' (the meter's signed report), "
            "'meter_certificate_pem', and 'post_office' (a reconciliation export) or "
            "'without_post_office': true"
        )
    unknown = set(body) - {"report", "meter_certificate_pem", *_POST_OFFICE_MEMBERS}
    if unknown:
        raise InvalidInput(f"unknown members {sorted(unknown)}")
    if not isinstance(body["report"], dict):
        raise InvalidInput("'report' must be the meter's signed report, a JSON object")
    report = DeviceAuditReport.from_json(body["report"], "the report")
    pem = body["meter_certificate_pem"]
    try:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else b"")
    except ValueError as exc:
        raise InvalidInput("'meter_certificate_pem' is not a PEM certificate") from exc
    return report, cert, _post_office(body, report.device_serial)


_POST_OFFICE_MEMBERS = ("post_office", "without_post_office")


def _post_office(body: dict[str, Any], device_serial: int) -> PostOffice:
    """The post office's reconciliation, or the operator's explicit waiver: exactly one."""
    given = [name for name in _POST_OFFICE_MEMBERS if body.get(name) is not None]
    if len(given) > 1:
        raise InvalidInput("give 'post_office' or 'without_post_office', not both")
    waived = body.get("without_post_office")
    if waived is not None:
        if waived is not True:
            raise InvalidInput("'without_post_office' must be true (or left out)")
        return WITHOUT_POST_OFFICE
    figures = body.get("post_office")
    if figures is not None and not isinstance(figures, dict):
        raise InvalidInput("'post_office' must be a reconciliation export, a JSON object")
    if figures is None:
        return require_post_office(None)  # refused, with the reason
    return PostOfficeFigures.from_reconciliation(
        figures, device_serial, "the post office's reconciliation"
    )
