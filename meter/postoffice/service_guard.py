"""What every request passes before a route sees it, as one ASGI middleware.

In order:

1. **Security headers** on every response, errors included: ``nosniff``,
   ``Cache-Control: no-store`` (verdicts and books must not sit in caches),
   no framing, no referrer, and a Content-Security-Policy that allows
   nothing for anything but the clerk's page (which sets its own).
2. **Host**: the ``Host`` header must name this server (``allowed_hosts``),
   else 421. A page on a hostile name that resolves here (DNS rebinding)
   sends its own name, and is refused before any route runs.
3. **Origin**, for every method that is not GET or HEAD: a browser's
   ``Origin`` must be this server's own origin or one of ``allowed_origins``,
   and ``Sec-Fetch-Site`` (sent by every current browser) must not say
   cross-site or same-site, else 403. A page elsewhere cannot post here
   even where the route would accept its content type. Programs (sorting
   machines, scripts) send neither header and are not affected.
4. **Body**: at most ``max_upload`` bytes (by Content-Length, and counted
   while it streams in), all of it within the body timeout, else 413 or 408.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meter.postoffice.service_config import ServiceConfig
from meter.postoffice.service_http import error_response

__all__ = ["SECURITY_HEADERS", "RequestGuard"]

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)
_API_POLICY = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_SAFE_METHODS = ("GET", "HEAD")
_SAME_SITE_OK = (b"same-origin", b"none")


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class RequestGuard:
    """The checks above; `refused(status)` is told of every request it refuses."""

    def __init__(self, app: ASGIApp, config: ServiceConfig, refused: Callable[[int], None]) -> None:
        self._app = app
        self._limit = config.max_upload
        self._body_timeout = config.timeouts.body
        self._hosts = {h.lower() for h in config.allowed_hosts}
        self._origins = {o.lower().rstrip("/") for o in config.allowed_origins}
        self._refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        send = _with_security_headers(send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if _hostname(host) not in self._hosts:
            await self._refuse(
                scope,
                send,
                421,
                "HostNotAllowed",
                f"this service does not answer to the name {host!r}; nothing was done",
            )
            return
        if scope["method"] not in _SAFE_METHODS:
            problem = self._cross_origin(scope, headers, host)
            if problem is not None:
                await self._refuse(scope, send, 403, "CrossOrigin", problem)
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._limit):
            await self._refuse_too_large(scope, send)
            return
        await self._guarded(scope, receive, send)

    def _cross_origin(self, scope: Scope, headers: dict[bytes, bytes], host: str) -> str | None:
        origin = headers.get(b"origin")
        if origin is not None:
            given = origin.decode("latin-1").lower().rstrip("/")
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            if given != own and given not in self._origins:
                return (
                    f"a page from {given} may not post to this service (it is not {own} "
                    "or an allowed origin); nothing was done"
                )
            if given in self._origins:
                return None  # an allowed origin is cross-site by design
        fetch_site = headers.get(b"sec-fetch-site")
        if fetch_site is not None and fetch_site not in _SAME_SITE_OK:
            return (
                f"the browser says this request comes from another site "
                f"({fetch_site.decode('latin-1')}); nothing was done"
            )
        return None

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        body_done = False
        deadline = time.monotonic() + self._body_timeout
        started = False

        async def limited() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # e.g. waiting for a disconnect: no deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    raise _TooLarge
                body_done = not message.get("more_body", False)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, limited, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse_too_large(scope, send)
        except _TooSlow:
            if started:
                raise
            await self._refuse(
                scope,
                send,
                408,
                "Timeout",
                f"the request body did not arrive within {self._body_timeout:g} s; "
                "nothing was verified",
            )

    async def _refuse_too_large(self, scope: Scope, send: Send) -> None:
        await self._refuse(
            scope,
            send,
            413,
            "PayloadTooLarge",
            f"request body is larger than the limit of {self._limit} bytes; nothing was verified",
        )

    async def _refuse(self, scope: Scope, send: Send, status: int, kind: str, message: str) -> None:
        self._refused(status)
        headers = {"Connection": "close"} if status in (408, 413) else None
        await error_response(status, kind, message, headers)(scope, _no_receive, send)


def _with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {name.lower() for name, _ in headers}
            headers += [h for h in SECURITY_HEADERS if h[0] not in names]
            if _API_POLICY[0] not in names:
                headers.append(_API_POLICY)
            message = {**message, "headers": headers}
        await send(message)

    return sending


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8417" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
