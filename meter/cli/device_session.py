"""Running the meter's firmware for one command, or for an interactive session.

A command powers the device up (token opened without a PIN, power-up
self-tests), logs the user named by ``--user`` on with the password from
METER_PASSWORD or a hidden prompt, calls one service, and powers down,
which ends the session. ``meter shell`` keeps one device and session across
many commands, so Logoff and the idle timeout matter there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from meter.cli.home import Home, password_from_env
from meter.psd.firmware import PSD

__all__ = ["PASSWORD_VARIABLE", "device"]

PASSWORD_VARIABLE = "METER_PASSWORD"


def _password(user: str) -> str:
    return password_from_env(PASSWORD_VARIABLE, f"password of user '{user}'")


@contextmanager
def device(ctx: click.Context, home: Home) -> Iterator[PSD]:
    """The powered-up device, logged on as ``--user`` if given (No-Role otherwise)."""
    obj = ctx.find_root().obj
    running: PSD | None = obj.get("psd")
    if running is not None:  # inside `meter shell`: one device, one session
        yield running
        return
    psd = PSD.power_up(home.open_device_token(), home.device)
    try:
        user = obj.get("user")
        if user:
            psd.logon(user, _password(user))
        yield psd
    finally:
        psd.power_down()
