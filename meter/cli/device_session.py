"""A device command's connection to the running device, logged on as ``--user`` if given.

Each command connects to the device's socket, logs the user named by
``--user`` on (password from METER_PASSWORD or a hidden prompt), calls one
service and closes the connection, which ends the session (the device sees
its client go). ``meter shell`` keeps one connection and session across
many commands, so Logoff and the idle timeout matter there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from meter.cli.common import home_of
from meter.cli.home import password_from_env
from meter.host import DeviceClient

__all__ = ["PASSWORD_VARIABLE", "device"]

PASSWORD_VARIABLE = "METER_PASSWORD"


def _password(user: str) -> str:
    return password_from_env(PASSWORD_VARIABLE, f"password of user '{user}'")


@contextmanager
def device(ctx: click.Context) -> Iterator[DeviceClient]:
    """The running device, logged on as ``--user`` if given (No-Role otherwise)."""
    obj = ctx.find_root().obj
    running: DeviceClient | None = obj.get("client")
    if running is not None:  # inside `meter shell`: one connection, one session
        yield running
        return
    home = home_of(ctx)
    with DeviceClient(home.socket, home=home.path) as client:
        user = obj.get("user")
        if user:
            client.logon(user, _password(user))
        yield client
