"""The device's services as ``meter`` commands: one command per service of Table 2.

Each command is a client of the running device (meter.host.DeviceClient):
the device's firmware checks the role of the user named by ``--user`` and
audits the call; this module only parses and prints. ``meter policy``
prints the matrix the firmware enforces.

Here: the sessions, the status reports, credit, Key Exchange and ``meter shell``,
and the helpers every device command uses. The other groups have modules of their
own, registered in meter.cli.main: users (device_users_cli), the Security Officer's,
Administrator's and authorizations' commands (device_admin_cli), device audit,
withdrawal and the audit log (device_audit_cli).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from meter.cli import workflows
from meter.cli.common import emit, errors, home_of, parse_postage
from meter.cli.device_session import PASSWORD_VARIABLE, device
from meter.cli.home import password_from_env
from meter.errors import InvalidInput
from meter.host import DeviceClient
from meter.psd.roles import ISSUING_SERVICES, MATRIX, TABLE_2, Role, Service, allowed

__all__ = [
    "NEW_PASSWORD_VARIABLE",
    "get_call",
    "new_password",
    "plain",
    "policy_matrix",
    "post_call",
    "register",
    "run_service",
    "show",
]

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


def run_service(ctx: click.Context, call: Callable[[DeviceClient], dict[str, Any]]) -> None:
    """Connect, log --user on, call one service, print its result, disconnect."""
    with errors(ctx), device(ctx) as client:
        show(ctx, call(client))


def get_call(path: str) -> Callable[[DeviceClient], dict[str, Any]]:
    return lambda client: dict(client.get(path))


def post_call(path: str, body: dict[str, Any] | None = None) -> Callable[[DeviceClient], Any]:
    return lambda client: client.post(path, body)


def show(ctx: click.Context, data: dict[str, Any]) -> None:
    emit(ctx, data, lambda: "\n".join(f"{k}: {plain(v)}" for k, v in data.items()))


def plain(value: object) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def new_password(what: str) -> str:
    return password_from_env(NEW_PASSWORD_VARIABLE, what, confirm=True)


def register(cli: click.Group) -> None:
    """Add the sessions, reports, credit, Key Exchange and the shell to the ``meter`` group."""

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
                show(ctx, running.logon(user, user_password))
                return
            with device(ctx) as client:
                show(ctx, client.session or {})

    @cli.command()
    @click.pass_context
    def logoff(ctx: click.Context) -> None:
        """Logoff: end the session."""
        run_service(ctx, DeviceClient.logoff)

    @cli.command()
    @click.pass_context
    def session(ctx: click.Context) -> None:
        """Session Management: who is logged on, for how long, and the idle timeout."""
        run_service(ctx, get_call("/v1/session"))

    @cli.command()
    @click.pass_context
    def status(ctx: click.Context) -> None:
        """Request Status: user, module state, session, keys, registers, piece count, time."""
        run_service(ctx, get_call("/v1/status"))

    @cli.command("psd-status")
    @click.pass_context
    def psd_status(ctx: click.Context) -> None:
        """Retrieve PSD Status (Customer): registers and piece count."""
        run_service(ctx, get_call("/v1/psd-status"))

    @cli.command("public-key")
    @click.pass_context
    def public_key(ctx: click.Context) -> None:
        """Retrieve PSD Public Key: the signing key and certificate (no logon needed)."""
        run_service(ctx, get_call("/v1/public-key"))

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

    @cli.command("key-exchange")
    @click.pass_context
    def key_exchange(ctx: click.Context) -> None:
        """Key Exchange (Key Custodian): the device's key-agreement public key."""
        run_service(ctx, post_call("/v1/key-exchange"))

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
