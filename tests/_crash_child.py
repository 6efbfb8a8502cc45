"""Child process for the crash tests: issues pieces until it is killed.

Run as ``python tests/_crash_child.py HOME RELEASED POINT N``. Every piece the
meter releases is appended to RELEASED (fsync'ed) before its label is
written. With POINT other than "none", the process SIGKILLs itself at the
N-th time it reaches that point; the wrapping happens here, in the test
harness, never in the meter's code.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meter.cli import workflows
from meter.cli.home import Home
from meter.indicium import RateCategory
from meter.psd import IssueRequest, Meter
from meter.token import session

home_path, released_path, point, nth = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
seen = {"count": 0}


def die_at(name: str) -> None:
    if name == point:
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


def record_release(indicium: Any) -> None:
    with released_path.open("a") as f:
        f.write(
            f"{indicium.sequence} {indicium.postage} {indicium.ascending} {indicium.to_bytes().hex()}\n"
        )
        f.flush()
        os.fsync(f.fileno())


original_issue = Meter.issue


def issue_and_record(self: Meter, request: IssueRequest) -> Any:
    indicium = original_issue(self, request)
    record_release(indicium)  # the indicium has left the meter
    return indicium


Meter.issue = issue_and_record  # type: ignore[method-assign]
wrap(workflows, "write_label", "during-label", None)

home = Home.at(Path(home_path))
print("ready", flush=True)
for i in range(10_000):
    workflows.issue(
        home,
        IssueRequest(
            postage=100 + (i % 7),
            rate_category=RateCategory.FIRST_CLASS_LETTER,
            origin_zip="94043",
            destination_zip="62704",
            address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
        ),
    )
