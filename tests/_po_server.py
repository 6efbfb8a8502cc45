"""The post office service on a real uvicorn server, with its exposed-server protocol."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from meter.postoffice.service import ServiceConfig, create_app
from meter.postoffice.service_server import uvicorn_config


@contextmanager
def running_service(config: ServiceConfig) -> Iterator[tuple[str, int]]:
    """(host, port) of the service on a free loopback port, stopped afterwards."""
    app = create_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", port, config.timeouts, log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.025)
        assert server.started, "uvicorn did not start"
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def raw_exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send bytes on a new connection and read until the server closes it (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(data)
        return read_until_closed(conn)


def read_until_closed(conn: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass  # a server that answered and closed at once may reset what we sent after
    return received
