"""``meter provider keys add|list|revoke``: the provider service's operator keys.

A module of its own beside meter.cli.provider_ledger_cli (which lists it among the ledger
commands); only the keys' hashes are kept (meter.provider.api_keys).
"""

from __future__ import annotations

from pathlib import Path

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.home import Home
from meter.provider.api_keys import ApiKeys, KeyRole

__all__ = ["default_keys", "keys"]


def default_keys(home: Home) -> Path:
    return home.path / "provider" / "keys.json"


@click.group("keys")
def keys() -> None:
    """Operator keys of the provider service (role operator, or auditor: read only)."""


_KEYS_OPTION = click.option(
    "--keys",
    "keys_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Operator keys file (default: HOME/provider/keys.json, as `serve` uses).",
)


def _keys(ctx: click.Context, path: Path | None) -> ApiKeys:
    return ApiKeys(path or default_keys(home_of(ctx)))


@keys.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice([r.value for r in KeyRole]),
    default=KeyRole.OPERATOR.value,
    show_default=True,
)
@_KEYS_OPTION
@click.pass_context
def keys_add(ctx: click.Context, name: str, role: str, keys_path: Path | None) -> None:
    """Make a key for NAME and print it, this once: only its hash is kept."""
    with errors(ctx):
        key = _keys(ctx, keys_path).add(name, KeyRole(role))
        emit(
            ctx,
            {"name": name, "role": role, "key": key},
            lambda: f"{name} ({role}): {key}\nIt is not shown again.",
        )


@keys.command("list")
@_KEYS_OPTION
@click.pass_context
def keys_list(ctx: click.Context, keys_path: Path | None) -> None:
    """The keys' names, roles and states (never the keys)."""
    with errors(ctx):
        found = [k.public() for k in _keys(ctx, keys_path).records()]
        emit(
            ctx,
            {"keys": found},
            lambda: (
                "\n".join(
                    f"{k['name']:<24} {k['role']:<8} id {k['id']}  made {k['created']}"
                    + (f"  REVOKED {k['revoked']}" if k["revoked"] else "")
                    for k in found
                )
                or "no keys yet: meter provider keys add NAME"
            ),
        )


@keys.command("revoke")
@click.argument("name")
@_KEYS_OPTION
@click.pass_context
def keys_revoke(ctx: click.Context, name: str, keys_path: Path | None) -> None:
    """Revoke NAME's active key; it fails from the service's next request."""
    with errors(ctx):
        revoked = _keys(ctx, keys_path).revoke(name)
        emit(ctx, revoked.public(), lambda: f"revoked the key of {revoked.name}")
