"""The device process for the withdrawal crash tests: `meterd`, dying by SIGKILL on cue.

Run as ``python tests/_crash_withdrawal.py HOME POINT N``: the device SIGKILLs itself the
N-th time it reaches POINT of a token or audit operation, counted from the first Withdraw
PSD call on. As in tests/_crash_device.py, the wrapping lives in the test harness only.
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
wrap(session.Token, "destroy_key", "before-destroy-key", "after-destroy-key")
wrap(session.Token, "sign", "before-sign", "after-sign")
wrap(AuditLog, "append", "before-audit", "after-audit")

original_withdraw: Callable[..., Any] = PSD.withdraw_psd


def armed(*args: Any, **kwargs: Any) -> Any:
    seen["armed"] = True
    return original_withdraw(*args, **kwargs)


PSD.withdraw_psd = armed  # type: ignore[method-assign]

sys.argv = ["meterd", "--home", home_path, "--json"]
meterd_main()
