"""The installed update bundle in the device's token: a private data object pinned by hash.

Update PSC writes the bundle's canonical document as a new private object and makes it
durable, then commits a device state naming its SHA-256 (DeviceState.psc_bundle_sha256,
under the register MAC through the state's pinned generation), then destroys the
previous bundle's object. So, as with the state and the registers
(meter.psd.generations), a crash at any instant leaves either the old or the new
bundle installed. On open the device takes exactly the object whose SHA-256 the state
pins and removes any other (an install interrupted before its commit); a pinned
bundle that is missing or whose bytes differ means tampering or a rollback, and the
device must not operate. The signature was verified at install time: the pin is what
keeps the bytes the device computes postage from the bytes it verified.
"""

from __future__ import annotations

import hashlib

from meter.errors import MeterError, RegisterCorrupt
from meter.protocol.update_bundle import UpdateBundle
from meter.token import DataObject, Token

__all__ = ["BUNDLE_APPLICATION", "load_installed", "retire", "stage"]

BUNDLE_APPLICATION = "meter.psc-bundle"


def stage(token: Token, bundle: UpdateBundle) -> DataObject:
    """Write the bundle durably; it counts once a committed state pins its hash."""
    obj = token.create_data(
        BUNDLE_APPLICATION, f"bundle-{bundle.sha256[:16]}", bundle.to_bytes(), private=True
    )
    token.make_durable()
    return obj


def retire(token: Token, keep: str) -> None:
    """Destroy every bundle object but the one whose SHA-256 is ``keep``."""
    for obj in token.data_objects(BUNDLE_APPLICATION):
        if hashlib.sha256(obj.value).hexdigest() != keep:
            token.destroy(obj)


def load_installed(token: Token, pinned: str | None) -> UpdateBundle | None:
    """The bundle the state pins (None if none is installed); objects it does not pin go."""
    objects = token.data_objects(BUNDLE_APPLICATION)
    chosen = next(
        (o for o in objects if pinned and hashlib.sha256(o.value).hexdigest() == pinned), None
    )
    if pinned is not None and chosen is None:
        raise RegisterCorrupt(
            f"{token.where}: the update bundle {pinned[:16]}... that the device state pins is "
            f"missing or altered ({len(objects)} bundle object(s) found): the device must not "
            "operate"
        )
    for obj in objects:
        if obj is not chosen:  # written by an install that never committed
            token.destroy(obj)
    if chosen is None:
        return None
    try:
        return UpdateBundle.from_bytes(chosen.value, "the installed update bundle")
    except MeterError as exc:  # the hash matched what was verified: only a format change
        raise RegisterCorrupt(f"{token.where}: the installed update bundle: {exc}") from exc
