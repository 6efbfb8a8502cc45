"""The device state and certificate chain, pinned by the register record, on SoftHSM2: a crash
between the steps of a commit, a forged, deleted or rolled-back state, a foreign root."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization

from meter.cli.home import Home
from meter.errors import RegisterCorrupt
from meter.psd import Meter
from meter.psd.device import CERT_APPLICATION
from meter.psd.device_state import STATE_APPLICATION, DeviceState
from meter.psd.generations import Generations
from meter.psd.register_store import APPLICATION as REGISTERS
from meter.psd.registers import NO_ROOT
from tests.conftest import open_meter_token

pytestmark = pytest.mark.softhsm


def test_state_and_chain_are_private_and_pinned_by_the_registers(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        meter = Meter.open(token)
        pinned = meter.registers
        assert pinned.state_generation == meter.state.generation == 1
        root_der = meter.certificates.root.public_bytes(serialization.Encoding.DER)  # type: ignore[union-attr]
        assert pinned.root_digest == hashlib.sha256(root_der).digest() != NO_ROOT
        meter.commit_state(meter.state.next(customer="ACME-1"))
        assert meter.registers.state_generation == 2
        token.logout()  # a public session: what anyone without the PIN sees
        for application in (STATE_APPLICATION, CERT_APPLICATION, REGISTERS):
            assert token.data_objects(application) == [], application


def test_a_crash_before_the_register_commit_undoes_the_staged_state(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        meter = Meter.open(token)
        meter.commit_state(meter.state.next(customer="ACME-1"))
        # The next commit's state object is durable, then the process dies before the
        # register record pins it: the change never happened.
        generations: Generations[DeviceState] = Generations(token, STATE_APPLICATION)
        generations.write("state-3", meter.state.next(customer="ACME-2").body())
        assert len(token.data_objects(STATE_APPLICATION)) == 2
        reopened = Meter.open(token)
        assert (reopened.state.generation, reopened.state.customer) == (2, "ACME-1")
        assert len(token.data_objects(STATE_APPLICATION)) == 1


def test_a_crash_after_the_register_commit_keeps_the_new_state(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        meter = Meter.open(token)
        old = meter.state
        staged = meter._state.stage(old.next(customer="ACME-2"))
        meter._registers.commit(meter.registers.pinning(state_generation=old.generation + 1))
        del staged  # died before retiring the old object
        assert len(token.data_objects(STATE_APPLICATION)) == 2
        reopened = Meter.open(token)
        assert (reopened.state.generation, reopened.state.customer) == (2, "ACME-2")
        assert len(token.data_objects(STATE_APPLICATION)) == 1


def test_a_forged_state_object_is_never_trusted(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        meter = Meter.open(token)
        forged = meter.state.next(withdrawn_at="2026-01-01T00:00:00+00:00")
        token.create_data(STATE_APPLICATION, "state-2", forged.body() + bytes(32))
        reopened = Meter.open(token)
        assert reopened.state.withdrawn_at is None and reopened.state.generation == 1
        assert len(token.data_objects(STATE_APPLICATION)) == 1


def test_a_deleted_state_stops_the_device_instead_of_starting_fresh(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        meter = Meter.open(token)
        meter.commit_state(meter.state.next(withdrawn_at="2026-01-01T00:00:00+00:00"))
        for obj in token.data_objects(STATE_APPLICATION):
            token.destroy(obj)
        with pytest.raises(RegisterCorrupt, match="generation 2, which the register record"):
            Meter.open(token)


def test_an_older_state_put_back_is_a_rollback(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        meter = Meter.open(token)
        before = token.data_objects(STATE_APPLICATION)[0].value  # generation 1, MAC valid
        meter.commit_state(meter.state.next(signing_key_active=False))
        for obj in token.data_objects(STATE_APPLICATION):
            token.destroy(obj)
        token.create_data(STATE_APPLICATION, "state-1", before)  # the old bytes, MAC and all
        with pytest.raises(RegisterCorrupt, match="rolled back"):
            Meter.open(token)
        assert len(token.data_objects(STATE_APPLICATION)) == 1  # left as found: evidence


def test_a_certificate_chain_from_another_root_is_refused(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        root = next(o for o in token.data_objects(CERT_APPLICATION) if o.label == "postal-root")
        token.destroy(root)
        provider = next(o for o in token.data_objects(CERT_APPLICATION) if o.label == "provider")
        token.create_data(CERT_APPLICATION, "postal-root", provider.value)  # another "root"
        with pytest.raises(RegisterCorrupt, match="not the one the device was authorized under"):
            Meter.open(token)
        token.create_data(CERT_APPLICATION, "postal-root", root.value)  # an extra one
        with pytest.raises(RegisterCorrupt, match="unexpected certificate object"):
            Meter.open(token)


def test_certificates_an_interrupted_authorization_left_are_removed(home: Home) -> None:
    from meter.cli import provision
    from tests.conftest import TEST_METER_PINS

    provision.init_home(
        home, provision.InitOptions(device_serial=983973031309), meter_pins=TEST_METER_PINS
    )
    with open_meter_token(home) as token:
        meter = Meter.open(token)
        # As if Authorize PSD had written the chain and died before the register commit.
        registers = meter.registers
        meter._registers.commit(registers.pinning(root_digest=NO_ROOT))
        assert len(token.data_objects(CERT_APPLICATION)) == 3
        reopened = Meter.open(token)
        assert reopened.certificates is None
        assert token.data_objects(CERT_APPLICATION) == []
