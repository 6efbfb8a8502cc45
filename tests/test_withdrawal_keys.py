"""A device withdrawn for a key ceremony's move keeps no private key either: the reload key,
which never moves (the replacement makes its own), goes with the keys that moved."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meter.cli.home import Home
from meter.psd.firmware import PSD
from meter.psd.register_store import MAC_KEY_LABEL
from meter.psd.services_custody_import import MOVED_AWAY
from meter.psd.services_reload import RELOAD_KEY_LABEL
from tests.conftest import ROLE_USERS, open_meter_token
from tests.test_withdrawal import certify_reload

pytestmark = pytest.mark.softhsm


def test_a_source_withdrawn_for_a_move_loses_its_reload_key_at_the_next_logon(
    device_home: Home,
) -> None:
    home = device_home
    certify_reload(home)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(*ROLE_USERS["security-officer"])
        meter = psd._require_meter()
        # The move's commit point (ceremony_finish_move), and the device dying right after
        # it, before it retired the keys: the state says withdrawn for the ceremony.
        at = datetime.now(UTC).isoformat()
        meter.commit_state(
            meter.state.next(withdrawn_at=at, withdrawn_for="move-1", signing_key_active=False)
        )
    with open_meter_token(home) as token:
        assert token.has_key(RELOAD_KEY_LABEL)  # the crash left every key in place
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon(*ROLE_USERS["security-officer"])  # the next logon finishes the withdrawal
        assert psd.module_state() == "withdrawn"
    with open_meter_token(home) as token:
        assert not any(token.has_key(label) for label in MOVED_AWAY)
        assert not token.has_key(RELOAD_KEY_LABEL)
        assert token.has_key(MAC_KEY_LABEL)  # the final registers stay readable
