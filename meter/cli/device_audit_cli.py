"""The device's audits as ``meter`` commands: Request Device Audit and Withdraw PSD
(docs/withdrawal.md) on the ``meter`` group, and the audit log's services on
``meter audit`` (`add_audit_commands`).

Clients of the running device, as every device command (meter.cli.device_cli).
"""

from __future__ import annotations

from pathlib import Path

import click

from meter.cli.common import emit, errors
from meter.cli.device_cli import plain, post_call, run_service, show
from meter.cli.device_session import device
from meter.durable import write_atomically
from meter.errors import ConfigurationError, InvalidInput

__all__ = ["add_audit_commands", "register"]


def register(cli: click.Group) -> None:
    """Add ``device-audit`` and ``withdraw`` to the ``meter`` group."""

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
        help="A post office's `meter postoffice reconcile --json` for the provider to check "
        "the device against (this or --without-post-office is needed with --provider).",
    )
    _without_post_office_option = click.option(
        "--without-post-office",
        is_flag=True,
        help="Have the provider audit without a post office's reconciliation; the provider "
        "records that it was not checked.",
    )

    @cli.command("device-audit")
    @_provider_option
    @_post_office_option
    @_without_post_office_option
    @click.pass_context
    def device_audit(
        ctx: click.Context,
        provider_url: str | None,
        post_office: Path | None,
        without_post_office: bool,
    ) -> None:
        """Request Device Audit: rerun the self-tests and report the device's figures.

        With --provider URL, the provider's signed audit: its nonce, the device's
        signed report, the provider's check, its acknowledgement into the device
        (the inspection watchdog restarts), checked against the post office's
        reconciliation (--post-office FILE) or, said explicitly and recorded,
        without it (--without-post-office). See docs/withdrawal.md.
        """
        from meter.cli.withdraw_cli import run_device_audit

        run_device_audit(ctx, provider_url, post_office, without_post_office)

    @cli.command()
    @_provider_option
    @click.option(
        "--revocations-out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Also write the provider's signed revocation export here (for post offices).",
    )
    @_post_office_option
    @_without_post_office_option
    @click.pass_context
    def withdraw(
        ctx: click.Context,
        provider_url: str | None,
        revocations_out: Path | None,
        post_office: Path | None,
        without_post_office: bool,
    ) -> None:
        """Withdraw PSD (Provider): take the device out of service for good.

        Needs --provider URL and the device's Provider user (--user): final signed
        audit (checked against --post-office FILE, or --without-post-office), refund,
        keys destroyed, revocation. Rerun after an interruption: it resumes at the
        step where it stopped. See docs/withdrawal.md.
        """
        from meter.cli.withdraw_cli import run_withdraw

        run_withdraw(ctx, provider_url, revocations_out, post_office, without_post_office)


def _save(path: Path, document: str, *, overwrite: bool) -> None:
    """An audit export or archive, whole or not at all; an archive never replaces a file."""
    try:
        write_atomically(path, document.encode("ascii"), overwrite=overwrite)
    except FileExistsError:
        raise InvalidInput(f"{path} exists already: choose a new archive file") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def add_audit_commands(audit: click.Group) -> None:
    """The Auditor's and Security Officer's audit services, on the `meter audit` group."""

    @audit.command("create-key")
    @click.pass_context
    def create_key(ctx: click.Context) -> None:
        """Create Audit Key (Security Officer): generated in the token, never leaves it."""
        run_service(ctx, post_call("/v1/audit-key"))

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
            show(ctx, result)

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
                    f"{r['service']:<28} {r['outcome']} {plain(r['values'])}"
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
            show(ctx, {"path": str(path), "records": result["records"]})

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
            show(
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
        run_service(ctx, lambda client: client.call("DELETE", "/v1/audit/archived"))
