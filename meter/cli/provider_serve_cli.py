"""``meter provider serve``: the provider's HTTP service over the accounts ledger.

``serve`` adds the device audit and withdrawal routes, and the reload routes when the
postal root's status of the provider is at hand (`_reload_server` staples it into every
reload handshake). The ledger's and the operator keys' commands are in
meter.cli.provider_ledger_cli; `COMMANDS` is all of them, for ``meter provider``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from meter.cli.common import errors, home_of
from meter.cli.home import Home
from meter.cli.provider_ledger_cli import (
    DB_OPTION,
    LEDGER_COMMANDS,
    default_keys,
    default_ledger,
    format_dollars,
    ledger_location,
)
from meter.errors import ConfigurationError, MeterError
from meter.postoffice.service_config import DEFAULT_ALLOWED_HOSTS
from meter.provider.http_config import DEFAULT_PORT
from meter.provider.ledger_sql import open_ledger

if TYPE_CHECKING:
    from meter.provider import Provider
    from meter.provider.ledger import Ledger
    from meter.provider.reload_server import ReloadServer

__all__ = [
    "COMMANDS",
    "default_keys",
    "default_ledger",
    "default_revocations",
    "default_status",
    "format_dollars",
]


def default_status(home: Home) -> Path:
    return home.path / "provider" / "status.bin"


def default_revocations(home: Home) -> Path:
    return home.path / "provider" / "revocations.json"


def _reload_server(
    provider: Provider, ledger: Ledger, status_file: Path, home: Home
) -> Callable[[], ReloadServer] | None:
    """The reload sessions, stapling the status in ``status_file`` (reread when it changes,
    so the root's renewal takes effect without a restart); None without a status."""
    from meter.pki.revocation import Revocations
    from meter.provider.reload_server import ReloadServer
    from meter.provider.withdrawal import RevocationBook

    try:
        status = status_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"{status_file}: cannot read the provider status: {exc}") from exc
    book = RevocationBook(default_revocations(home))
    server = ReloadServer(provider, ledger, status, revocations=Revocations(book.entries()))
    status_seen = status_file.stat().st_mtime_ns
    revocations_seen = _version(book.path)

    def reread_status() -> None:
        nonlocal status_seen
        try:
            mtime = status_file.stat().st_mtime_ns
            if mtime == status_seen:
                return
            status_seen = mtime  # looked at once per change, good or not
            server.set_status(status_file.read_bytes())
        except (OSError, MeterError) as exc:
            # Keep stapling the last good status (meters refuse it once stale), and say so.
            click.echo(
                f"provider status {status_file} not taken ({exc}); still stapling the "
                "previous one: issue a new one (meter provider issue-status)",
                err=True,
            )

    def reread_revocations() -> None:
        # The withdrawal route (or an operator) adds meters while serve runs: a meter
        # revoked now gets no credit from the next handshake on, with no restart.
        nonlocal revocations_seen
        version = _version(book.path)
        if version == revocations_seen:
            return
        revocations_seen = version
        try:
            server.set_revocations(Revocations(book.entries()))
        except MeterError as exc:
            server.set_revocations(None)  # fail closed: no new reload until it is repaired
            click.echo(f"{exc}; no reload starts until it is repaired", err=True)

    def current() -> ReloadServer:
        reread_status()
        reread_revocations()
        return server

    return current


def _version(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file (a rename over it changes the inode); None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@click.command("serve")
@DB_OPTION
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A name clients use for this server (Host header); repeat; default: loopback names.",
)
@click.option(
    "--allowed-origin",
    "allowed_origins",
    multiple=True,
    help="A browser origin besides the server's own that may post (scheme://host[:port]).",
)
@click.option(
    "--keys",
    "keys_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Operator keys file (default: HOME/provider/keys.json).",
)
@click.option(
    "--status",
    "status_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The postal root's signed status of this provider's certificate, stapled into every "
    "reload handshake (default: HOME/provider/status.bin, from `meter provider issue-status`); "
    "reread when the file changes. Without one, reload is off.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    db: str | None,
    bind: str,
    port: int,
    allowed_hosts: tuple[str, ...],
    allowed_origins: tuple[str, ...],
    keys_path: Path | None,
    status_path: Path | None,
) -> None:
    """Run the provider's HTTP service over the accounts ledger (needs PROVIDER_USER_PIN).

    The provider's token stays open while it runs: it signs each meter's customer
    authorization, its side of every reload handshake, audit acknowledgements and
    revocations. Routes: accounts (docs/provider.md), reload (docs/reload-protocol.md),
    device audits and withdrawals (docs/withdrawal.md). Stop it with Ctrl-C.
    """
    with errors(ctx):
        import uvicorn

        from meter.postoffice.service_server import uvicorn_config
        from meter.provider import Provider
        from meter.provider.audit_routes import audit_router
        from meter.provider.http import create_provider_app
        from meter.provider.http_config import ProviderConfig
        from meter.provider.reload_routes import reload_router

        home = home_of(ctx)
        config = ProviderConfig(
            ledger=ledger_location(ctx, db),
            keys=keys_path or default_keys(home),
            allowed_hosts=allowed_hosts or DEFAULT_ALLOWED_HOSTS,
            allowed_origins=allowed_origins,
        )
        ledger = open_ledger(config.ledger)
        try:
            with home.open_token("provider") as token:
                provider = Provider.open(token, home.ledger)
                status_file = status_path or default_status(home)
                routers = [audit_router(default_revocations(home))]
                reload_server = _reload_server(provider, ledger, status_file, home)
                if reload_server is not None:
                    routers.append(reload_router(reload_server))
                else:
                    click.echo(
                        f"reload is off: no provider status at {status_file} "
                        "(the postal root issues it: meter provider issue-status)",
                        err=True,
                    )
                app = create_provider_app(config, ledger, provider, routers=routers)
                click.echo(f"provider service on http://{bind}:{port} ({ledger.where})", err=True)
                uvicorn.Server(uvicorn_config(app, bind, port, config.timeouts)).run()
        finally:
            ledger.close()


COMMANDS = (serve, *LEDGER_COMMANDS)
