"""The device process for the crash tests: `meterd`, dying by SIGKILL on cue.

Run as ``python tests/_crash_device.py HOME POINT N``. With POINT other than
"none", the device SIGKILLs itself the N-th time it reaches that point of a
token or audit operation. The wrapping happens here, in the test harness
(tests/_crash_child.py), never in the meter's code.
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
killer.wrap(session.Token, "hmac", "before-hmac", None)

# Counted from the first issue or credit request on: power-up, logon and a retried
# grant pass untouched.
before_call(PSD, "create_indicium", lambda: killer.arm(point, nth))
before_call(PSD, "request_credit", lambda: killer.arm(point, nth))

sys.argv = ["meterd", "--home", home_path, "--json"]
meterd_main()
