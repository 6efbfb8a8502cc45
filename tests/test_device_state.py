"""The device state's MAC'd generations on SoftHSM2: a crash between the steps of a commit,
a tampered object, and nothing valid left."""

from __future__ import annotations

import pytest

from meter.cli.home import Home
from meter.errors import RegisterCorrupt
from meter.psd.device_state import STATE_APPLICATION, DeviceState, DeviceStateStore
from meter.psd.generations import Generations
from tests.conftest import TEST_PINS

pytestmark = pytest.mark.softhsm


def test_a_crash_after_the_new_generation_keeps_the_newest_and_removes_the_old(
    provisioned: Home,
) -> None:
    with provisioned.open_token("meter", TEST_PINS["METER_USER_PIN"]) as token:
        store = DeviceStateStore.open(token)
        store.commit(store.current.next(customer="ACME-1"))
        # The next commit's new object is durable, then the process dies before retiring
        # the old one: both generations are in the token.
        generations: Generations[DeviceState] = Generations(token, STATE_APPLICATION, private=False)
        generations.write("state-2", store.current.next(customer="ACME-2").body())
        assert len(token.data_objects(STATE_APPLICATION)) == 2
        reopened = DeviceStateStore.open(token)
        assert (reopened.current.generation, reopened.current.customer) == (2, "ACME-2")
        assert len(token.data_objects(STATE_APPLICATION)) == 1


def test_a_tampered_state_object_is_ignored_and_never_trusted(provisioned: Home) -> None:
    with provisioned.open_token("meter", TEST_PINS["METER_USER_PIN"]) as token:
        store = DeviceStateStore.open(token)
        store.commit(store.current.next(customer="ACME-1"))
        forged = store.current.next(withdrawn_at="2026-01-01T00:00:00+00:00").body()
        token.create_data(STATE_APPLICATION, "state-9", forged + bytes(32), private=False)
        # Before logon the display shows the newest object, unverified ...
        assert DeviceStateStore.read_unverified(token).withdrawn_at is not None
        # ... but the firmware's verified state skips it and removes it.
        reopened = DeviceStateStore.open(token)
        assert reopened.current.customer == "ACME-1" and reopened.current.withdrawn_at is None
        assert len(token.data_objects(STATE_APPLICATION)) == 1


def test_no_valid_state_object_stops_the_device(provisioned: Home) -> None:
    with provisioned.open_token("meter", TEST_PINS["METER_USER_PIN"]) as token:
        token.create_data(
            STATE_APPLICATION,
            "state-1",
            DeviceState(generation=1).body() + bytes(32),
            private=False,
        )
        with pytest.raises(RegisterCorrupt, match="no device state object with a valid MAC"):
            DeviceStateStore.open(token)
        assert len(token.data_objects(STATE_APPLICATION)) == 1  # left as found
