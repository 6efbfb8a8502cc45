"""The ``meter postoffice`` group: the post office's site commands (serve, reconcile)."""

from __future__ import annotations

import click

__all__ = ["postoffice"]


@click.group()
def postoffice() -> None:
    """Run a post office site: the verification service and register reconciliation."""
