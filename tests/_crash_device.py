"""The device process for the crash tests: `meterd`, dying by SIGKILL on cue.

Run as ``python tests/_crash_device.py HOME POINT N``. With POINT other than
"none", the device SIGKILLs itself the N-th time it reaches that point of a
token or audit operation. The wrapping happens here, in the test harness,
never in the meter's code.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from meter.cli.device_process import meterd_main
from meter.psd.audit import AuditLog
from meter.psd.firmware import PSD
from meter.token import session

home_path, point, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = {"count": 0, "armed": False}


def die_at(name: str) -> None:
    # Counted from the first issue or credit request on: power-up, logon and a retried
    # grant pass untouched.
    if name == point and seen["armed"]:
        seen["count"] += 1
        if seen["count"] >= nth:
            os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner: Any, attr: str, before: str | None, after: str | None) -> None:
    original: Callable[..., Any] = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            die_at(before)
        result = original(*args, **kwargs)
        if after:
            die_at(after)
        return result

    setattr(owner, attr, wrapper)


wrap(session.Token, "create_data", "before-create", "after-create")
wrap(session.Token, "make_durable", None, "after-sync")
wrap(session.Token, "destroy", None, "after-destroy")
wrap(session.Token, "sign", "before-sign", "after-sign")
wrap(session.Token, "hmac", "before-hmac", None)
wrap(AuditLog, "append", "before-audit", "after-audit")


def arming(owner: Any, attr: str) -> None:
    original: Callable[..., Any] = getattr(owner, attr)

    def armed(*args: Any, **kwargs: Any) -> Any:
        seen["armed"] = True
        return original(*args, **kwargs)

    setattr(owner, attr, armed)


arming(PSD, "create_indicium")
arming(PSD, "request_credit")

sys.argv = ["meterd", "--home", home_path, "--json"]
meterd_main()
