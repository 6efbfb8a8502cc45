"""``meter postoffice serve``: the verification service and the clerk's page."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of, parse_date
from meter.cli.postoffice_cli import ledger_path
from meter.cli.postoffice_group import postoffice
from meter.errors import InvalidInput
from meter.postoffice import open_replay_store
from meter.postoffice.service_config import (
    DEFAULT_ALLOWED_HOSTS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD,
    ServiceConfig,
    Timeouts,
)

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
@click.option(
    "--stations",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Station keys (default: HOME/postoffice/stations.json; meter postoffice stations).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A name clients use for this server (repeatable); default: 127.0.0.1, localhost, "
    "::1 and --host. Requests naming any other host are refused (DNS rebinding).",
)
@click.option(
    "--allowed-origin",
    "allowed_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Another origin whose pages may post here, e.g. https://counter.example (repeatable).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(10_000),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Largest label image, in pixels, read from its header before decoding.",
)
@click.option(
    "--image-workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Label images decoded at once (default: one per core).",
)
@click.option(
    "--image-queue",
    type=click.IntRange(0, 1024),
    default=8,
    show_default=True,
    help="Label images waiting for a worker; more are answered 503 with Retry-After.",
)
@click.option("--header-timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True)
@click.option("--body-timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True)
@click.option("--idle-timeout", type=click.FloatRange(1, 3600), default=5.0, show_default=True)
@click.option("--max-connections", type=click.IntRange(1, 65535), default=512, show_default=True)
@click.option(
    "--redis-replicas",
    type=click.IntRange(0, 16),
    default=0,
    show_default=True,
    help="Replicas that must hold a piece (Redis WAIT) before it is answered VALID.",
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
    stations: Path | None,
    allowed_hosts: tuple[str, ...],
    allowed_origins: tuple[str, ...],
    max_pixels: int,
    image_workers: int | None,
    image_queue: int,
    header_timeout: float,
    body_timeout: float,
    idle_timeout: float,
    max_connections: int,
    redis_replicas: int,
) -> None:
    """Run the post office's HTTP verification service and the clerk's page.

    Open http://HOST:PORT/ in a browser at the counter. Stop with Ctrl+C.
    """
    import uvicorn  # only this command needs the server

    from meter.postoffice.service import create_app
    from meter.postoffice.service_server import uvicorn_config

    with errors(ctx):
        home = home_of(ctx)
        if redis_url is not None and store is not None:
            raise InvalidInput("give either --store PATH or --redis URL, not both")
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://")):
            raise InvalidInput(f"--redis {redis_url!r} is not a redis:// or rediss:// URL")
        if redis_replicas and redis_url is None:
            raise InvalidInput("--redis-replicas needs --redis URL")
        names = allowed_hosts or (
            *DEFAULT_ALLOWED_HOSTS,
            *((host,) if host not in ("0.0.0.0", "::", *DEFAULT_ALLOWED_HOSTS) else ()),
        )
        timeouts = Timeouts(
            header=header_timeout,
            body=body_timeout,
            idle=idle_timeout,
            max_connections=max_connections,
        )
        config = ServiceConfig(
            cert_dir=certs or home.certs,
            store=redis_url or store or home.replay_store,
            ledger=ledger or ledger_path(home),
            stations=stations,
            max_upload=max_upload,
            max_pixels=max_pixels,
            image_queue=image_queue,
            allowed_hosts=tuple(names),
            allowed_origins=allowed_origins,
            redis_replicas=redis_replicas,
            timeouts=timeouts,
        )
        if image_workers:
            config = dataclasses.replace(config, image_workers=image_workers)
        app = create_app(config)
        where = "Redis" if redis_url else str(config.store)
        info = {
            "url": f"http://{host}:{port}/",
            "certs": str(config.cert_dir),
            "store": where,
            "ledger": str(config.ledger),
            "stations": str(config.stations_file),
            "allowed_hosts": list(config.allowed_hosts),
        }
        emit(
            ctx,
            info,
            lambda: (
                f"post office at {info['url']} (certificates {info['certs']}, "
                f"replay store {where}, ledger {info['ledger']}, "
                f"stations {info['stations']})"
            ),
        )
        server = uvicorn.Server(uvicorn_config(app, host, port, timeouts, log_level="info"))
        server.run()


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
