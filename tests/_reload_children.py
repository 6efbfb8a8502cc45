"""The two child processes of the reload fault harness (tests/_reload_harness.py):

    python tests/_reload_children.py device HOME
    python tests/_reload_children.py provider HOME LEDGER STATUS

LEDGER is a SQLite file's path or a postgresql:// URL. Each process SIGKILLs itself the
N-th time it reaches POINT during the one reload the harness armed it for
(HOME/fault-device.txt or HOME/fault-provider.txt, "POINT N", read and removed at that
reload's first step). The wrapping happens here, in the harness (tests/_crash_child.py),
never in the meter's or the provider's code. Started warm: the imports first, then a
"go" line on stdin; the ready process prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meter.cli.home import Home  # noqa: E402
from tests._crash_child import ANY_POINT, Killer, before_call, wrap_device  # noqa: E402

DEVICE_FAULT = "fault-device.txt"  # "POINT N": the next reload's fault, read at its begin
PROVIDER_FAULT = "fault-provider.txt"


def _armed_killer(control: Path, span: int) -> tuple[Killer, Callable[[], None]]:
    """A killer for the wrapped operations, and ``arm()`` for the first step of each
    reload: it reads the fault the harness wrote to ``control`` for this one reload (and
    removes it), or disarms when there is none, so a fault never outlives its run."""
    killer = Killer()

    def arm() -> None:
        killer.disarm()
        try:
            point, nth = control.read_text().split()
        except (OSError, ValueError):
            return
        control.unlink()
        if point == ANY_POINT:  # the k-th of all points reached, k drawn from the seed
            killer.arm(point, random.Random(int(nth)).randint(1, span))
        else:
            killer.arm(point, int(nth))

    return killer, arm


def device_main(home_path: str) -> None:
    from meter.cli.device_process import meterd_main
    from meter.psd import services_reload
    from meter.psd.firmware import PSD

    killer, arm = _armed_killer(Path(home_path) / DEVICE_FAULT, 18)
    wrap_device(killer, sync="make_durable_async")
    killer.wrap(services_reload, "shared_secret", "before-derive", None)
    before_call(PSD, "reload_begin", arm)
    sys.argv = ["meterd", "--home", home_path, "--json"]
    meterd_main()


def provider_main(home_path: str, ledger: str, status: str) -> None:
    import uvicorn

    from meter.provider import Provider
    from meter.provider import reload_server as rs
    from meter.provider.http import create_provider_app
    from meter.provider.http_config import ProviderConfig
    from meter.provider.ledger_sql import SqlLedger, open_ledger
    from meter.provider.reload_routes import reload_router

    killer, arm = _armed_killer(Path(home_path) / PROVIDER_FAULT, 12)
    for step in ("hello", "finish", "answers", "receipt"):
        attr = "_hello" if step == "hello" else f"_on_{step}"
        killer.wrap(rs.ReloadServer, attr, f"before-{step}", f"after-{step}")
    # The writes' common class: the same points on SQLite and on PostgreSQL.
    for name in ("prepare", "commit", "abort"):
        killer.wrap(SqlLedger, name, f"before-{name}", f"after-{name}")
    before_call(rs.ReloadServer, "hello", arm)
    home = Home.at(Path(home_path))
    token = home.open_token("provider")
    provider = Provider.open(token, home.ledger)
    opened = open_ledger(ledger)
    server = rs.ReloadServer(provider, opened, Path(status).read_bytes())
    # The provider's own service (meter/provider/http.py), with the reload routes in it.
    config = ProviderConfig(ledger=ledger, keys=home.path / "provider-keys.json")
    app = create_provider_app(config, opened, provider, routers=[reload_router(server)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until the server takes them
    port = sock.getsockname()[1]
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    served = uvicorn.Config(app, log_level="error", access_log=False, workers=1)
    uvicorn.Server(served).run(sockets=[sock])


def _warm(argv: list[str]) -> None:
    """Import what the process will need before it is told to go."""
    if argv[0] == "device":
        import meter.cli.device_process
        import meter.psd.daemon
        import meter.psd.firmware
    else:
        import meter.provider.http
        import meter.provider.ledger_sqlite
        import meter.provider.reload_routes

        if argv[2].startswith(("postgresql://", "postgres://")):
            import meter.provider.ledger_postgres  # noqa: F401


if __name__ == "__main__":
    mode = sys.argv[1]
    _warm(sys.argv[1:])
    if sys.stdin.readline() != "go\n":  # EOF: the harness let the spare go unused
        raise SystemExit(0)
    if mode == "device":
        device_main(sys.argv[2])
    elif mode == "provider":
        provider_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with suppress(Exception):
        sys.stdout.flush()
