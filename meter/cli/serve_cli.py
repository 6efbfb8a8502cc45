"""``meter postoffice serve``: the verification service and the clerk's page."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of, parse_date
from meter.cli.postoffice_cli import ledger_path
from meter.cli.postoffice_group import postoffice
from meter.errors import InvalidInput
from meter.postoffice import open_replay_store
from meter.postoffice.service_config import DEFAULT_MAX_UPLOAD, ServiceConfig

__all__ = ["serve"]


@postoffice.command()
@click.option(
    "--certs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Certificate directory: postal-root.pem, other *.pem, revocations.json "
    "(default: HOME/certs). Reloaded when its files change.",
)
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    default=None,
    help="Embedded replay store (default: the home's, under HOME/postoffice).",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    metavar="URL",
    help="Use Redis (standalone or cluster) as the replay store, e.g. redis://host:6379/0.",
)
@click.option(
    "--ledger",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Register ledger for reconciliation (default: HOME/postoffice/registers.sqlite).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8417, show_default=True)
@click.option(
    "--max-upload",
    type=click.IntRange(1024),
    default=DEFAULT_MAX_UPLOAD,
    show_default=True,
    help="Largest request body in bytes (label images included).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    certs: Path | None,
    store: Path | None,
    redis_url: str | None,
    ledger: Path | None,
    host: str,
    port: int,
    max_upload: int,
) -> None:
    """Run the post office's HTTP verification service and the clerk's page.

    Open http://HOST:PORT/ in a browser at the counter. Stop with Ctrl+C.
    """
    import uvicorn  # only this command needs the server

    from meter.postoffice.service import create_app

    with errors(ctx):
        home = home_of(ctx)
        if redis_url is not None and store is not None:
            raise InvalidInput("give either --store PATH or --redis URL, not both")
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://")):
            raise InvalidInput(f"--redis {redis_url!r} is not a redis:// or rediss:// URL")
        config = ServiceConfig(
            cert_dir=certs or home.certs,
            store=redis_url or store or home.replay_store,
            ledger=ledger or ledger_path(home),
            max_upload=max_upload,
        )
        app = create_app(config)
        where = "Redis" if redis_url else str(config.store)
        info = {
            "url": f"http://{host}:{port}/",
            "certs": str(config.cert_dir),
            "store": where,
            "ledger": str(config.ledger),
        }
        emit(
            ctx,
            info,
            lambda: (
                f"post office at {info['url']} (certificates {info['certs']}, "
                f"replay store {where}, ledger {info['ledger']})"
            ),
        )
        uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


@postoffice.command()
@click.option(
    "--store",
    default=None,
    help="Replay store: an embedded store folder (default: the home's) or a redis:// URL.",
)
@click.option("--date", "on", default=None, help="Today, YYYY-MM-DD (default: today, UTC).")
@click.pass_context
def expire(ctx: click.Context, store: str | None, on: str | None) -> None:
    """Forget the pieces mailed more than 183 days ago (the service does this once a day;
    run it from cron for a site that only runs verify-batch). Redis expires keys itself."""
    with errors(ctx):
        today = parse_date(on) or datetime.now(UTC).date()
        replay = open_replay_store(store or home_of(ctx).replay_store)
        try:
            dropped = replay.expire(today)
        finally:
            replay.close()
        emit(
            ctx, {"dropped": dropped, "date": today.isoformat()}, lambda: f"forgot {dropped} pieces"
        )
