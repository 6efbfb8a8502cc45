"""``meter postoffice stations add|list|revoke``: who may cancel pieces and read the books."""

from __future__ import annotations

from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.postoffice_cli import ledger_path
from meter.cli.postoffice_group import postoffice
from meter.postoffice.stations import Role, StationRegistry

__all__ = ["stations"]


def _registry(ctx: click.Context, path: Path | None) -> StationRegistry:
    return StationRegistry(path or ledger_path(home_of(ctx)).parent / "stations.json")


_STATIONS_OPTION = click.option(
    "--stations",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Station registry (default: HOME/postoffice/stations.json, as `serve` uses).",
)


@postoffice.group()
def stations() -> None:
    """Station keys: one per sorting machine or counter (role station), or for auditors."""


@stations.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=Role.STATION.value,
    show_default=True,
    help="station: may cancel pieces and read the books; auditor: may read the books only.",
)
@_STATIONS_OPTION
@click.pass_context
def add(ctx: click.Context, name: str, role: str, path: Path | None) -> None:
    """Make a key for station NAME and print it, this once: only its hash is kept."""
    with errors(ctx):
        registry = _registry(ctx, path)
        key = registry.add(name, Role(role))
        emit(
            ctx,
            {"name": name, "role": role, "key": key},
            lambda: (
                f"station {name} ({role}): {key}\n"
                "Give this key to the station now; it is not shown again. "
                "Revoke it with 'meter postoffice stations revoke NAME'."
            ),
        )


@stations.command("list")
@_STATIONS_OPTION
@click.pass_context
def list_stations(ctx: click.Context, path: Path | None) -> None:
    """The stations, their roles and whether their keys are revoked (never the keys)."""
    with errors(ctx):
        found = [s.public() for s in _registry(ctx, path).stations()]

        def text() -> str:
            if not found:
                return "no station keys yet: add one with 'meter postoffice stations add NAME'"
            return "\n".join(
                f"{s['name']:<24} {s['role']:<8} id {s['id']}  made {s['created']}"
                + (f"  REVOKED {s['revoked']}" if s["revoked"] else "")
                for s in found
            )

        emit(ctx, {"stations": found}, text)


@stations.command("revoke")
@click.argument("name")
@_STATIONS_OPTION
@click.pass_context
def revoke(ctx: click.Context, name: str, path: Path | None) -> None:
    """Revoke the key of station NAME (or id): it fails from the next request on."""
    with errors(ctx):
        station = _registry(ctx, path).revoke(name)
        emit(
            ctx,
            station.public(),
            lambda: f"revoked the key of station {station.name} (id {station.id})",
        )
