"""The device's identity and certificates, kept as objects in its own token."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from meter.errors import InvalidInput, TokenError
from meter.token import KeyAlgorithm, Token

__all__ = ["IDENTITY_APPLICATION", "DeviceIdentity", "load_identity", "store_identity"]

IDENTITY_APPLICATION = "meter.identity"
_VENDOR_MODEL = re.compile(r"[A-Z0-9]{4}")


@dataclass(frozen=True)
class DeviceIdentity:
    device_serial: int
    vendor_model: str
    authorization_id: int
    algorithm: KeyAlgorithm
    software_id: int

    def __post_init__(self) -> None:
        if not 0 < self.device_serial < 2**64:
            raise InvalidInput(f"device serial {self.device_serial} must be in 1..2^64-1")
        if not _VENDOR_MODEL.fullmatch(self.vendor_model):
            raise InvalidInput(
                f"vendor and model '{self.vendor_model}' must be 4 characters A-Z or 0-9"
            )
        if not 0 < self.authorization_id < 2**32:
            raise InvalidInput(f"authorization id {self.authorization_id} must be in 1..2^32-1")
        if not 0 <= self.software_id < 2**16:
            raise InvalidInput(f"software id {self.software_id} must fit in 2 bytes")


def store_identity(token: Token, identity: DeviceIdentity) -> None:
    if token.data_objects(IDENTITY_APPLICATION):
        raise TokenError(f"{token.where}: the device is provisioned already")
    token.create_data(IDENTITY_APPLICATION, "identity", json.dumps(asdict(identity)).encode())
    token.make_durable()


def load_identity(token: Token) -> DeviceIdentity:
    objects = token.data_objects(IDENTITY_APPLICATION)
    if len(objects) != 1:
        raise TokenError(
            f"{token.where}: expected one device identity object, found {len(objects)} "
            "(not provisioned? run `meter init`)"
        )
    try:
        data = json.loads(objects[0].value)
        data["algorithm"] = KeyAlgorithm(data["algorithm"])
        return DeviceIdentity(**data)
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"{token.where}: device identity object is unreadable") from exc
