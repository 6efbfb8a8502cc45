"""Host sessions (policy rule 5): a logon bound to the connecting process and a secret.

A client that logs on over the device's socket gets a random session id and
a random secret. Every later request presents both; the device keeps only a
SHA-256 of the secret and accepts the request as the session's only when it
also comes from the same process that logged on, as the kernel reports it
for the connection (``SO_PEERCRED``: pid, uid, gid) together with that
process's start time, so a recycled pid is not the same peer. A request that
carries no valid session runs as No-Role. The session ends by Logoff, the
idle timeout, or when its client goes away: the connection it logged on over
is closed (a command that ends, a program that closes its client) or its
process has exited.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Credential", "HostBinding", "Link", "Peer", "peer_of_socket"]

_ID_BYTES = 16
_SECRET_BYTES = 32
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """A process at the other end of a connection."""

    pid: int
    uid: int
    gid: int
    started: int | None  # start time in clock ticks after boot (/proc/PID/stat field 22)

    @classmethod
    def of(cls, pid: int, uid: int, gid: int) -> Peer:
        return cls(pid, uid, gid, _start_time(pid))

    def alive(self) -> bool:
        """Is the same process still running (not exited, not a zombie, pid not reused)?"""
        try:
            fields = _stat_fields(self.pid)
        except OSError:
            return False
        return fields[0] != "Z" and (self.started is None or int(fields[19]) == self.started)

    def describe(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"


def peer_of_socket(sock: socket.socket) -> Peer:
    """The kernel's word on who is connected to a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return Peer.of(*_PEERCRED.unpack(raw))


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may itself hold spaces.
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Credential:
    """What a client presents on every request: ``Authorization: Bearer ID.SECRET``."""

    session_id: str
    secret: str

    def header(self) -> str:
        return f"Bearer {self.session_id}.{self.secret}"

    @classmethod
    def parse(cls, header: str | None) -> Credential | None:
        if not header or not header.startswith("Bearer "):
            return None
        session_id, _, secret = header[len("Bearer ") :].partition(".")
        if not session_id or not secret or len(header) > 256:
            return None
        return cls(session_id, secret)


class Link(Protocol):
    """The connection a session was opened over, as far as the firmware needs to know it."""

    def closed(self) -> bool: ...


@dataclass(frozen=True)
class HostBinding:
    """The device's side of a host session: id, digest of the secret, the peer that logged on
    and the connection it logged on over."""

    session_id: str
    secret_digest: bytes
    peer: Peer
    link: Link | None

    @classmethod
    def new(cls, peer: Peer, link: Link | None) -> tuple[HostBinding, Credential]:
        credential = Credential(secrets.token_hex(_ID_BYTES), secrets.token_urlsafe(_SECRET_BYTES))
        return cls(credential.session_id, _digest(credential.secret), peer, link), credential

    def gone(self) -> bool:
        """Has the client gone away: its logon connection closed, or its process ended?"""
        return (self.link is not None and self.link.closed()) or not self.peer.alive()

    def refusal(self, credential: Credential | None, peer: Peer | None) -> str | None:
        """None when ``credential`` from ``peer`` is this session; otherwise why not."""
        if credential is None:
            return "the request carries no session"
        if not hmac.compare_digest(
            credential.session_id, self.session_id
        ) or not hmac.compare_digest(_digest(credential.secret), self.secret_digest):
            return "the request's session id or secret is not the open session's"
        if peer is None or (peer.pid, peer.uid, peer.started) != (
            self.peer.pid,
            self.peer.uid,
            self.peer.started,
        ):
            who = peer.describe() if peer else "an unknown process"
            return f"the session belongs to {self.peer.describe()}, the request comes from {who}"
        return None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(b"meter-host-session-v1|" + secret.encode()).digest()
