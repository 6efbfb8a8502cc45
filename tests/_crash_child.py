"""Dying by SIGKILL on cue: what the crash tests' child processes share.

The device processes of tests/_crash_device.py and tests/_crash_withdrawal.py and
both processes of tests/_reload_harness.py wrap some of the meter's or the
provider's operations so that each reports named points (``before-sign``,
``after-audit``, ...) to a `Killer`. Once armed with a point and a count N, the
killer SIGKILLs its own process the N-th time that point is reached. The
wrapping happens here, in the test harness, never in the meter's or the
provider's code.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["ANY_POINT", "Killer", "before_call", "wrap_device"]

ANY_POINT = "random"  # armed with this, every point reached counts


class Killer:
    """Counts the points reached while armed; SIGKILLs this process at the N-th."""

    def __init__(self) -> None:
        self.point: str | None = None  # None: disarmed, nothing counts
        self.nth = 0
        self.count = 0

    def arm(self, point: str, nth: int) -> None:
        """Count ``point`` from now on; arming again keeps the count reached so far."""
        self.point, self.nth = point, nth

    def disarm(self) -> None:
        self.point, self.nth, self.count = None, 0, 0

    def die_at(self, name: str) -> None:
        if self.point is not None and self.point in (ANY_POINT, name):
            self.count += 1
            if self.count >= self.nth:
                os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, owner: Any, attr: str, before: str | None, after: str | None) -> None:
        """Make ``owner.attr`` report ``before`` as it is called and ``after`` once it returns."""
        original: Callable[..., Any] = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                self.die_at(before)
            result = original(*args, **kwargs)
            if after:
                self.die_at(after)
            return result

        setattr(owner, attr, wrapper)


def before_call(owner: Any, attr: str, hook: Callable[[], None]) -> None:
    """Make ``owner.attr`` run ``hook()`` first (to arm a killer at a chosen request)."""
    original: Callable[..., Any] = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hook()
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


def wrap_device(killer: Killer, sync: str = "make_durable") -> None:
    """The points every device child reports: the token's object writes, syncs (through
    ``sync``), destroys and signatures, and the audit log's appends."""
    from meter.psd.audit import AuditLog
    from meter.token import session

    killer.wrap(session.Token, "create_data", "before-create", "after-create")
    killer.wrap(session.Token, sync, None, "after-sync")
    killer.wrap(session.Token, "destroy", None, "after-destroy")
    killer.wrap(session.Token, "sign", "before-sign", "after-sign")
    killer.wrap(AuditLog, "append", "before-audit", "after-audit")
