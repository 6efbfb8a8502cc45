"""The device's firmware: one user at a time, every service of Table 2 behind its roles.

Power-up opens the token without a PIN and runs the self-tests that need
none. Logon checks a user's password against the user store, unseals the
token PIN from that user's slot and logs in to the token; logoff, an idle
timeout or power-down ends the session and logs out. Every service call
passes through `_service`, which checks the role against `roles.MATRIX` (the
one copy of Table 2), refuses cryptographic services in the error and
withdrawn states, and writes an audit record of the outcome, allowed or not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from meter.errors import (
    AccessDenied,
    AuthenticationFailed,
    DeviceLocked,
    InvalidInput,
    MeterError,
    SessionActive,
)
from meter.indicium import Indicium, key_id
from meter.protocol.credit import CreditGrant, CreditRequest
from meter.psd.audit import AuditLog, AuditRecord, audit_key_id
from meter.psd.device import CERT_APPLICATION, SIGNING_KEY_LABEL, IssueRequest, Meter
from meter.psd.device_state import DeviceState, DeviceStateStore
from meter.psd.passwords import PasswordPolicy
from meter.psd.register_store import MAC_KEY_LABEL, RegisterStore
from meter.psd.roles import MATRIX, Role, Service, allowed
from meter.psd.selftest import SelfTestReport, run_self_tests
from meter.psd.users import UserInfo, UserStore
from meter.token import KatResult, KeyAlgorithm, Token

__all__ = [
    "AUDIT_KEY_LABEL",
    "CRYPTO_SERVICES",
    "KEY_EXCHANGE_LABEL",
    "PSD",
    "ModuleState",
    "Session",
    "secrets_for",
]

AUDIT_KEY_LABEL = "audit-signing"
KEY_EXCHANGE_LABEL = "key-exchange"
DEFAULT_IDLE_TIMEOUT = timedelta(minutes=15)
MAX_CLOCK_STEP = timedelta(days=366)
_USER_ID = re.compile(r"[a-z][a-z0-9._-]{0,31}")
_CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"(\d{1,4})\.(\d{1,4})\.(\d{1,4})")

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
    INITIALIZED = "initialized"  # keys, but no certificate yet
    AUTHORIZED = "authorized"  # certified: may issue once a customer is authorized
    ERROR = "error"  # a self-test failed: cryptographic services refused
    WITHDRAWN = "withdrawn"  # taken out of service by the provider


def secrets_for(role: Role, session_secrets: dict[str, str]) -> dict[str, str]:
    """The PINs a new user's slot seals: the SO PIN only for roles that administer the token."""
    wanted = ["user_pin"]
    if role in (Role.SECURITY_OFFICER, Role.ADMINISTRATOR):
        wanted.append("so_pin")
    missing = [name for name in wanted if name not in session_secrets]
    if missing:
        raise AccessDenied(
            f"this session cannot seal a {role.display} slot (it holds no {', '.join(missing)})"
        )
    return {name: session_secrets[name] for name in wanted}


@dataclass
class Session:
    user: UserInfo
    secrets: dict[str, str] = field(repr=False)
    started: datetime
    last_activity: datetime


@dataclass(frozen=True)
class Caller:
    user_id: str | None
    role: Role


class PSD:
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
        self._meter: Meter | None = None
        self._state: DeviceStateStore | None = None
        self.self_tests: SelfTestReport | None = None
        self._error: str | None = None

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
    ) -> PSD:
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
        finally:
            self.token.close()

    def __enter__(self) -> PSD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.power_down()

    # -- time --------------------------------------------------------------

    def host_now(self) -> datetime:
        return self._clock().astimezone(UTC).replace(microsecond=0)

    def meter_now(self) -> datetime:
        """The meter's clock: the host's UTC clock moved by Set Clock's offset."""
        return self.host_now() + timedelta(seconds=self._device_state().clock_offset_s)

    # -- the service boundary ------------------------------------------------

    def caller(self) -> Caller:
        self._expire_idle()
        if self._session is None:
            return Caller(None, Role.NO_ROLE)
        return Caller(self._session.user.user_id, self._session.user.role)

    @contextmanager
    def _service(self, service: Service, **values: Any) -> Iterator[dict[str, Any]]:
        """Enforce Table 2 and the device state; audit what happened either way.

        The body fills the yielded dict with the values the audit record keeps
        (postage, sequence, registers...). Nothing secret goes in it.
        """
        caller = self.caller()
        if not allowed(caller.role, service):
            marked = ", ".join(sorted(r.display for r in MATRIX[service]))
            reason = (
                f"{service.display} is not allowed to the {caller.role.display} role"
                + (f" (user '{caller.user_id}')" if caller.user_id else " (nobody is logged on)")
                + f"; it is allowed to: {marked}"
            )
            self._record(caller, service.value, "denied", {**values, "reason": reason})
            raise AccessDenied(reason)
        if self._session is not None:
            self._session.last_activity = self.host_now()
        outcome: dict[str, Any] = dict(values)
        try:
            self._check_state(service)
            yield outcome
        except MeterError as exc:
            self._record(caller, service.value, "failed", {**outcome, "error": str(exc)})
            raise
        self._record(caller, service.value, "ok", outcome)

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

    def _record(
        self, caller: Caller, service: str, outcome: str, values: dict[str, Any]
    ) -> AuditRecord:
        return self.audit.append(
            at=self.host_now(),
            user_id=caller.user_id,
            role=caller.role.value,
            service=service,
            outcome=outcome,
            values=values,
        )

    # -- session: Logon, Logoff, Session Management ------------------------

    def logon(self, user_id: str, password: str) -> dict[str, Any]:
        """Logon (No-Role): one user at a time; the token PIN comes out of the user's slot."""
        caller = self.caller()
        if self._session is not None:
            reason = (
                f"user '{self._session.user.user_id}' ({self._session.user.role.display}) is "
                "logged on; only one user at a time (log off first)"
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
            if user.role is Role.SECURITY_OFFICER:
                # The SO's logon proves the sealed SO PIN to the token itself.
                self.token.login(secrets["so_pin"], so=True)
                self.token.logout()
            self.token.login(secrets["user_pin"])
        except (MeterError, KeyError) as exc:
            message = str(exc) if isinstance(exc, MeterError) else "the slot holds no token PIN"
            self._record(caller, Service.LOGON.value, "failed", {"user": user_id, "error": message})
            raise AuthenticationFailed(
                f"logon of '{user_id}': the token refused the PIN sealed in the user's slot "
                f"({message})"
            ) from None
        self._session = Session(user, secrets, now, now)
        self._record(Caller(user.user_id, user.role), Service.LOGON.value, "ok", {"user": user_id})
        self._open_device()
        self._seal()
        return self.session_info()

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
        return {
            "open": True,
            "user_id": s.user.user_id,
            "role": s.user.role.value,
            "started": s.started.isoformat(),
            "idle_s": int(idle.total_seconds()),
            "idle_timeout_s": int(self.idle_timeout.total_seconds()),
        }

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
        self._meter = None
        self._state = None
        self.token.logout()

    def _open_device(self) -> None:
        """After login: the registers and state (MACs checked), then the full self-tests."""
        try:
            self._state = DeviceStateStore.open(self.token)
            if self.token.has_key(SIGNING_KEY_LABEL):
                self._meter = Meter.open(self.token, self.meter_now)
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
        logged_on = self._session is not None
        report = run_self_tests(
            self.token,
            signing_label=SIGNING_KEY_LABEL if meter is not None else None,
            algorithm=meter.identity.algorithm if meter is not None else None,
            public_key_spki=_certified_spki(meter) if meter is not None else None,
            register_check=(
                (lambda: RegisterStore.open(self.token, meter.identity.device_serial) and None)
                if meter is not None and logged_on
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

    def _device_state(self) -> DeviceState:
        if self._state is not None:
            return self._state.current
        return DeviceStateStore.read_unverified(self.token)

    def _state_store(self) -> DeviceStateStore:
        if self._state is None:
            raise DeviceLocked("the device state is readable only while a user is logged on")
        return self._state

    def _require_meter(self) -> Meter:
        if self._meter is None:
            raise DeviceLocked(
                "the device is not provisioned (no signing key) or its records failed their "
                "checks; see Request Status"
            )
        return self._meter

    def _session_secrets(self) -> dict[str, str]:
        assert self._session is not None
        return self._session.secrets

    def _audit_signer(self) -> tuple[Callable[[bytes], bytes], bytes] | None:
        if self._session is None or not self.token.has_key(AUDIT_KEY_LABEL):
            return None
        spki = self.token.public_key_spki(AUDIT_KEY_LABEL)
        public = serialization.load_der_public_key(spki)

        def sign(message: bytes) -> bytes:
            return self.token.sign(AUDIT_KEY_LABEL, KeyAlgorithm.ECDSA_P256, message)

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

    # -- status ----------------------------------------------------------------

    def module_state(self) -> str:
        state = self._device_state()
        if state.withdrawn_at is not None:
            return ModuleState.WITHDRAWN
        if self._error is not None:
            return ModuleState.ERROR
        if not self.token.has_key(SIGNING_KEY_LABEL):
            return ModuleState.UNINITIALIZED
        if not self.token.data_objects(CERT_APPLICATION):
            return ModuleState.INITIALIZED
        return ModuleState.AUTHORIZED

    def request_status(self) -> dict[str, Any]:
        """Request Status (every role): rule 8's Show Status."""
        with self._service(Service.REQUEST_STATUS) as out:
            status = self._status()
            out["module_state"] = status["module_state"]
        return status

    def _status(self) -> dict[str, Any]:
        caller = self.caller()
        state = self._device_state()
        meter = self._meter
        registers = None
        if meter is not None:
            r = meter.registers
            registers = {
                "ascending": r.ascending,
                "descending": r.descending,
                "control_total": r.control_total,
                "piece_count": r.sequence,
            }
        return {
            "user_id": caller.user_id,
            "role": caller.role.value,
            "module_state": self.module_state(),
            "error": self._error,
            "session": self.session_info(),
            "keys": self._key_status(state),
            "registers": registers,
            "piece_count": registers["piece_count"] if registers else None,
            "device_serial": meter.identity.device_serial if meter else None,
            "customer": state.customer,
            "administration_authorized": state.administration_authorized,
            "psc_version": state.psc_version,
            "withdrawn_at": state.withdrawn_at,
            "time": self.meter_now().isoformat(),
            "clock_offset_s": state.clock_offset_s,
            "self_tests": self.self_tests.to_json() if self.self_tests else None,
            "state_verified": self._state is not None,
        }

    def _key_status(self, state: DeviceState) -> dict[str, Any]:
        logged_on = self._session is not None
        keys: dict[str, Any] = {}
        for label, kind in (
            (SIGNING_KEY_LABEL, "private"),
            (MAC_KEY_LABEL, "secret"),
            (AUDIT_KEY_LABEL, "private"),
            (KEY_EXCHANGE_LABEL, "private"),
        ):
            if not logged_on:
                # Without a login only public halves are visible.
                if kind == "private" and self.token.has_key(label):  # its public half shows
                    keys[label] = {"present": True, "detail": "log on to inspect"}
                else:
                    keys[label] = {"present": None, "detail": "log on to inspect"}
                continue
            if not self.token.has_key(label):
                keys[label] = {"present": False}
                continue
            attributes = self.token.key_attributes(label, kind)  # type: ignore[arg-type]
            keys[label] = {"present": True, **attributes}
        keys[SIGNING_KEY_LABEL]["state"] = "active" if state.signing_key_active else "inactive"
        return keys

    def retrieve_psd_status(self) -> dict[str, Any]:
        """Retrieve PSD Status (Customer): registers, piece count, time."""
        with self._service(Service.RETRIEVE_PSD_STATUS) as out:
            status = self._require_meter().status()
            status["customer"] = self._device_state().customer
            out.update(
                ascending=status["ascending"],
                descending=status["descending"],
                piece_count=status["piece_count"],
            )
        return status

    def retrieve_psd_public_key(self) -> dict[str, Any]:
        """Retrieve PSD Public Key (No-Role): the signing key and certificate, public halves."""
        with self._service(Service.RETRIEVE_PSD_PUBLIC_KEY) as out:
            if not self.token.has_key(SIGNING_KEY_LABEL):
                raise DeviceLocked("the device has no signing key (not provisioned)")
            spki = self.token.public_key_spki(SIGNING_KEY_LABEL)
            public = serialization.load_der_public_key(spki)
            pem = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            certs = {o.label: o.value for o in self.token.data_objects(CERT_APPLICATION)}
            result: dict[str, Any] = {
                "public_key_pem": pem.decode(),
                "key_id": key_id(public).hex(),
                "certificate_pem": _der_to_pem(certs["meter"]) if "meter" in certs else None,
            }
            out["key_id"] = result["key_id"]
        return result

    def request_device_audit(self) -> dict[str, Any]:
        """Request Device Audit (No-Role): rerun the self-tests; report the device's figures."""
        with self._service(Service.REQUEST_DEVICE_AUDIT) as out:
            if self._session is not None:
                self._open_device()  # reread the records, then the full self-tests
                report = self.self_tests
                assert report is not None
            else:
                report = self._run_self_tests("on-demand")
            status = self._status()
            out["self_tests_passed"] = report.passed
            if status["registers"] is not None:
                out["registers"] = status["registers"]
        return {
            "self_tests": report.to_json(),
            "module_state": status["module_state"],
            "registers": status["registers"],
            "device_serial": status["device_serial"],
            "time": status["time"],
        }

    # -- users: Create, Modify, Delete, View, Change User Password -----------

    def _require_administration(self) -> None:
        if not self._state_store().current.administration_authorized:
            raise DeviceLocked(
                "user administration is not authorized on this device: a Security Officer must "
                "run Administration Authorization first"
            )

    def create_user(self, user_id: str, role: Role, password: str) -> dict[str, Any]:
        with self._service(Service.CREATE_USER, user=user_id, new_role=role.value):
            self._require_administration()
            sealed = secrets_for(role, self._session_secrets())
            info = self.users.create(user_id, role, password, sealed, self.host_now())
        return info.to_json()

    def modify_user(self, user_id: str, role: Role, password: str) -> dict[str, Any]:
        with self._service(Service.MODIFY_USER, user=user_id, new_role=role.value):
            self._require_administration()
            self._keep_one_administrator(user_id, role)
            sealed = secrets_for(role, self._session_secrets())
            info = self.users.modify(user_id, role, password, sealed, self.host_now())
        return info.to_json()

    def delete_user(self, user_id: str) -> dict[str, Any]:
        with self._service(Service.DELETE_USER, user=user_id):
            self._require_administration()
            assert self._session is not None
            if user_id == self._session.user.user_id:
                raise InvalidInput("an Administrator cannot delete the user logged on")
            self._keep_one_administrator(user_id, None)
            self.users.delete(user_id)
        return {"deleted": user_id}

    def _keep_one_administrator(self, user_id: str, new_role: Role | None) -> None:
        current = self.users.get(user_id)
        for role in (Role.ADMINISTRATOR, Role.SECURITY_OFFICER):
            if current.role is role and new_role is not role and self.users.count(role) == 1:
                raise InvalidInput(
                    f"'{user_id}' is the last {role.display}: the device would have nobody to "
                    "manage it"
                )

    def view_users(self) -> list[dict[str, Any]]:
        with self._service(Service.VIEW_USERS) as out:
            users = [u.to_json() for u in self.users.users()]
            out["count"] = len(users)
        return users

    def change_user_password(self, old_password: str, new_password: str) -> dict[str, Any]:
        with self._service(Service.CHANGE_USER_PASSWORD) as out:
            assert self._session is not None
            user_id = self._session.user.user_id
            out["user"] = user_id
            info = self.users.change_password(user_id, old_password, new_password, self.host_now())
        return info.to_json()

    # -- security officer: Key Administration, Administration Authorization,
    #    Create Audit Key, Update PSC -----------------------------------------

    def key_administration(self, action: str = "list") -> dict[str, Any]:
        """List the keys and their state, or activate / deactivate the signing key."""
        actions = {"list": None, "activate-signing-key": True, "deactivate-signing-key": False}
        with self._service(Service.KEY_ADMINISTRATION, action=action):
            if action not in actions:
                raise InvalidInput(
                    f"key administration action '{action}' is not one of {list(actions)}"
                )
            store = self._state_store()
            active = actions[action]
            if active is not None and active != store.current.signing_key_active:
                store.commit(store.current.next(signing_key_active=active))
            keys = self._key_status(store.current)
        return {"keys": keys}

    def administration_authorization(self, authorize: bool = True) -> dict[str, Any]:
        with self._service(Service.ADMINISTRATION_AUTHORIZATION, authorize=authorize):
            store = self._state_store()
            if store.current.administration_authorized != authorize:
                store.commit(store.current.next(administration_authorized=authorize))
        return {"administration_authorized": authorize}

    def create_audit_key(self) -> dict[str, Any]:
        with self._service(Service.CREATE_AUDIT_KEY) as out:
            spki = self.token.generate_signing_keypair(AUDIT_KEY_LABEL, KeyAlgorithm.ECDSA_P256)
            self.token.make_durable()
            public = serialization.load_der_public_key(spki)
            out["key_id"] = audit_key_id(public).hex()
        self._seal()
        return {"key_id": out["key_id"]}

    def update_psc(self, version: str) -> dict[str, Any]:
        """Record a new firmware version (newer only); signed packages belong to a later issue."""
        with self._service(Service.UPDATE_PSC, version=version):
            store = self._state_store()
            new, old = _version(version), _version(store.current.psc_version)
            if new <= old:
                raise InvalidInput(
                    f"version {version} is not newer than the installed {store.current.psc_version}"
                )
            history = (*store.current.psc_history, store.current.psc_version)
            store.commit(store.current.next(psc_version=version, psc_history=history))
        return {"psc_version": version}

    # -- administrator: Set Clock --------------------------------------------

    def set_clock(self, to: datetime) -> dict[str, Any]:
        """Move the meter's clock; every indicium's time of issue and default date follow it."""
        with self._service(Service.SET_CLOCK) as out:
            if to.tzinfo is None:
                raise InvalidInput(
                    "the new time must carry a time zone (e.g. 2026-11-22T10:00:00Z)"
                )
            store = self._state_store()
            before = self.meter_now()
            step = to.astimezone(UTC).replace(microsecond=0) - before
            if abs(step) > MAX_CLOCK_STEP:
                raise InvalidInput(
                    f"a clock step of {step} is more than {MAX_CLOCK_STEP.days} days"
                )
            offset = int((to.astimezone(UTC) - self.host_now()).total_seconds())
            store.commit(store.current.next(clock_offset_s=offset))
            out.update(
                before=before.isoformat(),
                after=self.meter_now().isoformat(),
                step_s=int(step.total_seconds()),
            )
        return {"time": self.meter_now().isoformat(), "step_s": int(step.total_seconds())}

    # -- certificate authority: Authorize PSD ----------------------------------

    def authorize_psd(
        self, meter_pem: bytes, provider_pem: bytes, root_pem: bytes
    ) -> dict[str, Any]:
        from cryptography import x509

        with self._service(Service.AUTHORIZE_PSD) as out:
            try:
                certs = [
                    x509.load_pem_x509_certificate(p) for p in (meter_pem, provider_pem, root_pem)
                ]
            except ValueError as exc:
                raise InvalidInput(f"a certificate is not PEM: {exc}") from exc
            self._require_meter().install_certificates(*certs)
            out["meter_certificate_serial"] = certs[0].serial_number
        return {"module_state": self.module_state()}

    # -- provider: Authorize Customer, Download Postage Value, Withdraw PSD ---

    def authorize_customer(self, customer: str) -> dict[str, Any]:
        with self._service(Service.AUTHORIZE_CUSTOMER, customer=customer):
            if not _CUSTOMER_ID.fullmatch(customer):
                raise InvalidInput(
                    f"customer account '{customer}' must be 1-64 letters, digits, . _ -"
                )
            store = self._state_store()
            store.commit(store.current.next(customer=customer))
        return {"customer": customer}

    def download_postage_value(
        self, obtain: Callable[[CreditRequest], CreditGrant]
    ) -> dict[str, Any]:
        """Start a credit, let ``obtain`` get the provider's grant for it, and apply the grant."""
        with self._service(Service.DOWNLOAD_POSTAGE_VALUE) as out:
            meter = self._require_meter()
            request = meter.request_credit()
            grant = obtain(request)
            registers = meter.apply_credit(grant)
            out.update(
                amount=grant.amount,
                transaction_id=grant.transaction_id.hex(),
                ascending=registers.ascending,
                descending=registers.descending,
            )
        return {
            "amount": grant.amount,
            "descending": registers.descending,
            "ascending": registers.ascending,
            "control_total": registers.control_total,
        }

    def withdraw_psd(self) -> dict[str, Any]:
        """Take the device out of service for good; the final registers go to the provider."""
        with self._service(Service.WITHDRAW_PSD) as out:
            meter = self._require_meter()
            store = self._state_store()
            at = self.meter_now().isoformat()
            store.commit(store.current.next(withdrawn_at=at, signing_key_active=False))
            r = meter.registers
            out.update(ascending=r.ascending, descending=r.descending, piece_count=r.sequence)
        return {
            "withdrawn_at": at,
            "ascending": r.ascending,
            "descending": r.descending,
            "piece_count": r.sequence,
            "device_serial": meter.identity.device_serial,
        }

    # -- customer: Create Indicium, Create Correction Indicium ------------------

    def create_indicium(self, request: IssueRequest) -> Indicium:
        if request.correction_of is not None:
            raise InvalidInput("a correction is Create Correction Indicium, not Create Indicium")
        with self._service(Service.CREATE_INDICIUM, postage=request.postage) as out:
            indicium = self._issue(request)
            _audit_indicium(out, indicium)
        return indicium

    def create_correction_indicium(self, request: IssueRequest, original: int) -> Indicium:
        """Additional postage for a piece already stamped by this meter (sequence ``original``)."""
        with self._service(
            Service.CREATE_CORRECTION_INDICIUM, postage=request.postage, original=original
        ) as out:
            indicium = self._issue(replace(request, correction_of=original))
            _audit_indicium(out, indicium)
        return indicium

    def _issue(self, request: IssueRequest) -> Indicium:
        state = self._state_store().current
        if state.customer is None:
            raise DeviceLocked("no customer is authorized on this device (Authorize Customer)")
        if not state.signing_key_active:
            raise DeviceLocked("the signing key is deactivated (Key Administration)")
        return self._require_meter().issue(request)

    # -- key custodian: Key Exchange --------------------------------------------

    def key_exchange(self) -> dict[str, Any]:
        """The device's ECDH key for custodian ceremonies: generated in the token once."""
        with self._service(Service.KEY_EXCHANGE) as out:
            if not self.token.has_key(KEY_EXCHANGE_LABEL):
                self.token.generate_key_exchange_keypair(KEY_EXCHANGE_LABEL)
                self.token.make_durable()
            spki = self.token.public_key_spki(KEY_EXCHANGE_LABEL)
            public = serialization.load_der_public_key(spki)
            out["key_id"] = key_id(public).hex()
            pem = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return {"public_key_pem": pem.decode(), "key_id": out["key_id"]}

    # -- auditor: Export Audit Key and the audit log -----------------------------

    def export_audit_key(self) -> dict[str, Any]:
        with self._service(Service.EXPORT_AUDIT_KEY) as out:
            if not self.token.has_key(AUDIT_KEY_LABEL):
                raise DeviceLocked("there is no audit key yet (Create Audit Key, Security Officer)")
            public = serialization.load_der_public_key(self.token.public_key_spki(AUDIT_KEY_LABEL))
            out["key_id"] = audit_key_id(public).hex()
            pem = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return {"public_key_pem": pem.decode(), "key_id": out["key_id"]}

    def view_audit_log(self, since: int | None = None) -> list[AuditRecord]:
        with self._service(Service.VIEW_AUDIT_LOG, since=since) as out:
            records = self.audit.records(since)
            out["count"] = len(records)
        return records

    def save_audit_log(self, path: Path) -> dict[str, Any]:
        with self._service(Service.SAVE_AUDIT_LOG, path=str(path)) as out:
            sign, kid = self._require_audit_signer()
            out["records"] = self.audit.export(path, sign, kid, self.host_now())
        return {"path": str(path), "records": out["records"]}

    def archive_audit_log(self, path: Path) -> dict[str, Any]:
        with self._service(Service.ARCHIVE_AUDIT_LOG, path=str(path)) as out:
            sign, kid = self._require_audit_signer()
            out["records"] = self.audit.archive(path, sign, kid, self.host_now())
        return {
            "path": str(path),
            "records": out["records"],
            "archived_through": self.audit.archived_through,
        }

    def delete_audit_records(self) -> dict[str, Any]:
        with self._service(Service.DELETE_AUDIT_RECORDS) as out:
            out["deleted"] = self.audit.delete_archived()
        return {"deleted": out["deleted"]}


def _audit_indicium(out: dict[str, Any], indicium: Indicium) -> None:
    out.update(
        sequence=indicium.sequence,
        ascending=indicium.ascending,
        descending=indicium.descending,
        postage=indicium.postage,
        flags=indicium.flags,
        reference_sequence=indicium.reference_sequence,
    )


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


def _der_to_pem(der: bytes) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def _version(text: str) -> tuple[int, int, int]:
    match = _VERSION.fullmatch(text)
    if match is None:
        raise InvalidInput(f"software version '{text}' must be MAJOR.MINOR.PATCH")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def _utc_now() -> datetime:
    return datetime.now(UTC)
