"""The services that manage the device rather than postage: users (Administrator), key and
software administration (Security Officer), the clock, and the audit log (Auditor)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization

from meter.errors import DeviceLocked, InvalidInput
from meter.protocol.update_bundle import UpdateBundle
from meter.psd.audit import AuditRecord, audit_key_id
from meter.psd.firmware_core import AUDIT_KEY_LABEL
from meter.psd.roles import Role, Service
from meter.psd.services_status import StatusServices, psc_status

__all__ = ["AdminServices", "secrets_for"]

MAX_CLOCK_STEP = timedelta(days=366)
_ARCHIVES = "archives"


def secrets_for(role: Role, held: dict[str, str]) -> dict[str, str]:
    """The PINs a user's slot seals: the User PIN, and the SO PIN only for a Security Officer.

    ``held`` is what the device holds in memory: the User PIN after the first logon,
    the SO PIN after a Security Officer's logon since power-up.
    """
    wanted = ["user_pin"] + (["so_pin"] if role is Role.SECURITY_OFFICER else [])
    missing = [name for name in wanted if name not in held]
    if missing == ["so_pin"]:
        raise DeviceLocked(
            f"a {role.display}'s slot needs the token's SO PIN, which the device holds only "
            "after a Security Officer has logged on since it started: ask one to log on and off, "
            "then try again"
        )
    if missing:
        raise DeviceLocked(f"the device holds no {', '.join(missing)} to seal a slot with")
    return {name: held[name] for name in wanted}


class AdminServices(StatusServices):
    # -- users: Create, Modify, Delete, View, Change User Password -----------

    def _require_administration(self) -> None:
        if not self._require_meter().state.administration_authorized:
            raise DeviceLocked(
                "user administration is not authorized on this device: a Security Officer must "
                "run Administration Authorization first"
            )

    def create_user(self, user_id: str, role: Role, password: str) -> dict[str, Any]:
        with self._service(Service.CREATE_USER, user=user_id, new_role=role.value):
            self._require_administration()
            sealed = secrets_for(role, self._pins)
            info = self.users.create(user_id, role, password, sealed, self.host_now())
        return info.to_json()

    def modify_user(self, user_id: str, role: Role, password: str) -> dict[str, Any]:
        with self._service(Service.MODIFY_USER, user=user_id, new_role=role.value):
            self._require_administration()
            self._keep_one_administrator(user_id, role)
            sealed = secrets_for(role, self._pins)
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
            meter = self._require_meter()
            active = actions[action]
            if active is not None and active != meter.state.signing_key_active:
                meter.commit_state(meter.state.next(signing_key_active=active))
            keys = self._key_status(meter.state)
        return {"keys": keys}

    def administration_authorization(self, authorize: bool = True) -> dict[str, Any]:
        with self._service(Service.ADMINISTRATION_AUTHORIZATION, authorize=authorize):
            meter = self._require_meter()
            if meter.state.administration_authorized != authorize:
                meter.commit_state(meter.state.next(administration_authorized=authorize))
        return {"administration_authorized": authorize}

    def create_audit_key(self) -> dict[str, Any]:
        with self._service(Service.CREATE_AUDIT_KEY) as out:
            # ECDSA P-256 where the token has EC, else RSA-PSS-2048 (openCryptoki's soft token).
            algorithm = self.token.audit_algorithm()
            spki = self.token.generate_signing_keypair(AUDIT_KEY_LABEL, algorithm, exportable=True)
            self.token.make_durable()
            public = serialization.load_der_public_key(spki)
            out["key_id"] = audit_key_id(public).hex()
            out["algorithm"] = algorithm.value
        self._seal()
        return {"key_id": out["key_id"], "algorithm": out["algorithm"]}

    def update_psc(self, bundle: bytes) -> dict[str, Any]:
        """Install a provider-signed update bundle (docs/updates.md): checked against the
        device's pinned postal root, its provider, its lineage and the installed release.
        Every refusal is audited (the record names the bundle and the reason) and changes
        nothing."""
        digest = hashlib.sha256(bundle).hexdigest()
        with self._service(Service.UPDATE_PSC, bundle_sha256=digest, size=len(bundle)) as out:
            meter = self._require_meter()
            parsed = UpdateBundle.from_bytes(bundle)
            contents = parsed.contents
            out.update(
                version=contents.version,
                software_id=contents.software_id,
                installed_version=meter.state.psc_version,
            )
            meter.install_update(parsed)
            out["bundle_sha256"] = parsed.sha256  # of its canonical form, as status shows it
        return psc_status(meter.state, meter)

    # -- administrator: Set Clock --------------------------------------------

    def set_clock(self, to: datetime) -> dict[str, Any]:
        """Move the meter's clock; every indicium's time of issue and default date follow it."""
        with self._service(Service.SET_CLOCK) as out:
            if to.tzinfo is None:
                raise InvalidInput(
                    "the new time must carry a time zone (e.g. 2026-11-22T10:00:00Z)"
                )
            meter = self._require_meter()
            before = self.meter_now()
            step = to.astimezone(UTC).replace(microsecond=0) - before
            if abs(step) > MAX_CLOCK_STEP:
                raise InvalidInput(
                    f"a clock step of {step} is more than {MAX_CLOCK_STEP.days} days"
                )
            offset = int((to.astimezone(UTC) - self.host_now()).total_seconds())
            meter.commit_state(meter.state.next(clock_offset_s=offset))
            out.update(
                before=before.isoformat(),
                after=self.meter_now().isoformat(),
                step_s=int(step.total_seconds()),
            )
        return {"time": self.meter_now().isoformat(), "step_s": int(step.total_seconds())}

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

    def save_audit_log(self) -> dict[str, Any]:
        """Save Audit Log: the sealed export document, for the host to write where it likes."""
        with self._service(Service.SAVE_AUDIT_LOG) as out:
            sign, kid = self._require_audit_signer()
            document, out["records"] = self.audit.export_document(sign, kid, self.host_now())
        return {"records": out["records"], "document": document.decode("ascii")}

    def archive_audit_log(self) -> dict[str, Any]:
        """Archive Audit Log: the device keeps the archive in its own folder and returns it."""
        with self._service(Service.ARCHIVE_AUDIT_LOG) as out:
            sign, kid = self._require_audit_signer()
            through = self.audit.head[0]
            path = self.audit.path.parent / _ARCHIVES / f"archive-{through:010d}.json"
            document, out["records"] = self.audit.archive_document(path, sign, kid, self.host_now())
            out["kept_as"] = path.name
        return {
            "records": out["records"],
            "archived_through": self.audit.archived_through,
            "document": document.decode("ascii"),
        }

    def delete_audit_records(self) -> dict[str, Any]:
        with self._service(Service.DELETE_AUDIT_RECORDS) as out:
            out["deleted"] = self.audit.delete_archived()
        return {"deleted": out["deleted"]}
