"""``meter users``: View, Create, Modify and Delete User, and Change User Password.

Clients of the running device, as every device command (meter.cli.device_cli); new
passwords come from METER_NEW_PASSWORD or a prompt, never from a flag.
"""

from __future__ import annotations

import click

from meter.cli.common import emit, errors
from meter.cli.device_cli import new_password, run_service, show
from meter.cli.device_session import PASSWORD_VARIABLE, device
from meter.cli.home import password_from_env
from meter.psd.roles import Role

__all__ = ["register"]


def register(cli: click.Group) -> None:
    """Add the ``users`` group to the ``meter`` group."""

    @cli.group()
    def users() -> None:
        """View, create, modify and delete users; change your own password."""

    @users.command("list")
    @click.pass_context
    def users_list(ctx: click.Context) -> None:
        """View Users."""
        with errors(ctx), device(ctx) as client:
            found = client.get("/v1/users")["users"]
            emit(
                ctx,
                {"users": found},
                lambda: "\n".join(f"{u['user_id']:<20} {u['role']}" for u in found),
            )

    role_choice = click.Choice([r.value for r in Role if r is not Role.NO_ROLE])

    @users.command("create")
    @click.argument("user_id")
    @click.option("--role", type=role_choice, required=True)
    @click.pass_context
    def users_create(ctx: click.Context, user_id: str, role: str) -> None:
        """Create User (Administrator): the new password from METER_NEW_PASSWORD or a prompt."""
        with errors(ctx), device(ctx) as client:
            password = new_password(f"password for new user '{user_id}'")
            body = {"user_id": user_id, "role": role, "password": password}
            show(ctx, client.post("/v1/users", body))

    @users.command("modify")
    @click.argument("user_id")
    @click.option("--role", type=role_choice, required=True)
    @click.pass_context
    def users_modify(ctx: click.Context, user_id: str, role: str) -> None:
        """Modify User (Administrator): new role, new password (METER_NEW_PASSWORD or prompt)."""
        with errors(ctx), device(ctx) as client:
            password = new_password(f"new password for '{user_id}'")
            body = {"role": role, "password": password}
            show(ctx, client.call("PUT", f"/v1/users/{_path_part(user_id)}", body))

    @users.command("delete")
    @click.argument("user_id")
    @click.pass_context
    def users_delete(ctx: click.Context, user_id: str) -> None:
        """Delete User (Administrator): removes the user and their PIN slot."""
        run_service(ctx, lambda client: client.call("DELETE", f"/v1/users/{_path_part(user_id)}"))

    @users.command("passwd")
    @click.pass_context
    def users_passwd(ctx: click.Context) -> None:
        """Change User Password: yours (old from METER_PASSWORD, new from METER_NEW_PASSWORD)."""
        with errors(ctx), device(ctx) as client:
            user = ctx.find_root().obj.get("user") or ""
            old = password_from_env(PASSWORD_VARIABLE, f"current password of '{user}'")
            body = {"old_password": old, "new_password": new_password("new password")}
            show(ctx, client.post("/v1/password", body))


def _path_part(user_id: str) -> str:
    from urllib.parse import quote

    return quote(user_id, safe="")
