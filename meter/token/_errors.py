"""PKCS#11 errors translated once, at the boundary, into the project's tree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pkcs11.exceptions as p11e

from meter.errors import (
    AuthenticationFailed,
    ConfigurationError,
    DeviceLocked,
    MeterError,
    TokenError,
    TokenUnavailable,
)

__all__ = ["translated"]


@contextmanager
def translated(where: str, what: str) -> Iterator[None]:
    """Map any PKCS#11 exception raised inside to a MeterError naming module, token and object.

    ``where`` names the module and token ("token 'meter' in module /usr/lib/..."),
    ``what`` the operation and object ("sign with key 'signing'").
    """
    try:
        yield
    except MeterError:
        raise
    except p11e.PinIncorrect as exc:
        raise AuthenticationFailed(f"{where}: wrong PIN ({what})") from exc
    except p11e.PinLocked as exc:
        raise DeviceLocked(f"{where}: PIN locked after too many wrong PINs ({what})") from exc
    except (p11e.PinLenRange, p11e.PinInvalid) as exc:
        raise AuthenticationFailed(
            f"{where}: PIN has an invalid length or characters ({what})"
        ) from exc
    except p11e.NoSuchToken as exc:
        raise ConfigurationError(f"{where}: no such token ({what}); run `meter init`") from exc
    except (p11e.TokenNotPresent, p11e.DeviceRemoved, p11e.SessionClosed) as exc:
        raise TokenUnavailable(f"{where}: token not present ({what})") from exc
    except (p11e.DeviceMemory, p11e.HostMemory) as exc:
        raise TokenUnavailable(f"{where}: out of memory ({what})") from exc
    except p11e.MechanismInvalid as exc:
        raise TokenError(f"{where}: mechanism not supported ({what})") from exc
    except p11e.NoSuchKey as exc:
        raise TokenError(f"{where}: object not found ({what})") from exc
    except p11e.MultipleObjectsReturned as exc:
        raise TokenError(f"{where}: more than one object matches ({what})") from exc
    except p11e.PKCS11Error as exc:
        raise TokenError(f"{where}: {type(exc).__name__} ({what})") from exc
