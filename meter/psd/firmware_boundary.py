"""The firmware's service boundary: who is calling, and the one gate every service passes.

A request of the device's socket runs as the open session's user only when it presents
that session's credential from the process that logged on (meter.psd.host_session);
otherwise as No-Role (`ServiceBoundary.request`, `ServiceBoundary.caller`). An idle
session, or one whose client process has gone, ends before anyone's call is taken.
Every service call passes through `ServiceBoundary._service`, which checks the caller's
role against `roles.MATRIX` (the one copy of Table 2), refuses cryptographic services in
the error and withdrawn states, and writes an audit record of the outcome, allowed or
not. `FirmwareCore` (meter.psd.firmware_core) builds power, Logon and the self-tests on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization

from meter.errors import AccessDenied, DeviceLocked, MeterError
from meter.psd.audit import AuditLog, AuditRecord, audit_key_algorithm, audit_key_id
from meter.psd.device import Meter
from meter.psd.device_state import DeviceState
from meter.psd.host_session import Credential, HostBinding, Peer
from meter.psd.roles import MATRIX, Role, Service, allowed
from meter.psd.selftest import SelfTestReport
from meter.psd.users import UserInfo, UserStore
from meter.token import Token

__all__ = ["AUDIT_KEY_LABEL", "CRYPTO_SERVICES", "Caller", "ServiceBoundary", "Session"]

AUDIT_KEY_LABEL = "audit-signing"

# Refused in the error and withdrawn states: they use a key or change value.
CRYPTO_SERVICES = frozenset(
    {
        Service.CREATE_INDICIUM,
        Service.CREATE_CORRECTION_INDICIUM,
        Service.DOWNLOAD_POSTAGE_VALUE,
        Service.AUTHORIZE_PSD,
        Service.KEY_EXCHANGE,
        Service.CREATE_AUDIT_KEY,
        Service.SAVE_AUDIT_LOG,
        Service.ARCHIVE_AUDIT_LOG,
        Service.UPDATE_PSC,
    }
)
# What a withdrawn device still does: report, audit, manage users, log on and off.
_WITHDRAWN_REFUSES = CRYPTO_SERVICES | {
    Service.AUTHORIZE_CUSTOMER,
    Service.WITHDRAW_PSD,
    Service.SET_CLOCK,
    Service.KEY_ADMINISTRATION,
}


@dataclass
class Session:
    user: UserInfo
    secrets: dict[str, str] = field(repr=False)
    started: datetime
    last_activity: datetime
    binding: HostBinding | None = None  # None: a session of the device's own process


@dataclass(frozen=True)
class Caller:
    user_id: str | None
    role: Role
    # Why a request that presented a session was not taken as it (for the denial message).
    refusal: str | None = None


@dataclass(frozen=True)
class _Request:
    holder: bool  # does this request come from the open session's client?
    refusal: str | None


class ServiceBoundary:
    """Who is calling, the service gate and the audit trail; `FirmwareCore` builds on it."""

    def __init__(
        self,
        token: Token,
        users: UserStore,
        audit: AuditLog,
        clock: Callable[[], datetime],
        idle_timeout: timedelta,
    ) -> None:
        self.token = token
        self.users = users
        self.audit = audit
        self._clock = clock
        self.idle_timeout = idle_timeout
        self._session: Session | None = None
        self._request: _Request | None = None
        self._meter: Meter | None = None
        self.self_tests: SelfTestReport | None = None
        self._error: str | None = None
        # The token PINs unsealed since power-up, held only in this process's memory:
        # the User PIN the token accepted, and the SO PIN once a Security Officer logged on.
        self._pins: dict[str, str] = {}
        self._audit_covered: bool | None = None  # does the token's sync cover the audit log?

    # -- time --------------------------------------------------------------

    def host_now(self) -> datetime:
        return self._clock().astimezone(UTC).replace(microsecond=0)

    def meter_now(self) -> datetime:
        """The meter's clock: the host's UTC clock moved by Set Clock's offset."""
        return self.host_now() + timedelta(seconds=self._device_state().clock_offset_s)

    # -- who is calling ------------------------------------------------------

    @contextmanager
    def request(self, credential: Credential | None, peer: Peer | None) -> Iterator[None]:
        """Run the calls inside for one host request: as the session's user only if the
        request presents the open session's credential from the process that logged on."""
        self.reap()
        session = self._session
        if session is None or session.binding is None:
            refusal = None if credential is None else "no session is open"
            current = _Request(False, refusal)
        else:
            # A session is open (someone else's, or this client's without its credential):
            # say why this request is not it, rather than "nobody is logged on".
            refusal = session.binding.refusal(credential, peer)
            current = _Request(refusal is None, refusal)
        previous, self._request = self._request, current
        try:
            yield
        finally:
            self._request = previous

    def caller(self) -> Caller:
        self._expire_idle()
        session, request = self._session, self._request
        if session is None:
            return Caller(None, Role.NO_ROLE, request.refusal if request else None)
        if request is None:  # the device's own process, not a host request
            if session.binding is None:
                return Caller(session.user.user_id, session.user.role)
            return Caller(None, Role.NO_ROLE)
        if request.holder:
            return Caller(session.user.user_id, session.user.role)
        return Caller(None, Role.NO_ROLE, request.refusal)

    def reap(self) -> None:
        """End the session whose idle time ran out or whose client process has gone."""
        self._expire_idle()
        session = self._session
        if session is not None and session.binding is not None and session.binding.gone():
            self._end_session("client-gone")

    # -- the service boundary ------------------------------------------------

    @contextmanager
    def _service(
        self, service: Service, *, audit_ok: bool = True, **values: Any
    ) -> Iterator[dict[str, Any]]:
        """Enforce Table 2 and the device state; audit what happened either way.

        The body fills the yielded dict with the values the audit record keeps
        (postage, sequence, registers...). Nothing secret goes in it. With
        ``audit_ok=False`` the body writes the "ok" record itself (`_record_ok`), at the
        moment that lets it become durable together with what the service changed.
        """
        caller = self.caller()
        if not allowed(caller.role, service):
            marked = ", ".join(sorted(r.display for r in MATRIX[service]))
            if caller.user_id:
                who = f" (user '{caller.user_id}')"
            elif caller.refusal:
                who = f" (no valid session: {caller.refusal})"
            else:
                who = " (nobody is logged on)"
            reason = (
                f"{service.display} is not allowed to the {caller.role.display} role{who}; "
                f"it is allowed to: {marked}"
            )
            self._record(caller, service.value, "denied", {**values, "reason": reason})
            raise AccessDenied(reason)
        if self._session is not None and caller.user_id is not None:
            self._session.last_activity = self.host_now()
        outcome: dict[str, Any] = dict(values)
        try:
            self._check_state(service)
            yield outcome
        except MeterError as exc:
            self._record(caller, service.value, "failed", {**outcome, "error": str(exc)})
            raise
        if audit_ok:
            self._record(caller, service.value, "ok", outcome)

    def _record_ok(self, service: Service, values: dict[str, Any]) -> None:
        """The "ok" record of a service run with ``audit_ok=False``: written, not yet synced;
        `_audit_sync` (or the token's sync, where it covers the log) makes it durable."""
        self._record(self.caller(), service.value, "ok", values, durable=False)

    @property
    def _audit_sync(self) -> Callable[[], None] | None:
        """What makes unsynced audit records durable, unless the token's sync does already."""
        if self._audit_covered is None:
            self._audit_covered = self.token.covers(self.audit.path.parent)
        return None if self._audit_covered else self.audit.sync

    def _check_state(self, service: Service) -> None:
        if service in CRYPTO_SERVICES and self._error is not None:
            raise DeviceLocked(
                f"the device is in the error state ({self._error}); {service.display} is refused "
                "until the self-tests pass again (Request Device Audit reruns them)"
            )
        withdrawn = self._device_state().withdrawn_at
        if withdrawn is not None and service in _WITHDRAWN_REFUSES:
            raise DeviceLocked(
                f"the device was withdrawn at {withdrawn}; {service.display} is refused"
            )
        withdrawing = self._device_state().withdrawing_since
        if withdrawing is not None and service in _WITHDRAWN_REFUSES - {Service.WITHDRAW_PSD}:
            raise DeviceLocked(
                f"a withdrawal of the device began at {withdrawing}; {service.display} is "
                "refused (the provider completes the withdrawal with Withdraw PSD)"
            )

    def _record(
        self,
        caller: Caller,
        service: str,
        outcome: str,
        values: dict[str, Any],
        durable: bool = True,
    ) -> AuditRecord:
        return self.audit.append(
            at=self.host_now(),
            user_id=caller.user_id,
            role=caller.role.value,
            service=service,
            outcome=outcome,
            values=values,
            durable=durable,
        )

    def _expire_idle(self) -> None:
        if self._session is None:
            return
        if self.host_now() - self._session.last_activity > self.idle_timeout:
            self._end_session("idle-timeout")

    def _end_session(self, why: str) -> None:
        assert self._session is not None
        user = self._session.user
        self._seal()
        self._record(Caller(user.user_id, user.role), "session-end", "ok", {"reason": why})
        self._session = None

    # -- helpers -------------------------------------------------------------

    @property
    def unlocked(self) -> bool:
        """Has a logon since power-up logged the device in to its token?"""
        return "user_pin" in self._pins

    def _device_state(self) -> DeviceState:
        """The verified state; before anything is readable, a default that refuses nothing
        a No-Role caller could use (every state-dependent service needs a logon)."""
        return self._meter.state if self._meter is not None else DeviceState()

    def _require_meter(self) -> Meter:
        if self._meter is None:
            if not self.unlocked:
                raise DeviceLocked(
                    "the device has not been unlocked since it started: a user's logon "
                    "unlocks its token"
                )
            raise DeviceLocked(
                "the device is not provisioned (no signing key) or its records failed their "
                "checks; see Request Status"
            )
        return self._meter

    def _audit_signer(self) -> tuple[Callable[[bytes], bytes], bytes] | None:
        if not self.unlocked or not self.token.has_key(AUDIT_KEY_LABEL):
            return None
        spki = self.token.public_key_spki(AUDIT_KEY_LABEL)
        public = serialization.load_der_public_key(spki)
        # The key's own type decides (Create Audit Key chose it from the token's capabilities).
        algorithm = audit_key_algorithm(public)

        def sign(message: bytes) -> bytes:
            return self.token.sign(AUDIT_KEY_LABEL, algorithm, message)

        return sign, audit_key_id(public)

    def _require_audit_signer(self) -> tuple[Callable[[bytes], bytes], bytes]:
        signer = self._audit_signer()
        if signer is None:
            raise DeviceLocked(
                "there is no audit key yet: a Security Officer must run Create Audit Key"
            )
        return signer

    def _seal(self) -> None:
        signer = self._audit_signer()
        if signer is not None:
            self.audit.seal(signer[0], signer[1], self.host_now())
