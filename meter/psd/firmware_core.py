"""The firmware's core: power, sessions, self-tests and the error state.

Power-up opens the token without a PIN and runs the self-tests that need
none. The first logon after power-up unseals the token's User PIN from that
user's slot and logs in to the token; the device then stays logged in until
power-down, so the token is logged in to once per device start (SoftHSM2
rewrites its token file at every C_Login). Each logon checks the user's
password against the user store and, while the token is logged in, that the
slot's PIN is the one the token accepted.

One user at a time (rule 4): a session is opened by Logon and ended by
Logoff, the idle timeout, power-down or, for a host session, its process
going away. Who is calling, and the service boundary `_service` every
service call passes through, are in meter.psd.firmware_boundary.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from cryptography.hazmat.primitives import serialization

from meter.errors import AuthenticationFailed, MeterError, SessionActive
from meter.psd.audit import AuditLog
from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.firmware_boundary import (
    AUDIT_KEY_LABEL,
    CRYPTO_SERVICES,
    Caller,
    ServiceBoundary,
    Session,
)
from meter.psd.host_session import HostBinding, Link, Peer
from meter.psd.passwords import PasswordPolicy
from meter.psd.register_store import MAC_KEY_LABEL, RegisterStore
from meter.psd.roles import Role, Service
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

KEY_EXCHANGE_LABEL = "key-exchange"
DEFAULT_IDLE_TIMEOUT = timedelta(minutes=15)
_USER_ID = re.compile(r"[a-z][a-z0-9._-]{0,31}")


class ModuleState:
    UNINITIALIZED = "uninitialized"  # no signing key: not provisioned
    LOCKED = "locked"  # powered up, nobody has logged on yet: private records out of reach
    INITIALIZED = "initialized"  # keys, but no certificate yet
    AUTHORIZED = "authorized"  # certified: may issue once a customer is authorized
    ERROR = "error"  # a self-test failed: cryptographic services refused
    WITHDRAWN = "withdrawn"  # taken out of service by the provider


class FirmwareCore(ServiceBoundary):
    """The firmware of one device over its token; one instance per process."""

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
