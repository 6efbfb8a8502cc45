"""The device's side of a key import (docs/custody.md): unwrap under temporary labels, check
every KCV and the pairwise signature, write the registers of the source's final-register
statement, and commit in an order that a rerun, or the next logon, can finish from."""

from __future__ import annotations

from typing import Any

from meter.errors import ConfigurationError, DeviceLocked, TokenError
from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.device_state import STATE_APPLICATION, DeviceState
from meter.psd.firmware_core import AUDIT_KEY_LABEL, KEY_EXCHANGE_LABEL, Caller
from meter.psd.identity import IDENTITY_APPLICATION, store_identity
from meter.psd.register_store import APPLICATION as REGISTER_APPLICATION
from meter.psd.register_store import MAC_KEY_LABEL
from meter.psd.registers import Registers
from meter.psd.roles import Role, Service
from meter.psd.services_custody_formats import (
    CEREMONY_APPLICATION,
    CEREMONY_KEYS,
    COMMITTING,
    IMPORT_UNSIGNED,
    IMPORTING,
    Authorization,
    Bundle,
    check_postal_root,
    check_transport_key,
    key_algorithm_of,
    parse_bundle,
    verified_statement,
)
from meter.psd.services_reload import RELOAD_KEY_LABEL
from meter.psd.services_status import StatusServices
from meter.token import wrapping as w

__all__ = ["MOVED_AWAY", "CustodyImportServices"]

# Destroyed on a source once its move is committed: the keys that moved, and those that never
# move (the key-exchange and reload keys: the replacement makes its own), since a withdrawn
# source must keep no private key that signs or authenticates it.
MOVED_AWAY = (SIGNING_KEY_LABEL, AUDIT_KEY_LABEL, KEY_EXCHANGE_LABEL, RELOAD_KEY_LABEL)


class CustodyImportServices(StatusServices):
    _ceremony: Authorization | None = None  # what the Security Officer authorized

    # -- Key Custodian: import --------------------------------------------------

    def ceremony_import_keys(
        self, bundle: dict[str, Any], transport_key: bytes, final_registers: dict[str, Any]
    ) -> dict[str, Any]:
        """Key Exchange (Key Custodian): rebuild the transport key, unwrap, check, commit."""
        key = bytearray(transport_key)
        ceremony = str(bundle.get("ceremony", ""))
        try:
            with self._service(Service.KEY_EXCHANGE, step="import", ceremony=ceremony) as out:
                authorized = self._authorized(ceremony, ("import",))
                if authorized.resumed:
                    raise ConfigurationError(
                        f"{self.token.where} holds a meter signing key already: ceremony "
                        f"'{ceremony}' was imported, only its transcript remains to be signed"
                    )
                check_transport_key(key)
                parsed = parse_bundle(bundle)
                check_postal_root(parsed, authorized.postal_root)
                statement = verified_statement(parsed, final_registers)
                self._import(parsed, key, statement)
                self._open_device()
                meter = self._require_meter()
                authorized.exported = parsed.kcvs
                r = meter.registers
                out.update(
                    kcvs=parsed.kcvs,
                    device_serial=meter.identity.device_serial,
                    ascending=r.ascending,
                    descending=r.descending,
                    piece_count=r.sequence,
                )
            return {
                "ceremony": ceremony,
                "device_serial": meter.identity.device_serial,
                "kcvs_verified": parsed.kcvs,
                "pairwise": "verified against the meter certificate",
                "registers": {
                    "ascending": r.ascending,
                    "descending": r.descending,
                    "piece_count": r.sequence,
                },
                "module_state": self.module_state(),
            }
        finally:
            key[:] = bytes(len(key))

    def _check_import_target(self, *, resume: bool = False, ceremony: str = "") -> bool:
        """Refused unless the token is new, or (``resume``) holds an import of ``ceremony``
        past its commit point; True when only that import's transcript remains to sign."""
        # An import interrupted after its commit point left a meter without certificates:
        # a rerun of it may go on (the KCVs then show whether it is the same meter).
        interrupted = self._meter is not None and self._meter.certificates is None
        if self.token.has_key(SIGNING_KEY_LABEL) and not (resume and interrupted):
            # Complete, but its transcript was never signed: the rerun signs it (the
            # transcript's KCVs must then be this token's keys, see _resumed_kcvs).
            if resume and self._unsigned_import(ceremony):
                return True
            raise ConfigurationError(
                f"{self.token.where} holds a meter signing key already: a replacement token "
                "must be new (one token, one meter)"
            )
        self.token.require("aes_key_wrap_pad", "key import (CKM_AES_KEY_WRAP_PAD)")
        return False

    def _unsigned_import(self, ceremony: str) -> list[Any]:
        """The marker of an import of ``ceremony`` that committed and has no signed transcript."""
        return [
            obj
            for obj in self.token.data_objects(CEREMONY_APPLICATION)
            if obj.label == IMPORT_UNSIGNED + ceremony
        ]

    def _resumed_kcvs(self, transcript: dict[str, Any]) -> dict[str, str]:
        """The KCVs a resumed import's transcript names, if they are this token's keys."""
        keys = transcript.get("keys")
        named = keys.get("kcvs") if isinstance(keys, dict) else None
        found: dict[str, str] = {}
        for label, kind in CEREMONY_KEYS:
            actual = (
                w.secret_kcv(self.token, label)
                if kind == "secret"
                else w.public_kcv(self.token.public_key_spki(label))
            )
            try:
                expected = bytes.fromhex(str(named.get(label))) if isinstance(named, dict) else b""
            except ValueError:
                expected = b""
            if not w.kcv_matches(expected, actual):
                raise ConfigurationError(
                    f"{self.token.where} holds keys whose check values are not the ones the "
                    f"transcript names ('{label}'): not this ceremony's import"
                )
            found[label] = actual.hex()
        return found

    def _import(self, bundle: Bundle, key: bytearray, statement: dict[str, Any]) -> None:
        token = self.token
        if token.has_key(SIGNING_KEY_LABEL):
            # Only a rerun of this same import may find it (its commit point passed).
            if (
                w.public_kcv(token.public_key_spki(SIGNING_KEY_LABEL))
                != bundle.entry(SIGNING_KEY_LABEL).kcv
            ):
                raise ConfigurationError(f"{token.where} holds another meter's signing key")
            self._finish_import(bundle)
            return
        self._check_import_target()
        self._clear_leftovers(bundle)
        label = f"{w.TRANSPORT_LABEL_PREFIX}-import-{bundle.ceremony}"
        with w.unwrapping_key(token, label, key) as unwrapping:
            for entry in bundle.keys:
                w.unwrap_key(token, unwrapping, entry, IMPORTING + entry.label)
        for entry in bundle.keys:  # every check before anything takes a meter's label
            temporary = IMPORTING + entry.label
            if entry.kind == "secret":
                if not w.kcv_matches(entry.kcv, w.secret_kcv(token, temporary)):
                    raise TokenError(f"key '{entry.label}': its check value does not match")
                continue
            assert entry.public_spki is not None
            w.import_public_key(token, temporary, entry.public_spki)
            algorithm = (
                bundle.algorithm if entry.label == SIGNING_KEY_LABEL else key_algorithm_of(entry)
            )
            w.pairwise_check(token, temporary, algorithm, entry.public_spki)
        # The records, sealed by the MAC key under its temporary label: no meter label
        # exists yet, so an interruption up to the marker leaves a token that is not a
        # meter, and the rerun clears it and starts again.
        mac = IMPORTING + MAC_KEY_LABEL
        registers = Registers(
            device_serial=bundle.identity.device_serial,
            generation=1,
            ascending=int(statement["ascending"]),
            descending=int(statement["descending"]),
            control_total=int(statement["control_total"]),
            sequence=int(statement["piece_count"]),
            last_credit_id=bytes.fromhex(statement["last_credit_id"]),
            state_generation=1,
        )
        registers.check()
        for application, label, body in (
            (STATE_APPLICATION, "state-1", DeviceState().body()),
            (REGISTER_APPLICATION, "registers-1", registers.body()),
        ):
            token.create_data(application, label, body + token.hmac(mac, body))
        store_identity(token, bundle.identity)  # makes everything so far durable
        # The commit point: every check passed and every record is written. From the
        # marker on, the renames are rolled forward, now or at the next logon.
        # Before the commit marker: a committed import always has it until its transcript
        # is signed (one left by an attempt that never committed is cleared by the rerun).
        token.create_data(CEREMONY_APPLICATION, IMPORT_UNSIGNED + bundle.ceremony, b"")
        token.create_data(CEREMONY_APPLICATION, COMMITTING + bundle.ceremony, b"")
        token.make_durable()
        self._roll_forward()
        self._finish_import(bundle)

    def _roll_forward(self) -> None:
        """Give the verified keys of a committed import their labels (the signing key last,
        as its label makes the meter), then drop the marker."""
        token = self.token
        markers = [
            obj
            for obj in token.data_objects(CEREMONY_APPLICATION)
            if obj.label.startswith(COMMITTING)
        ]
        if not markers:
            return
        for label, kind in CEREMONY_KEYS:
            if token.has_key(IMPORTING + label):
                w.rename_key(token, IMPORTING + label, label, kind)
        token.make_durable()
        for marker in markers:
            token.destroy(marker)

    def _finish_import(self, bundle: Bundle) -> None:
        meter = Meter.open(self.token, self.meter_now)
        if meter.identity != bundle.identity:
            raise ConfigurationError(f"{self.token.where} holds another device's identity")
        if meter.certificates is None:
            meter.install_certificates(*bundle.certificates)

    def _clear_leftovers(self, bundle: Bundle) -> None:
        """Before the first unwrap: what an interrupted attempt of this import left."""
        token = self.token
        for entry in bundle.keys:
            w.destroy_key_object(token, IMPORTING + entry.label)
            if entry.label == SIGNING_KEY_LABEL or not token.has_key(entry.label):
                continue
            found = (
                w.secret_kcv(token, entry.label)
                if entry.kind == "secret"
                else w.public_kcv(token.public_key_spki(entry.label))
            )
            if not w.kcv_matches(entry.kcv, found):
                raise ConfigurationError(
                    f"{token.where} holds a key '{entry.label}' that is not this ceremony's: "
                    "a replacement token must hold no meter keys (an audit key made there "
                    "before the import? delete it with the token's tools)"
                )
            w.destroy_key_object(token, entry.label)  # ours, renamed before an interruption
        for application in (STATE_APPLICATION, REGISTER_APPLICATION, IDENTITY_APPLICATION):
            for obj in token.data_objects(application):
                token.destroy(obj)
        for obj in self._unsigned_import(bundle.ceremony):
            token.destroy(obj)

    def _authorized(self, ceremony: str, purposes: tuple[str, ...]) -> Authorization:
        authorized = self._ceremony
        if authorized is None or authorized.ceremony != ceremony:
            raise DeviceLocked(
                f"ceremony '{ceremony}' is not authorized on this device: a Security Officer "
                "must authorize it first (meter ceremony ... walks through it; an authorization "
                "lasts until the device stops)"
            )
        if authorized.purpose not in purposes:
            raise DeviceLocked(
                f"ceremony '{ceremony}' was authorized for {authorized.purpose}, not for this step"
            )
        return authorized

    def _open_device(self) -> None:
        if self.unlocked:
            self._roll_forward()  # an import interrupted after its commit point
        swept = w.sweep_transport_keys(self.token)
        if swept:
            self._record(
                Caller(None, Role.NO_ROLE), "ceremony-cleanup", "ok", {"transport_keys": swept}
            )
        super()._open_device()
        if self.unlocked and self._device_state().withdrawn_for is not None:
            self._retire_moved_keys()  # a crash between a move's commit and this

    def _retire_moved_keys(self) -> list[str]:
        """A device withdrawn for a move keeps no private key that signs: they live in the
        replacement now. The audit log is sealed a last time first; the register MAC key
        stays, so the final registers and state remain readable (as after Withdraw PSD)."""
        present = [label for label in MOVED_AWAY if self.token.has_key(label)]
        if not present:
            return []
        self._seal()
        for label in present:
            self.token.destroy_key(label)
        self.token.make_durable()
        self._record(
            Caller(None, Role.NO_ROLE), "ceremony-retire-keys", "ok", {"destroyed": present}
        )
        return present
