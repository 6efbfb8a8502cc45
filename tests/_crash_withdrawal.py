"""The device process for the withdrawal crash tests: `meterd`, dying by SIGKILL on cue.

Run as ``python tests/_crash_withdrawal.py HOME POINT N``: the device SIGKILLs itself the
N-th time it reaches POINT of a token or audit operation, counted from the first Withdraw
PSD call on. As in tests/_crash_device.py, the wrapping lives in the test harness only
(tests/_crash_child.py).
"""

from __future__ import annotations

import sys

from _crash_child import Killer, before_call, wrap_device  # this file's folder leads sys.path

from meter.cli.device_process import meterd_main
from meter.psd.firmware import PSD
from meter.token import session

home_path, point, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
killer = Killer()
wrap_device(killer)
killer.wrap(session.Token, "destroy_key", "before-destroy-key", "after-destroy-key")

before_call(PSD, "withdraw_psd", lambda: killer.arm(point, nth))

sys.argv = ["meterd", "--home", home_path, "--json"]
meterd_main()
