"""The device's services as ``meter`` commands: one command per service of Table 2.

Each command is a client of the running device (meter.host.DeviceClient):
the device's firmware checks the role of the user named by ``--user`` and
audits the call; this module only parses and prints. ``meter policy``
prints the matrix the firmware enforces.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from meter.cli import workflows
from meter.cli.common import emit, errors, home_of, parse_postage
from meter.cli.device_session import PASSWORD_VARIABLE, device
from meter.cli.home import password_from_env
from meter.durable import write_atomically
from meter.errors import ConfigurationError, InvalidInput
from meter.host import DeviceClient
from meter.psd.roles import ISSUING_SERVICES, MATRIX, TABLE_2, Role, Service, allowed

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
                "source": _source(s),
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
        note = _NOTES.get(entry["source"], "")
        rows.append(entry["title"].ljust(30) + marks + note)
    rows.append("")
    rows.append("  ".join(f"{_ABBREVIATIONS[r]}={r.display}" for r in roles))
    return "\n".join(rows)


_NOTES = {
    "section-4": "  (section 4, Auditor)",
    "batch": "  (Create Indicium, many at once)",
}


def _source(service: Service) -> str:
    """Where the policy gives a service: a Table 2 row, section 4, or a row's batch form."""
    if service in TABLE_2:
        return "table-2"
    return "batch" if service in ISSUING_SERVICES else "section-4"


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


def _run(ctx: click.Context, call: Callable[[DeviceClient], dict[str, Any]]) -> None:
    """Connect, log --user on, call one service, print its result, disconnect."""
    with errors(ctx), device(ctx) as client:
        _show(ctx, call(client))


def _get(path: str) -> Callable[[DeviceClient], dict[str, Any]]:
    return lambda client: dict(client.get(path))


def _post(path: str, body: dict[str, Any] | None = None) -> Callable[[DeviceClient], Any]:
    return lambda client: client.post(path, body)


def _save(path: Path, document: str, *, overwrite: bool) -> None:
    """An audit export or archive, whole or not at all; an archive never replaces a file."""
    try:
        write_atomically(path, document.encode("ascii"), overwrite=overwrite)
    except FileExistsError:
        raise InvalidInput(f"{path} exists already: choose a new archive file") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot write: {exc.strerror or exc}") from exc


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
        with errors(ctx):
            obj = ctx.find_root().obj
            user = obj.get("user")
            if user is None:
                raise InvalidInput("logon needs --user (or METER_USER)")
            running: DeviceClient | None = obj.get("client")
            if running is not None:  # in `meter shell`: a new session on the same connection
                user_password = password_from_env(PASSWORD_VARIABLE, f"password of user '{user}'")
                _show(ctx, running.logon(user, user_password))
                return
            with device(ctx) as client:
                _show(ctx, client.session or {})

    @cli.command()
    @click.pass_context
    def logoff(ctx: click.Context) -> None:
        """Logoff: end the session."""
        _run(ctx, DeviceClient.logoff)

    @cli.command()
    @click.pass_context
    def session(ctx: click.Context) -> None:
        """Session Management: who is logged on, for how long, and the idle timeout."""
        _run(ctx, _get("/v1/session"))

    @cli.command()
    @click.pass_context
    def status(ctx: click.Context) -> None:
        """Request Status: user, module state, session, keys, registers, piece count, time."""
        _run(ctx, _get("/v1/status"))

    @cli.command("psd-status")
    @click.pass_context
    def psd_status(ctx: click.Context) -> None:
        """Retrieve PSD Status (Customer): registers and piece count."""
        _run(ctx, _get("/v1/psd-status"))

    @cli.command("public-key")
    @click.pass_context
    def public_key(ctx: click.Context) -> None:
        """Retrieve PSD Public Key: the signing key and certificate (no logon needed)."""
        _run(ctx, _get("/v1/public-key"))

    _provider_option = click.option(
        "--provider",
        "provider_url",
        default=None,
        metavar="URL",
        help="The provider's service (http://host:port); its operator key from "
        "METER_PROVIDER_KEY or a prompt.",
    )
    _post_office_option = click.option(
        "--post-office",
        "post_office",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help="A post office's `meter postoffice reconcile --json` for the provider to check.",
    )

    @cli.command("device-audit")
    @_provider_option
    @_post_office_option
    @click.pass_context
    def device_audit(
        ctx: click.Context, provider_url: str | None, post_office: Path | None
    ) -> None:
        """Request Device Audit: rerun the self-tests and report the device's figures.

        With --provider URL, the provider's signed audit: its nonce, the device's
        signed report, the provider's check, its acknowledgement into the device
        (the inspection watchdog restarts). See docs/withdrawal.md.
        """
        from meter.cli.withdraw_cli import run_device_audit

        run_device_audit(ctx, provider_url, post_office)

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
            password = _new_password(f"password for new user '{user_id}'")
            body = {"user_id": user_id, "role": role, "password": password}
            _show(ctx, client.post("/v1/users", body))

    @users.command("modify")
    @click.argument("user_id")
    @click.option("--role", type=role_choice, required=True)
    @click.pass_context
    def users_modify(ctx: click.Context, user_id: str, role: str) -> None:
        """Modify User (Administrator): new role, new password (METER_NEW_PASSWORD or prompt)."""
        with errors(ctx), device(ctx) as client:
            password = _new_password(f"new password for '{user_id}'")
            body = {"role": role, "password": password}
            _show(ctx, client.call("PUT", f"/v1/users/{_path_part(user_id)}", body))

    @users.command("delete")
    @click.argument("user_id")
    @click.pass_context
    def users_delete(ctx: click.Context, user_id: str) -> None:
        """Delete User (Administrator): removes the user and their PIN slot."""
        _run(ctx, lambda client: client.call("DELETE", f"/v1/users/{_path_part(user_id)}"))

    @users.command("passwd")
    @click.pass_context
    def users_passwd(ctx: click.Context) -> None:
        """Change User Password: yours (old from METER_PASSWORD, new from METER_NEW_PASSWORD)."""
        with errors(ctx), device(ctx) as client:
            user = ctx.find_root().obj.get("user") or ""
            old = password_from_env(PASSWORD_VARIABLE, f"current password of '{user}'")
            body = {"old_password": old, "new_password": _new_password("new password")}
            _show(ctx, client.post("/v1/password", body))

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
        _run(ctx, _post("/v1/keys", {"action": action}))

    @cli.command("authorize-administration")
    @click.option("--revoke", is_flag=True, help="Withdraw the authorization instead.")
    @click.pass_context
    def authorize_administration(ctx: click.Context, revoke: bool) -> None:
        """Administration Authorization (Security Officer): may administrators manage users?"""
        _run(ctx, _post("/v1/administration", {"authorize": not revoke}))

    @cli.command("update-psc")
    @click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
    @click.pass_context
    def update_psc(ctx: click.Context, bundle: Path) -> None:
        """Update PSC (Security Officer): install a provider-signed update BUNDLE
        (as `meter update install`; docs/updates.md)."""
        with errors(ctx):
            try:
                text = bundle.read_bytes().decode("utf-8", errors="replace")
            except OSError as exc:
                raise InvalidInput(f"cannot read {bundle}: {exc.strerror or exc}") from exc
        _run(ctx, _post("/v1/psc", {"bundle": text}))

    @cli.command("set-clock")
    @click.argument("time")
    @click.pass_context
    def set_clock(ctx: click.Context, time: str) -> None:
        """Set Clock (Administrator): TIME as ISO 8601 with a zone, e.g. 2026-11-22T10:00:00Z."""
        with errors(ctx):
            try:
                to = datetime.fromisoformat(time)
            except ValueError as exc:
                raise InvalidInput(f"time '{time}' is not ISO 8601") from exc
            if to.tzinfo is None:
                raise InvalidInput(
                    "the new time must carry a time zone (e.g. 2026-11-22T10:00:00Z)"
                )
            _run(ctx, _post("/v1/clock", {"time": to.isoformat()}))

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
        with errors(ctx):
            body = {
                "meter_pem": _read_text(meter_cert),
                "provider_pem": _read_text(provider_cert),
                "root_pem": _read_text(root_cert),
            }
            _run(ctx, _post("/v1/certificates", body))

    @cli.command("authorize-customer")
    @click.argument(
        "record", required=False, type=click.Path(dir_okay=False, path_type=Path), default=None
    )
    @click.option(
        "--account",
        default=None,
        help="Have the home's development provider sign a record for ACCOUNT "
        "(needs PROVIDER_USER_PIN), instead of giving RECORD.",
    )
    @click.pass_context
    def authorize_customer(ctx: click.Context, record: Path | None, account: str | None) -> None:
        """Authorize Customer (Provider): install the provider-signed RECORD binding this
        device to a customer account (from `meter provider authorize-meter` or the
        provider service's POST /v1/customers/ID/meters)."""
        with errors(ctx):
            if (record is None) == (account is None):
                raise InvalidInput("give the provider's signed RECORD file, or --account ACCOUNT")
            if record is not None:
                try:
                    authorization = json.loads(record.read_bytes())
                except (OSError, ValueError) as exc:
                    raise InvalidInput(
                        f"{record}: not a JSON customer authorization ({exc})"
                    ) from exc
            else:
                assert account is not None
                authorization = workflows.local_customer_authorization(home_of(ctx), account)
            if isinstance(authorization, dict) and "authorization" in authorization:
                authorization = authorization["authorization"]  # the service's whole answer
        _run(ctx, _post("/v1/customer", {"authorization": authorization}))

    @cli.command()
    @click.argument("amount")
    @click.pass_context
    def credit(ctx: click.Context, amount: str) -> None:
        """Download Postage Value (Provider): AMOUNT dollars from the provider, e.g. 100.00."""
        with errors(ctx):
            home = home_of(ctx)
            mills = parse_postage(amount)
            with device(ctx) as client:
                result = workflows.credit_from_local_provider(client, home, mills)
            emit(
                ctx,
                result,
                lambda: (
                    f"credited {workflows.format_mills(int(result['amount']))}; descending "
                    f"register {workflows.format_mills(int(result['descending']))}"
                ),
            )

    @cli.command()
    @_provider_option
    @click.option(
        "--revocations-out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Also write the provider's signed revocation export here (for post offices).",
    )
    @_post_office_option
    @click.pass_context
    def withdraw(
        ctx: click.Context,
        provider_url: str | None,
        revocations_out: Path | None,
        post_office: Path | None,
    ) -> None:
        """Withdraw PSD (Provider): take the device out of service for good.

        Needs --provider URL and the device's Provider user (--user): final signed
        audit, refund, keys destroyed, revocation. Rerun after an interruption: it
        resumes at the step where it stopped. See docs/withdrawal.md.
        """
        from meter.cli.withdraw_cli import run_withdraw

        run_withdraw(ctx, provider_url, revocations_out, post_office)

    @cli.command("key-exchange")
    @click.pass_context
    def key_exchange(ctx: click.Context) -> None:
        """Key Exchange (Key Custodian): the device's key-agreement public key."""
        _run(ctx, _post("/v1/key-exchange"))

    @cli.command()
    @click.pass_context
    def shell(ctx: click.Context) -> None:
        """One session for many commands: `meter --user X shell`, then e.g. `status`, `logoff`."""
        with errors(ctx), device(ctx) as client:
            _repl(ctx, client)

    def _repl(ctx: click.Context, client: DeviceClient) -> None:
        root = ctx.find_root()
        # Every line runs with the options the shell was started with (--home, --profile,
        # --json); a line may still give its own, which come later and win.
        start = [
            "--home",
            str(root.obj["home_path"]),
            *(["--profile", str(root.obj["profile"])] if root.obj.get("profile") else []),
            *(["--json"] if root.obj.get("json") else []),
        ]
        user = root.obj.get("user")
        # A prompt only at a terminal: piped, the output is the commands' alone (JSON lines).
        prompt = "meter> " if sys.stdin.isatty() else ""
        try:
            while True:
                try:
                    line = input(prompt)
                except EOFError:
                    break
                try:
                    words = shlex.split(line)
                except ValueError as exc:
                    click.echo(f"error: {exc}", err=True)
                    continue
                if not words:
                    continue
                if words[0] in ("exit", "quit"):
                    break
                obj = {"client": client}
                try:
                    cli.main(
                        [*start, *(["--user", user] if user else []), *words],
                        prog_name="meter",
                        obj=obj,
                        standalone_mode=False,
                    )
                except click.exceptions.Exit:
                    pass
                except click.ClickException as exc:
                    exc.show()
        finally:
            root.obj.pop("client", None)


def _path_part(user_id: str) -> str:
    from urllib.parse import quote

    return quote(user_id, safe="")


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read it as a PEM file ({exc})") from exc


def add_audit_commands(audit: click.Group) -> None:
    """The Auditor's and Security Officer's audit services, on the `meter audit` group."""

    @audit.command("create-key")
    @click.pass_context
    def create_key(ctx: click.Context) -> None:
        """Create Audit Key (Security Officer): generated in the token, never leaves it."""
        _run(ctx, _post("/v1/audit-key"))

    @audit.command("export-key")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @click.pass_context
    def export_key(ctx: click.Context, out: Path | None) -> None:
        """Export Audit Key (Auditor): the public half, PEM."""
        with errors(ctx), device(ctx) as client:
            result = dict(client.get("/v1/audit-key"))
            if out is not None:
                out.write_text(result["public_key_pem"])
                result["path"] = str(out)
            _show(ctx, result)

    @audit.command("view")
    @click.option("--since", type=int, default=None, help="First record index to show.")
    @click.pass_context
    def view(ctx: click.Context, since: int | None) -> None:
        """View the audit log (Auditor)."""
        with errors(ctx), device(ctx) as client:
            query = "" if since is None else f"?since={since}"
            rows = [
                {
                    "index": r["index"],
                    "at": r["at"],
                    "user": r["user_id"],
                    "role": r["role"],
                    "service": r["service"],
                    "outcome": r["outcome"],
                    "kind": r["kind"],
                    "values": r["values"],
                }
                for r in client.get(f"/v1/audit{query}")["records"]
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
        """Save the audit log with the chain's signature (Auditor) to PATH."""
        with errors(ctx), device(ctx) as client:
            if path.is_dir():
                raise InvalidInput(f"{path} is a folder: name the export file")
            result = client.post("/v1/audit/save")
            _save(path, result["document"], overwrite=True)
            _show(ctx, {"path": str(path), "records": result["records"]})

    @audit.command("archive")
    @click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
    @click.pass_context
    def archive(ctx: click.Context, path: Path) -> None:
        """Archive the records not archived yet (Auditor); a copy goes to PATH (a new file)."""
        with errors(ctx), device(ctx) as client:
            if path.exists():
                raise InvalidInput(f"{path} exists already: choose a new archive file")
            result = client.post("/v1/audit/archive")
            _save(path, result["document"], overwrite=False)
            _show(
                ctx,
                {
                    "path": str(path),
                    "records": result["records"],
                    "archived_through": result["archived_through"],
                },
            )

    @audit.command("delete")
    @click.pass_context
    def delete(ctx: click.Context) -> None:
        """Delete the records already archived (Auditor)."""
        _run(ctx, lambda client: client.call("DELETE", "/v1/audit/archived"))
