"""``meter device serve`` / ``meterd``: run the device; and starting one for a command.

``serve`` is the device process itself (meter.psd.daemon): it restores any
token file a crash emptied, opens the meter token, locks the home down to
its own account (the socket's group may only reach ``run/``), and serves
until SIGTERM or SIGINT. ``running_device`` starts one as a child process
for ``meter demo``, the tests and the bench, and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.home import Home
from meter.errors import ConfigurationError, DeviceNotRunning
from meter.token import Restored

__all__ = ["READY_PREFIX", "device_group", "meterd_main", "running_device", "serve_home"]

READY_PREFIX = "meterd: serving"
START_TIMEOUT_S = 60.0


@click.group("device")
def device_group() -> None:
    """The device process: the only holder of the meter's token."""


_group_option = click.option(
    "--group",
    default=None,
    help="Group whose members may use the device's socket (default: the device account's).",
)
_idle_option = click.option(
    "--idle-timeout",
    type=click.IntRange(1, 24 * 60),
    default=15,
    show_default=True,
    help="Minutes after which an idle session ends.",
)


@device_group.command("serve")
@_group_option
@_idle_option
@click.pass_context
def serve(ctx: click.Context, group: str | None, idle_timeout: int) -> None:
    """Run the device in the foreground on HOME/run/meterd.sock until SIGTERM or Ctrl+C."""
    with errors(ctx):
        home = home_of(ctx)
        serve_home(home, group, timedelta(minutes=idle_timeout), ctx)


@device_group.command("openapi")
@click.pass_context
def openapi(ctx: click.Context) -> None:
    """Print the device API's OpenAPI description (JSON); no device needed."""
    from meter.psd.server import openapi_description

    click.echo(json.dumps(openapi_description(), indent=1, sort_keys=True))


def serve_home(home: Home, group: str | None, idle: timedelta, ctx: click.Context) -> None:
    from meter.psd.daemon import DeviceOptions, serve_device  # only the device needs the server

    restored: list[Restored] = []
    token = home.open_device_token(restored)  # the home's lock: a second device stops here
    try:
        try:
            gid = grp.getgrnam(group).gr_gid if group else os.getegid()
        except KeyError:
            raise ConfigurationError(f"socket group '{group}' does not exist") from None
        home.secure(gid)
    except BaseException:
        token.close()  # a refused start must not keep the home's token lock
        raise
    options = DeviceOptions(home.socket, home.device, group, idle)

    def ready(psd: Any) -> None:
        info = {
            "home": str(home.path),
            "socket": str(home.socket),
            "pid": os.getpid(),
            "module_state": psd.module_state(),
            "restored_token_files": [r.reason for r in restored],
        }
        emit(ctx, info, lambda: f"{READY_PREFIX} {home.path} on {home.socket} (pid {os.getpid()})")
        sys.stdout.flush()

    serve_device(token, options, on_ready=ready, restored=[(r.label, r.reason) for r in restored])


def meterd_main() -> None:
    """``meterd [--home DIR] [--group G] [--idle-timeout MIN]``: `meter device serve` by itself."""

    @click.command("meterd")
    @click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="METER_HOME",
        default=Path("~/.meter"),
        show_default=True,
        help="The device's home (or METER_HOME).",
    )
    @click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @click.option("--json", "as_json", is_flag=True, help="Print the ready line as JSON.")
    @_group_option
    @_idle_option
    @click.pass_context
    def meterd(
        ctx: click.Context,
        home: Path,
        profile: Path | None,
        as_json: bool,
        group: str | None,
        idle_timeout: int,
    ) -> None:
        """The postage meter's device process (the same as `meter device serve`)."""
        ctx.obj = {"home_path": home, "profile": profile, "json": as_json, "user": None}
        with errors(ctx):
            serve_home(home_of(ctx), group, timedelta(minutes=idle_timeout), ctx)

    meterd(prog_name="meterd")


@contextlib.contextmanager
def running_device(
    home: Home, *, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Start the device for ``home`` as a child process; stop it (SIGTERM) afterwards."""
    # meterd's own entry point: it imports the device, not the whole command line.
    command = [sys.executable, "-m", "meter.cli.device_process", "--home", str(home.path)]
    command += ["--profile", str(home.profile.source), "--json", *(extra or [])]
    # Its stderr goes to a file, never a pipe nobody reads (a full pipe would stop it).
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,  # a Ctrl+C at the terminal reaches us, and we stop it
        )
        try:
            _wait_ready(child, home, stderr)
            yield child
        finally:
            stop_device(child)


def _wait_ready(child: subprocess.Popen[str], home: Home, stderr: IO[str]) -> None:
    assert child.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(START_TIMEOUT_S)
    text = line[0] if line else ""
    try:
        json.loads(text)["socket"]
    except (ValueError, KeyError, TypeError):
        stop_device(child)
        stderr.seek(0)
        last = (stderr.read().strip().splitlines() or [text.strip() or "no output"])[-1]
        raise DeviceNotRunning(f"the device for {home.path} did not start: {last}") from None


def stop_device(child: subprocess.Popen[str], timeout: float = 30.0) -> int:
    """SIGTERM, then wait; SIGKILL if it does not stop in time. Its exit status."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if child.stdout is not None:
        child.stdout.close()
    return child.returncode


if __name__ == "__main__":
    meterd_main()
