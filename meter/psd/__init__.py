"""The device's logic (its firmware): registers, identity, issuing, credit."""

from meter.psd.device import IssueRequest, Meter, system_clock
from meter.psd.identity import DeviceIdentity
from meter.psd.registers import Registers

__all__ = ["DeviceIdentity", "IssueRequest", "Meter", "Registers", "system_clock"]
