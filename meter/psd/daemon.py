"""The device process (``meter device serve``, ``meterd``): the one holder of the meter's token.

It owns the token (a file lock: a second device on the same home is
refused), the users' sealed slots, the audit log and the device's records,
and it serves the firmware on a Unix socket (meter.psd.server) to clients
that hold no PIN, key or register. Start-up:

1. the caller opens the token (public session) after restoring any
   ``token.object`` a crash emptied (meter.token.token_files);
2. the socket is made: a socket file left by a crashed device is found
   dead (nothing accepts on it) and replaced; a live one, or something
   that is not a socket, is refused. Mode 0660, group configurable; its
   folder 0750 in that group, so only the group's members reach it;
3. the firmware powers up (self-tests) and the server runs until SIGTERM
   or SIGINT, when the session ends, the audit log is sealed and the token
   closed.

The peer of every connection comes from the kernel (``SO_PEERCRED``), taken
when the connection is accepted, and travels with each request to the
firmware, which binds host sessions to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import select
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn

from meter.errors import ConfigurationError, MeterError, TokenUnavailable
from meter.psd.firmware import PSD
from meter.psd.host_session import peer_of_socket
from meter.psd.roles import Role
from meter.psd.server import LINK_STATE_KEY, PEER_STATE_KEY, FirmwareThread, device_asgi
from meter.token import Token

__all__ = ["REAP_INTERVAL_S", "DeviceOptions", "bind_device_socket", "serve_device"]

REAP_INTERVAL_S = 0.5  # how soon a session whose client process died is ended, at the latest
MAX_CONNECTIONS = 64  # local clients; more are answered 503 until one closes
MAX_CONNECTIONS_PER_ACCOUNT = 16  # so that one account's idle connections lock nobody else out
FIRST_REQUEST_WITHIN_S = 10.0  # a connection that sends nothing is closed after this
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class DeviceOptions:
    socket: Path
    device_folder: Path  # users, policy, audit log: HOME/meter
    group: str | None = None  # the socket's group: who may be a client
    idle_timeout: timedelta = timedelta(minutes=15)


def serve_device(
    token: Token,
    options: DeviceOptions,
    *,
    on_ready: Callable[[PSD], None] = lambda psd: None,
    restored: list[tuple[str, str]] | None = None,
) -> None:
    """Run the device over ``token`` (opened without a PIN) until SIGTERM or SIGINT.

    ``restored`` lists (token label, reason) of token files restored before the
    module was loaded; each gets an audit record.
    """
    try:
        sock = bind_device_socket(options.socket, options.group)
    except BaseException:
        token.close()  # a refused start must not keep the home's token lock
        raise
    try:
        psd = PSD.power_up(token, options.device_folder, idle_timeout=options.idle_timeout)
    except BaseException:
        sock.close()
        _unlink_quietly(options.socket)
        token.close()
        raise
    try:
        for label, reason in restored or []:
            psd.audit.append(
                at=psd.host_now(),
                user_id=None,
                role=Role.NO_ROLE.value,
                service="token-file-restored",
                outcome="ok",
                values={"token": label, "reason": reason},
            )
        firmware = FirmwareThread(psd)
        # A session lives on its logon connection: that must outlast the idle timeout.
        keep_alive = int(options.idle_timeout.total_seconds()) + 60
        _run(firmware, sock, keep_alive, lambda: on_ready(psd))
    finally:
        try:
            psd.power_down()
        finally:
            sock.close()
            _unlink_quietly(options.socket)


def _run(
    firmware: FirmwareThread, sock: socket.socket, keep_alive: int, on_ready: Callable[[], None]
) -> None:
    config = uvicorn.Config(
        device_asgi(firmware),
        http=_peer_protocol(firmware),
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=keep_alive,
        # A backstop only: _peer_protocol refuses first, in the API's own error shape.
        limit_concurrency=MAX_CONNECTIONS + 1,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        reaper = asyncio.create_task(_reap_forever(firmware))
        ready = asyncio.create_task(_when_started(server, on_ready))
        try:
            await server.serve(sockets=[sock])
        finally:
            reaper.cancel()
            ready.cancel()

    # uvicorn takes SIGINT/SIGTERM while it serves and raises them again once it has
    # stopped, with the handlers it found: ours let the caller's cleanup run.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, frame: Any) -> None:
    """uvicorn has already shut down gracefully when it re-raises the signal here."""


async def _when_started(server: uvicorn.Server, on_ready: Callable[[], None]) -> None:
    while not server.started:
        await asyncio.sleep(0.01)
    on_ready()


async def _reap_forever(firmware: FirmwareThread) -> None:
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        with contextlib.suppress(MeterError):
            await firmware.reap()


class _Link:
    """One client connection: closed once the loop has seen it go, or its peer hung up."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._closed = False

    def mark_closed(self) -> None:
        self._closed = True

    def closed(self) -> bool:
        if self._closed:
            return True
        # The client may have closed a moment ago, before the event loop read the EOF:
        # the kernel knows already (POLLRDHUP), and a logon right after must not wait.
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def _peer_protocol(firmware: FirmwareThread) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, noting each connection's peer and link where requests see them."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional: h11 is slower but equivalent
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    open_by_account: dict[int | None, int] = {}

    class PeerProtocol(Base):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            try:
                peer = peer_of_socket(sock)
            except OSError:
                peer = None
            self._meter_link = _Link(sock.fileno())
            self._meter_account = peer.uid if peer is not None else None
            self._meter_spoke = False
            # Each request's scope gets a copy of this dict as its "state".
            self.app_state = {
                **self.app_state,
                PEER_STATE_KEY: peer,
                LINK_STATE_KEY: self._meter_link,
            }
            mine = open_by_account.get(self._meter_account, 0) + 1
            open_by_account[self._meter_account] = mine
            if (
                mine > MAX_CONNECTIONS_PER_ACCOUNT
                or sum(open_by_account.values()) > MAX_CONNECTIONS
            ):
                _refuse_connection(
                    transport,
                    f"too many connections to the device ({mine} from this account; at most "
                    f"{MAX_CONNECTIONS_PER_ACCOUNT} per account and {MAX_CONNECTIONS} in all): "
                    "close some and retry",
                )
                return
            asyncio.get_running_loop().call_later(FIRST_REQUEST_WITHIN_S, self._meter_silent)

        def data_received(self, data: bytes) -> None:
            self._meter_spoke = True
            super().data_received(data)

        def _meter_silent(self) -> None:
            if not self._meter_spoke and not self._meter_link.closed():
                self.transport.close()  # connected and never asked anything

        def connection_lost(self, exc: Exception | None) -> None:
            self._meter_link.mark_closed()
            open_by_account[self._meter_account] -= 1
            super().connection_lost(exc)
            # A session opened over this connection ends now, not at the next reap.
            asyncio.get_running_loop().create_task(firmware.reap())

    return PeerProtocol


def _refuse_connection(transport: Any, message: str) -> None:
    """An answer in the API's error shape to a request not yet sent, then close."""
    body = json.dumps({"error": "TokenUnavailable", "message": message}).encode()
    transport.write(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    transport.close()


# -- the socket ------------------------------------------------------------------------


def bind_device_socket(path: Path, group: str | None) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0660, in ``group`` (default: ours)."""
    path = Path(path)
    gid = _gid(group)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, -1, gid)
        os.chmod(folder, 0o750)  # the group may reach the socket; nobody else
    except OSError as exc:
        raise ConfigurationError(
            f"cannot prepare the socket's folder {folder} for group {gid}: {exc.strerror or exc}"
        ) from exc
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o117)  # created 0660: no window in which others could connect
        try:
            _bind(sock, path)
        finally:
            os.umask(old)
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _gid(group: str | None) -> int:
    if group is None:
        return os.getegid()
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigurationError(f"socket group '{group}' does not exist") from None


def _clear_stale(path: Path) -> None:
    """Remove a socket a crashed device left behind; refuse anything alive or unexpected."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a socket: remove it or choose another")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect(probe, path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigurationError(
                f"{path}: cannot tell whether a device uses it: {exc}"
            ) from exc
        path.unlink()  # nothing accepts on it: a crashed device's
        return
    finally:
        probe.close()
    raise TokenUnavailable(f"another process is serving on {path}: is a device running already?")


def _bind(sock: socket.socket, path: Path) -> None:
    _via_folder(path, sock.bind)


def _connect(sock: socket.socket, path: Path) -> None:
    _via_folder(path, sock.connect)


def _via_folder(path: Path, act: Callable[[str], None]) -> None:
    """Bind or connect, through /proc/self/fd when the path is longer than sun_path allows."""
    if len(os.fsencode(path)) <= _SOCKET_PATH_MAX:
        act(str(path))
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        act(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
