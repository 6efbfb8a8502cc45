"""The device API's administration routes: users, the Security Officer's services, the
clock, and the authorizations the Certificate Authority and the Provider install."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from meter.psd.firmware import PSD
from meter.psd.server_bodies import (
    AuthorizationBody,
    BundleBody,
    CertificatesBody,
    ClockBody,
    CustomerBody,
    KeyAdministrationBody,
    ModifyUserBody,
    PasswordBody,
    UserBody,
)
from meter.psd.server_calls import Runner

__all__ = ["register_administration"]


def register_administration(app: FastAPI, run: Runner) -> None:
    """View/Create/Modify/Delete User, Change User Password, Key Administration,
    Administration Authorization, Create Audit Key, Update PSC, Set Clock, Authorize PSD
    and Authorize Customer."""

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
