"""`meter provider serve` as a process of its own, for the tests that reach the provider's
service the way meters and operators do (reload, audit and withdrawal routes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from meter.cli.home import Home

__all__ = ["free_port", "serving"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(home: Home, *options: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`meter --home HOME provider serve OPTIONS` on a free port, once it answers /healthz:
    its URL and its process (error output piped). Stopped with SIGINT, as an operator
    would, unless the test ended it already."""
    port = free_port()
    command = [sys.executable, "-m", "meter.cli.main", "--home", str(home.path)]
    server = subprocess.Popen(
        [*command, "provider", "serve", *options, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(0.1)
        else:
            raise AssertionError("meter provider serve did not answer")
        yield base, server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.communicate(timeout=30)
