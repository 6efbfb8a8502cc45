"""The host software's side of the device: a client of its socket, holding no PIN or key."""

from meter.host.client import DeviceClient

__all__ = ["DeviceClient"]
