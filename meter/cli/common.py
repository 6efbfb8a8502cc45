"""What every command module shares: the home, output, error mapping, dates."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from meter.cli.home import Home
from meter.errors import InvalidInput, MeterError

__all__ = ["emit", "errors", "home_of", "parse_date", "parse_postage"]


def home_of(ctx: click.Context) -> Home:
    obj = ctx.find_root().obj
    return Home.at(obj["home_path"], obj["profile"])


def emit(ctx: click.Context, data: dict[str, Any], text: Callable[[], str]) -> None:
    """One JSON object with --json, else the text."""
    if ctx.find_root().obj["json"]:
        click.echo(json.dumps(data, sort_keys=True, default=str))
    else:
        click.echo(text())


@contextmanager
def errors(ctx: click.Context) -> Iterator[None]:
    """Map MeterError to a clear message and exit code 1 (JSON on stdout with --json)."""
    try:
        yield
    except MeterError as exc:
        if ctx.find_root().obj["json"]:
            click.echo(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        else:
            click.echo(f"error: {exc}", err=True)
        ctx.exit(1)


def parse_date(text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"date '{text}' is not YYYY-MM-DD") from exc


def parse_postage(text: str) -> int:
    """Dollars ("0.73", "$1.234") to mills, exactly; more than 3 decimals is refused."""
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation as exc:
        raise InvalidInput(f"postage '{text}' is not an amount in dollars (e.g. 0.73)") from exc
    mills = value * 1000
    if mills != mills.to_integral_value():
        raise InvalidInput(f"postage '{text}' has more precision than a mill ($0.001)")
    return int(mills)
