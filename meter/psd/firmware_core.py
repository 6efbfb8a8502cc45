"""The firmware's core: power, the service boundary, sessions, self-tests and status.

Power-up opens the token without a PIN and runs the self-tests that need
none. The first logon after power-up unseals the token's User PIN from that
user's slot and logs in to the token; the device then stays logged in until
power-down, so the token is logged in to once per device start (SoftHSM2
rewrites its token file at every C_Login). Each logon checks the user's
password against the user store and, while the token is logged in, that the
slot's PIN is the one the token accepted.

One user at a time (rule 4): a session is opened by Logon and ended by
Logoff, the idle timeout, power-down or, for a host session, its process
going away. Over the device's socket a session is bound to the process that
logged on and to a secret (meter.psd.host_session); a request that does not
present it runs as No-Role. Every service call passes through `_service`,
which checks the caller's role against `roles.MATRIX` (the one copy of
Table 2), refuses cryptographic services in the error and withdrawn states,
and writes an audit record of the outcome, allowed or not.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from cryptography.hazmat.primitives import serialization

from meter.errors import (
    AccessDenied,
    AuthenticationFailed,
    DeviceLocked,
    MeterError,
    SessionActive,
)
from meter.psd.audit import AuditLog, AuditRecord, audit_key_algorithm, audit_key_id
from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.device_state import DeviceState
from meter.psd.host_session import Credential, HostBinding, Link, Peer
from meter.psd.passwords import PasswordPolicy
from meter.psd.register_store import MAC_KEY_LABEL, RegisterStore
from meter.psd.roles import MATRIX, Role, Service, allowed
from meter.psd.selftest import SelfTestReport, run_self_tests
from meter.psd.users import UserInfo, UserStore
from meter.psd.watchdog import watchdog_of
from meter.token import KatResult, KeyAlgorithm, Token

__all__ = [
    "AUDIT_KEY_LABEL",
    "CRYPTO_SERVICES",
    "KEY_EXCHANGE_LABEL",
    "Caller",
    "FirmwareCore",
    "ModuleState",
    "Session",
]

AUDIT_KEY_LABEL = "audit-signing"
KEY_EXCHANGE_LABEL = "key-exchange"
DEFAULT_IDLE_TIMEOUT = timedelta(minutes=15)
_USER_ID = re.compile(r"[a-z][a-z0-9._-]{0,31}")

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


class ModuleState:
    UNINITIALIZED = "uninitialized"  # no signing key: not provisioned
    LOCKED = "locked"  # powered up, nobody has logged on yet: private records out of reach
    INITIALIZED = "initialized"  # keys, but no certificate yet
    AUTHORIZED = "authorized"  # certified: may issue once a customer is authorized
    ERROR = "error"  # a self-test failed: cryptographic services refused
    WITHDRAWN = "withdrawn"  # taken out of service by the provider


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


class FirmwareCore:
    """The firmware of one device over its token; one instance per process."""

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

    # -- power -------------------------------------------------------------

    @classmethod
    def power_up(
        cls,
        token: Token,
        folder: Path,
        *,
        policy: PasswordPolicy | None = None,
        clock: Callable[[], datetime] | None = None,
        idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT,
    ) -> Self:
        """Start the firmware over a token opened without a PIN; runs the power-up self-tests."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        users = UserStore.open(folder, policy or PasswordPolicy.load(folder / "policy.toml"))
        audit = AuditLog.open(folder / "audit")
        psd = cls(token, users, audit, clock or _utc_now, idle_timeout)
        psd._record(Caller(None, Role.NO_ROLE), "power-up", "ok", {"token": token.label})
        psd._run_self_tests("power-up")
        return psd

    def power_down(self) -> None:
        """End any session (as power loss would), seal the audit log if possible, close."""
        try:
            if self._session is not None:
                self._end_session("power-down")
            self._seal()
        finally:
            self._pins.clear()
            self.token.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.power_down()

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

    # -- session: Logon, Logoff, Session Management ------------------------

    def logon(
        self, user_id: str, password: str, peer: Peer | None = None, link: Link | None = None
    ) -> dict[str, Any]:
        """Logon (No-Role): one user at a time; the token PIN comes out of the user's slot.

        With ``peer`` (a host's logon over the socket) the session is bound to that
        process and the result carries the session id and secret it must present;
        it ends when ``link``, the connection it came over, closes.
        """
        self.reap()
        caller = self.caller()
        if self._session is not None:
            holder = self._session.user
            reason = (
                f"user '{holder.user_id}' ({holder.role.display}) is logged on; only one user "
                "at a time (the session ends by Logoff, after the idle timeout, or when its "
                "client exits)"
            )
            self._record(
                caller, Service.LOGON.value, "denied", {"user": _safe_id(user_id), "reason": reason}
            )
            raise SessionActive(f"logon of '{user_id}' refused: {reason}")
        now = self.host_now()
        try:
            user, secrets = self.users.authenticate(user_id, password, now)
        except AuthenticationFailed as exc:
            failure = getattr(exc, "failure", None)
            values: dict[str, Any] = {"user": _safe_id(user_id), "error": str(exc)}
            if failure is not None:
                values["failures"] = failure.failures
                locked = failure.locked_until
                values["locked_until"] = locked.isoformat() if locked else None
            self._record(caller, Service.LOGON.value, "failed", values)
            raise
        try:
            self._unlock(user, secrets)
        except (MeterError, KeyError) as exc:
            message = str(exc) if isinstance(exc, MeterError) else "the slot holds no token PIN"
            self._record(caller, Service.LOGON.value, "failed", {"user": user_id, "error": message})
            raise AuthenticationFailed(
                f"logon of '{user_id}': the token refused the PIN sealed in the user's slot "
                f"({message})"
            ) from None
        binding, credential = HostBinding.new(peer, link) if peer is not None else (None, None)
        self._session = Session(user, secrets, now, now, binding)
        values = {"user": user_id}
        if binding is not None:
            values |= {"client_pid": binding.peer.pid, "client_uid": binding.peer.uid}
        self._record(Caller(user.user_id, user.role), Service.LOGON.value, "ok", values)
        self._open_device()
        self._seal()
        result: dict[str, Any] = {"session": self.session_info()}
        watchdog = watchdog_of(self._meter, self.meter_now())
        if watchdog is not None and watchdog.warning is not None:
            # Every logon says it, and the audit log keeps that it was said.
            result["watchdog"] = watchdog.to_json()
            user_caller = Caller(user.user_id, user.role)
            self._record(user_caller, "watchdog", watchdog.level.value, watchdog.to_json())
        if credential is not None:
            result |= {"session_id": credential.session_id, "session_secret": credential.secret}
        return result

    def _unlock(self, user: UserInfo, secrets: dict[str, str]) -> None:
        """Log in to the token once per power-up; later logons must bring the same PIN."""
        pin = secrets["user_pin"]
        held = self._pins.get("user_pin")
        if held is None:
            self.token.login(pin)
            self._pins["user_pin"] = pin
            self._record(
                Caller(user.user_id, user.role), "token-login", "ok", {"token": self.token.label}
            )
        elif not hmac.compare_digest(pin.encode(), held.encode()):
            raise AuthenticationFailed("the slot's PIN is not the one the token accepted")
        if user.role is Role.SECURITY_OFFICER:
            # Kept so that an Administrator can seal it into a new Security Officer's slot.
            self._pins["so_pin"] = secrets["so_pin"]

    def logoff(self) -> dict[str, Any]:
        with self._service(Service.LOGOFF) as out:
            assert self._session is not None
            out["user"] = self._session.user.user_id
        self._end_session("logoff")
        return self.session_info()

    def session_management(self) -> dict[str, Any]:
        """Session Management (No-Role): the host's view of the session, ending an idle one."""
        with self._service(Service.SESSION_MANAGEMENT) as out:
            info = self.session_info()
            out["session_open"] = info["open"]
        return info

    def session_info(self) -> dict[str, Any]:
        if self._session is None:
            return {"open": False, "idle_timeout_s": int(self.idle_timeout.total_seconds())}
        s = self._session
        idle = self.host_now() - s.last_activity
        info: dict[str, Any] = {
            "open": True,
            "user_id": s.user.user_id,
            "role": s.user.role.value,
            "started": s.started.isoformat(),
            "idle_s": int(idle.total_seconds()),
            "idle_timeout_s": int(self.idle_timeout.total_seconds()),
        }
        if s.binding is not None:
            info["client"] = {"pid": s.binding.peer.pid, "uid": s.binding.peer.uid}
            info["yours"] = self.caller().user_id is not None
        return info

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

    def _open_device(self) -> None:
        """At each logon: reread the records (every MAC and pin checked), then the self-tests."""
        try:
            self._meter = (
                Meter.open(self.token, self.meter_now)
                # A withdrawn device has no signing key but keeps its MAC'd records.
                if self.token.has_key(SIGNING_KEY_LABEL) or self.token.has_key(MAC_KEY_LABEL)
                else None
            )
        except MeterError as exc:
            self._meter = None
            # Recorded as a failed self-test so that it shows, and so that only a
            # successful reopen (a later logon or device audit) clears it.
            failed = KatResult("device-records", False, str(exc))
            self.self_tests = SelfTestReport(False, (failed,), self.host_now())
            self._record(
                self.caller(),
                "self-test",
                "failed",
                {"when": "logon", "results": {failed.name: False}},
            )
            self._enter_error(f"self-test failed: device-records ({exc})")
            return
        self._run_self_tests("logon")

    # -- self-tests and the error state --------------------------------------

    def _run_self_tests(self, when: str) -> SelfTestReport:
        meter = self._meter
        report = run_self_tests(
            self.token,
            signing_label=(
                SIGNING_KEY_LABEL
                if meter is not None and self.token.has_key(SIGNING_KEY_LABEL)
                else None  # none yet, or destroyed by a withdrawal
            ),
            algorithm=meter.identity.algorithm if meter is not None else None,
            public_key_spki=_certified_spki(meter) if meter is not None else None,
            register_check=(
                (lambda: RegisterStore.open(self.token, meter.identity.device_serial) and None)
                if meter is not None
                else None
            ),
            at=self.host_now(),
        )
        self.self_tests = report
        caller = self.caller()
        self._record(
            caller,
            "self-test",
            "ok" if report.passed else "failed",
            {"when": when, "results": {r.name: r.passed for r in report.results}},
        )
        if report.passed:
            if self._error is not None:
                self._record(caller, "error-state", "cleared", {"was": self._error})
            self._error = None
        else:
            names = ", ".join(r.name for r in report.failures())
            self._enter_error(f"self-test failed: {names}")
        return report

    def _enter_error(self, why: str) -> None:
        self._error = why
        self._record(self.caller(), "error-state", "entered", {"reason": why})

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def signing_algorithm(self) -> KeyAlgorithm:
        return self._require_meter().identity.algorithm

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


def _safe_id(user_id: str) -> str:
    """A user id fit for the audit log: a password typed into the id field must not land there."""
    return user_id if _USER_ID.fullmatch(user_id) else "(invalid user id)"


def _certified_spki(meter: Meter) -> bytes:
    """The key the device was certified with, when it has a certificate, else the token's."""
    if meter.certificates is None:
        return meter.public_key_spki
    return meter.certificates.meter.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)
