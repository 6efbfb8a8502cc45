"""The device's services as ``meter`` commands: one command per service of Table 2.

Each command runs its service through the firmware (meter.psd.firmware.PSD),
which checks the role of the user named by ``--user``; this module only
parses and prints. ``meter policy`` prints the matrix the firmware enforces.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from meter.cli import workflows
from meter.cli.common import emit, errors, home_of, parse_postage
from meter.cli.device_session import PASSWORD_VARIABLE, device
from meter.cli.home import password_from_env
from meter.errors import InvalidInput
from meter.psd.firmware import PSD
from meter.psd.roles import MATRIX, TABLE_2, Role, allowed

__all__ = ["policy_matrix", "register"]

NEW_PASSWORD_VARIABLE = "METER_NEW_PASSWORD"


def policy_matrix() -> dict[str, Any]:
    """Role x service -> allowed, computed by the same function the firmware calls."""
    return {
        "roles": [r.value for r in Role],
        "services": [
            {
                "service": s.value,
                "title": s.display,
                "table_2": s in TABLE_2,
                "allowed": {r.value: allowed(r, s) for r in Role},
            }
            for s in MATRIX
        ],
    }


def _policy_text(matrix: dict[str, Any]) -> str:
    roles = [Role(r) for r in matrix["roles"]]
    head = "service".ljust(30) + " ".join(_ABBREVIATIONS[r] for r in roles)
    rows = [head]
    for entry in matrix["services"]:
        marks = " ".join(("X" if entry["allowed"][r.value] else ".").center(2) for r in roles)
        note = "" if entry["table_2"] else "  (section 4, Auditor)"
        rows.append(entry["title"].ljust(30) + marks + note)
    rows.append("")
    rows.append("  ".join(f"{_ABBREVIATIONS[r]}={r.display}" for r in roles))
    return "\n".join(rows)


_ABBREVIATIONS = {
    Role.ADMINISTRATOR: "AD",
    Role.AUDITOR: "AU",
    Role.CERTIFICATE_AUTHORITY: "CA",
    Role.CUSTOMER: "CU",
    Role.KEY_CUSTODIAN: "KC",
    Role.PROVIDER: "PR",
    Role.SECURITY_OFFICER: "SO",
    Role.NO_ROLE: "NR",
}


def _run(ctx: click.Context, call: Callable[[PSD], dict[str, Any]]) -> None:
    """Power up, log --user on, call one service, print its result, power down."""
    with errors(ctx), device(ctx, home_of(ctx)) as psd:
        _show(ctx, call(psd))


def _show(ctx: click.Context, data: dict[str, Any]) -> None:
    emit(ctx, data, lambda: "\n".join(f"{k}: {_plain(v)}" for k, v in data.items()))


def _plain(value: object) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _new_password(what: str) -> str:
    return password_from_env(NEW_PASSWORD_VARIABLE, what, confirm=True)


def register(cli: click.Group) -> None:
    """Add every device service to the ``meter`` group."""

    @cli.command()
    @click.pass_context
    def policy(ctx: click.Context) -> None:
        """Print the role x service matrix the device enforces (Table 2)."""
        matrix = policy_matrix()
        emit(ctx, matrix, lambda: _policy_text(matrix))

    @cli.command()
    @click.pass_context
    def logon(ctx: click.Context) -> None:
        """Logon as --user (password from METER_PASSWORD or a prompt)."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            if ctx.find_root().obj.get("user") is None:
                raise InvalidInput("logon needs --user (or METER_USER)")
            _show(ctx, psd.session_info())

    @cli.command()
    @click.pass_context
    def logoff(ctx: click.Context) -> None:
        """Logoff: end the session."""
        _run(ctx, PSD.logoff)

    @cli.command()
    @click.pass_context
    def session(ctx: click.Context) -> None:
        """Session Management: who is logged on, for how long, and the idle timeout."""
        _run(ctx, PSD.session_management)

    @cli.command()
    @click.pass_context
    def status(ctx: click.Context) -> None:
        """Request Status: user, module state, session, keys, registers, piece count, time."""
        _run(ctx, PSD.request_status)

    @cli.command("psd-status")
    @click.pass_context
    def psd_status(ctx: click.Context) -> None:
        """Retrieve PSD Status (Customer): registers and piece count."""
        _run(ctx, PSD.retrieve_psd_status)

    @cli.command("public-key")
    @click.pass_context
    def public_key(ctx: click.Context) -> None:
        """Retrieve PSD Public Key: the signing key and certificate (no logon needed)."""
        _run(ctx, PSD.retrieve_psd_public_key)

    @cli.command("device-audit")
    @click.pass_context
    def device_audit(ctx: click.Context) -> None:
        """Request Device Audit: rerun the self-tests and report the device's figures."""
        _run(ctx, PSD.request_device_audit)

    @cli.group()
    def users() -> None:
        """View, create, modify and delete users; change your own password."""

    @users.command("list")
    @click.pass_context
    def users_list(ctx: click.Context) -> None:
        """View Users."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            found = psd.view_users()
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
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            password = _new_password(f"password for new user '{user_id}'")
            _show(ctx, psd.create_user(user_id, Role(role), password))

    @users.command("modify")
    @click.argument("user_id")
    @click.option("--role", type=role_choice, required=True)
    @click.pass_context
    def users_modify(ctx: click.Context, user_id: str, role: str) -> None:
        """Modify User (Administrator): new role, new password (METER_NEW_PASSWORD or prompt)."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            password = _new_password(f"new password for '{user_id}'")
            _show(ctx, psd.modify_user(user_id, Role(role), password))

    @users.command("delete")
    @click.argument("user_id")
    @click.pass_context
    def users_delete(ctx: click.Context, user_id: str) -> None:
        """Delete User (Administrator): removes the user and their PIN slot."""
        _run(ctx, lambda psd: psd.delete_user(user_id))

    @users.command("passwd")
    @click.pass_context
    def users_passwd(ctx: click.Context) -> None:
        """Change User Password: yours (old from METER_PASSWORD, new from METER_NEW_PASSWORD)."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            user = ctx.find_root().obj.get("user") or ""
            old = password_from_env(PASSWORD_VARIABLE, f"current password of '{user}'")
            _show(ctx, psd.change_user_password(old, _new_password("new password")))

    @cli.command()
    @click.option(
        "--action",
        type=click.Choice(["list", "activate-signing-key", "deactivate-signing-key"]),
        default="list",
        show_default=True,
    )
    @click.pass_context
    def keys(ctx: click.Context, action: str) -> None:
        """Key Administration (Security Officer): the keys and their state."""
        _run(ctx, lambda psd: psd.key_administration(action))

    @cli.command("authorize-administration")
    @click.option("--revoke", is_flag=True, help="Withdraw the authorization instead.")
    @click.pass_context
    def authorize_administration(ctx: click.Context, revoke: bool) -> None:
        """Administration Authorization (Security Officer): may administrators manage users?"""
        _run(ctx, lambda psd: psd.administration_authorization(not revoke))

    @cli.command("update-psc")
    @click.argument("version")
    @click.pass_context
    def update_psc(ctx: click.Context, version: str) -> None:
        """Update PSC (Security Officer): record a newer firmware version."""
        _run(ctx, lambda psd: psd.update_psc(version))

    @cli.command("set-clock")
    @click.argument("time")
    @click.pass_context
    def set_clock(ctx: click.Context, time: str) -> None:
        """Set Clock (Administrator): TIME as ISO 8601 with a zone, e.g. 2026-11-22T10:00:00Z."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            try:
                to = datetime.fromisoformat(time)
            except ValueError as exc:
                raise InvalidInput(f"time '{time}' is not ISO 8601") from exc
            _show(ctx, psd.set_clock(to))

    @cli.command("authorize-psd")
    @click.option(
        "--meter-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
    )
    @click.option(
        "--provider-cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
    )
    @click.option(
        "--root-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
    )
    @click.pass_context
    def authorize_psd(
        ctx: click.Context, meter_cert: Path, provider_cert: Path, root_cert: Path
    ) -> None:
        """Authorize PSD (Certificate Authority): load the meter's certificate chain."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            _show(
                ctx,
                psd.authorize_psd(
                    meter_cert.read_bytes(), provider_cert.read_bytes(), root_cert.read_bytes()
                ),
            )

    @cli.command("authorize-customer")
    @click.argument("account")
    @click.pass_context
    def authorize_customer(ctx: click.Context, account: str) -> None:
        """Authorize Customer (Provider): the customer account this device mails for."""
        _run(ctx, lambda psd: psd.authorize_customer(account))

    @cli.command()
    @click.argument("amount")
    @click.pass_context
    def credit(ctx: click.Context, amount: str) -> None:
        """Download Postage Value (Provider): AMOUNT dollars from the provider, e.g. 100.00."""
        with errors(ctx):
            home = home_of(ctx)
            with device(ctx, home) as psd:
                result = psd.download_postage_value(
                    workflows.local_provider_grant(home, parse_postage(amount))
                )
            emit(
                ctx,
                result,
                lambda: (
                    f"credited {workflows.format_mills(int(result['amount']))}; descending "
                    f"register {workflows.format_mills(int(result['descending']))}"
                ),
            )

    @cli.command()
    @click.pass_context
    def withdraw(ctx: click.Context) -> None:
        """Withdraw PSD (Provider): take the device out of service for good."""
        _run(ctx, PSD.withdraw_psd)

    @cli.command("key-exchange")
    @click.pass_context
    def key_exchange(ctx: click.Context) -> None:
        """Key Exchange (Key Custodian): the device's key-agreement public key."""
        _run(ctx, PSD.key_exchange)

    @cli.command()
    @click.pass_context
    def shell(ctx: click.Context) -> None:
        """One session for many commands: `meter --user X shell`, then e.g. `status`, `logoff`."""
        with errors(ctx):
            home = home_of(ctx)
            with device(ctx, home) as psd:
                _repl(ctx, psd)

    def _repl(ctx: click.Context, psd: PSD) -> None:
        root = ctx.find_root()
        root.obj["psd"] = psd
        try:
            while True:
                try:
                    line = input("meter> ")
                except EOFError:
                    break
                words = shlex.split(line)
                if not words:
                    continue
                if words[0] in ("exit", "quit"):
                    break
                try:
                    cli.main(words, prog_name="meter", obj=root.obj, standalone_mode=False)
                except click.exceptions.Exit:
                    pass
                except click.ClickException as exc:
                    exc.show()
        finally:
            root.obj.pop("psd", None)


def add_audit_commands(audit: click.Group) -> None:
    """The Auditor's and Security Officer's audit services, on the `meter audit` group."""

    @audit.command("create-key")
    @click.pass_context
    def create_key(ctx: click.Context) -> None:
        """Create Audit Key (Security Officer): generated in the token, never leaves it."""
        _run(ctx, PSD.create_audit_key)

    @audit.command("export-key")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @click.pass_context
    def export_key(ctx: click.Context, out: Path | None) -> None:
        """Export Audit Key (Auditor): the public half, PEM."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            result = psd.export_audit_key()
            if out is not None:
                out.write_text(result["public_key_pem"])
                result["path"] = str(out)
            _show(ctx, result)

    @audit.command("view")
    @click.option("--since", type=int, default=None, help="First record index to show.")
    @click.pass_context
    def view(ctx: click.Context, since: int | None) -> None:
        """View the audit log (Auditor)."""
        with errors(ctx), device(ctx, home_of(ctx)) as psd:
            records = psd.view_audit_log(since)
            rows = [
                {
                    "index": r.index,
                    "at": r.at.isoformat(),
                    "user": r.user_id,
                    "role": r.role,
                    "service": r.service,
                    "outcome": r.outcome,
                    "kind": r.kind,
                    "values": dict(r.values),
                }
                for r in records
            ]
            emit(
                ctx,
                {"records": rows},
                lambda: "\n".join(
                    f"{r['index']:>6} {r['at']} {r['user'] or '-':<12} {r['role']:<22} "
                    f"{r['service']:<28} {r['outcome']} {_plain(r['values'])}"
                    for r in rows
                ),
            )

    @audit.command("save")
    @click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
    @click.pass_context
    def save(ctx: click.Context, path: Path) -> None:
        """Save the audit log with the chain's signature (Auditor)."""
        _run(ctx, lambda psd: psd.save_audit_log(path))

    @audit.command("archive")
    @click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
    @click.pass_context
    def archive(ctx: click.Context, path: Path) -> None:
        """Archive the records not archived yet to PATH (Auditor)."""
        _run(ctx, lambda psd: psd.archive_audit_log(path))

    @audit.command("delete")
    @click.pass_context
    def delete(ctx: click.Context) -> None:
        """Delete the records already archived (Auditor)."""
        _run(ctx, PSD.delete_audit_records)
