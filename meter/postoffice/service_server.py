"""Running the service exposed: uvicorn with timeouts for every part of a connection.

uvicorn bounds only the keep-alive wait. A client that connects and sends a
request head one byte at a time, or never finishes it, would hold its
connection for ever: 2,000 such connections were all held open. So the
HTTP protocol here is uvicorn's own with three additions:

- the request head (request line and headers) must be complete within
  ``Timeouts.header`` seconds of the connection opening, or of the first
  byte of the next request on a kept-alive connection, else 408 and close;
- the head may be at most ``MAX_HEAD_BYTES``, else 431 and close;
- at most ``Timeouts.max_connections`` connections are open at once; one
  more is answered 503 and closed at once.

The body's deadline (``Timeouts.body``) is kept by service_guard, the idle
keep-alive time (``Timeouts.idle``) by uvicorn. Every answer given here is
in the service's error shape, with its security headers.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from meter.postoffice.service_config import Timeouts
from meter.postoffice.service_guard import SECURITY_HEADERS
from meter.postoffice.service_http import error_body

__all__ = ["MAX_HEAD_BYTES", "guarded_protocol", "uvicorn_config"]

MAX_HEAD_BYTES = 64 * 1024  # a request line and headers; ours need well under 4 KiB


def guarded_protocol(timeouts: Timeouts) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the head timeout, head limit and connection limit."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional: h11 is slower but equivalent
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    open_connections = [0]

    class GuardedProtocol(Base):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            open_connections[0] += 1
            self._meter_counted = True
            self._meter_head_bytes = 0
            self._meter_in_head = True
            self._meter_head_timer: asyncio.TimerHandle | None = None
            if open_connections[0] > timeouts.max_connections:
                _answer_and_close(
                    transport,
                    503,
                    "Busy",
                    f"{timeouts.max_connections} connections are open already; "
                    "connect again shortly",
                )
                return
            self._meter_arm()

        def data_received(self, data: bytes) -> None:
            head_before = self._meter_in_head
            super().data_received(data)  # may finish the head: the rest of `data` is body
            if head_before and self._meter_in_head:
                self._meter_head_bytes += len(data)
                if self._meter_head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                    self._meter_disarm()
                    _answer_and_close(
                        self.transport,
                        431,
                        "InvalidInput",
                        f"request head is larger than {MAX_HEAD_BYTES} bytes",
                    )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._meter_in_head = True
            self._meter_head_bytes = 0
            if self._meter_head_timer is None:
                self._meter_arm()  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._meter_in_head = False
            self._meter_disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._meter_disarm()
            if self._meter_counted:
                open_connections[0] -= 1
                self._meter_counted = False
            super().connection_lost(exc)

        def _meter_arm(self) -> None:
            loop = asyncio.get_running_loop()
            self._meter_head_timer = loop.call_later(timeouts.header, self._meter_too_slow)

        def _meter_disarm(self) -> None:
            if self._meter_head_timer is not None:
                self._meter_head_timer.cancel()
                self._meter_head_timer = None

        def _meter_too_slow(self) -> None:
            self._meter_head_timer = None
            if self._meter_in_head and not self.transport.is_closing():
                _answer_and_close(
                    self.transport,
                    408,
                    "Timeout",
                    f"no complete request head within {timeouts.header:g} s",
                )

    return GuardedProtocol


def uvicorn_config(app: Any, host: str, port: int, timeouts: Timeouts, **more: Any) -> Any:
    """The uvicorn.Config that `meter postoffice serve` and the tests run the service with."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(timeouts),
        timeout_keep_alive=max(1, round(timeouts.idle)),
        # A backstop behind the protocol's own limit, which answers in our shape.
        limit_concurrency=timeouts.max_connections + 16,
        backlog=min(2048, timeouts.max_connections * 2),
        server_header=False,
        **more,
    )


def _answer_and_close(transport: Any, status: int, kind: str, message: str) -> None:
    body = json.dumps(error_body(kind, message)).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name.decode()}: {value.decode()}" for name, value in SECURITY_HEADERS),
    ]
    if status == 503:
        lines.append("retry-after: 2")
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    transport.close()
