"""The project's one exception tree, grouped by what the caller should do.

Messages name the broken rule and the thing involved; they never carry a
PIN, password or key material.
"""

from __future__ import annotations


class MeterError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigurationError(MeterError):
    """A profile, home folder or configuration file is missing or wrong: fix it."""


class InvalidInput(MeterError):
    """A request's value breaks a rule (postage, ZIP, date, rate category): fix the request."""


class TokenUnavailable(MeterError):
    """The token or its module cannot be reached now (busy, locked by another process): retry."""


class DeviceNotRunning(TokenUnavailable):
    """No device process answers on the home's socket: start it (``meter device serve``)."""


class TokenError(MeterError):
    """The token refused an operation or holds something unexpected: do not retry blindly."""


class AuthenticationFailed(MeterError):
    """Wrong PIN or password: never retry automatically."""


class LockedOut(AuthenticationFailed):
    """Too many failed logons: wait until the time the message names, or ask an Administrator."""


class AccessDenied(MeterError):
    """The logged-on role may not use the service."""


class SessionActive(MeterError):
    """Another user is logged on: one user at a time (rule 4). Log off first."""


class DeviceLocked(MeterError):
    """The device is in a state (error, withdrawn, uninitialized) that refuses the service."""


class InsufficientFunds(MeterError):
    """The descending register does not cover the postage asked for."""


class RegisterCorrupt(MeterError):
    """No register record in the token carries a valid MAC: the meter must not issue."""


class ProtocolError(MeterError):
    """A message between parties failed its checks (signature, nonce, device, replay)."""


class CertificateError(MeterError):
    """A certificate or certificate file is unreadable or does not fit the spec."""


class IndiciumError(MeterError):
    """An indicium cannot be built or decoded."""


class MalformedIndicium(IndiciumError):
    """The bytes do not decode as PIM-1 (the spec's MALFORMED row)."""


class BarcodeError(MeterError):
    """No readable barcode in an image, or a barcode that cannot be produced."""


class ReplayStoreError(MeterError):
    """The replay store is unreachable, corrupt or truncated: never report VALID."""


class CustodyError(MeterError):
    """A key custodian's share cannot be split, stored, read or combined as asked: the
    message names the share and the rule (checksum, another set, too few shares, ...)."""


__all__ = [
    "AccessDenied",
    "AuthenticationFailed",
    "BarcodeError",
    "CertificateError",
    "ConfigurationError",
    "CustodyError",
    "DeviceLocked",
    "DeviceNotRunning",
    "IndiciumError",
    "InsufficientFunds",
    "InvalidInput",
    "LockedOut",
    "MalformedIndicium",
    "MeterError",
    "ProtocolError",
    "RegisterCorrupt",
    "ReplayStoreError",
    "SessionActive",
    "TokenError",
    "TokenUnavailable",
]
