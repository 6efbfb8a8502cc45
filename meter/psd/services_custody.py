"""The device's side of the key ceremonies (docs/custody.md): export and import of its keys.

One user at a time (rule 4), so a ceremony is a sequence of sessions:

1. the **Security Officer** authorizes the ceremony (Key Administration): its id and
   purpose ("export-backup", "export-move" or "import"), held in this process's memory
   until it is used, replaced or the device stops; the SO's logon also gives the device
   the token's SO PIN, which a trusted key needs;
2. a **Key Custodian** runs the key work (Key Exchange): the host hands over the
   transport key it has just split; the device makes it a trusted wrapping key (token
   logout, SO login, create, SO logout, user login), wraps the signing, register-MAC and
   audit keys, destroys it, and returns the wrapped keys with their key check values.
   On the target, it unwraps them under temporary labels, checks every KCV and a
   pairwise signature against the certificate, and only then renames them and writes
   the registers of the source's final-register statement;
3. for a move, the **Security Officer** finishes it: the device signs the final-register
   statement and the transcript and is withdrawn, in one durable step;
4. the transcript (shares' fingerprints, KCVs, who, when, outcome) is signed by the
   audit key and goes into the audit log.

The transport key is in this process only during the one Key Exchange request that
uses it (as the bytes of the request and a bytearray zeroed at the end of it; Python
may have made copies it does not zero), and in the token only during that request; a
crash leaves at most a transport key object, which the next logon destroys.

The import is meter.psd.services_custody_import; the documents (bundle, statement) and
their checks are meter.psd.services_custody_formats.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import serialization

from meter.errors import DeviceLocked, InvalidInput
from meter.psd.audit import audit_key_algorithm
from meter.psd.device import SIGNING_KEY_LABEL, Meter
from meter.psd.firmware_core import AUDIT_KEY_LABEL
from meter.psd.roles import Service
from meter.psd.services_custody_formats import (
    BUNDLE_FORMAT,
    CEREMONY_APPLICATION,
    CEREMONY_ID,
    CEREMONY_KEYS,
    PURPOSES,
    STATEMENT_FORMAT,
    TRANSCRIPT_FORMAT,
    Authorization,
    canonical,
    check_transport_key,
    statement_message,
    transcript_message,
)
from meter.psd.services_custody_import import CustodyImportServices
from meter.token import wrapping as w

__all__ = ["CustodyServices"]


class CustodyServices(CustodyImportServices):
    """The ceremony services of Table 2's Security Officer and Key Custodian rows."""

    # -- Security Officer: authorize ------------------------------------------

    def ceremony_authorize(
        self, ceremony: str, purpose: str, postal_root_sha256: str | None = None
    ) -> dict[str, Any]:
        """Key Administration (Security Officer): allow one ceremony on this device; an
        import names the postal root (SHA-256 of its DER) the replacement is to trust."""
        with self._service(
            Service.KEY_ADMINISTRATION, action="authorize-ceremony", ceremony=ceremony
        ) as out:
            if not CEREMONY_ID.fullmatch(ceremony):
                raise InvalidInput(
                    f"ceremony id '{ceremony}' must be 1-64 letters, digits or . _ : -"
                )
            if purpose not in PURPOSES:
                raise InvalidInput(f"ceremony purpose '{purpose}' is not one of {list(PURPOSES)}")
            root: bytes | None = None
            resumed = False
            if purpose == "import":
                root = _root_digest(postal_root_sha256)
                resumed = self._check_import_target(resume=True, ceremony=ceremony)
            else:
                self._exportable_keys()  # refused now, on a token or key that cannot go
            assert self._session is not None
            self._ceremony = Authorization(
                ceremony,
                purpose,
                self._session.user.user_id,
                self.host_now().isoformat(),
                postal_root=root,
                resumed=resumed,
            )
            out["purpose"] = purpose
            if resumed:
                out["resume"] = "transcript"
        answer = {"ceremony": ceremony, "purpose": purpose, "authorized_by": self._ceremony.by}
        # The host then skips the shares: this import committed on an earlier run.
        return answer | ({"resume": "transcript"} if resumed else {})

    # -- Key Custodian: export ------------------------------------------------

    def ceremony_export_keys(self, ceremony: str, transport_key: bytes) -> dict[str, Any]:
        """Key Exchange (Key Custodian): wrap the meter's keys under the transport key."""
        key = bytearray(transport_key)
        try:
            with self._service(Service.KEY_EXCHANGE, step="export", ceremony=ceremony) as out:
                authorized = self._authorized(ceremony, ("export-backup", "export-move"))
                check_transport_key(key)
                meter = self._require_meter()
                keys = self._exportable_keys()
                so_pin, user_pin = self._pins.get("so_pin"), self._pins["user_pin"]
                if so_pin is None:
                    raise DeviceLocked("the device holds no SO PIN: a Security Officer must log on")
                label = f"{w.TRANSPORT_LABEL_PREFIX}-{ceremony}"
                try:
                    with w.trusted_wrapping_key(
                        self.token, label, key, so_pin=so_pin, user_pin=user_pin
                    ) as wrapping:
                        wrapped = [w.wrap_key(self.token, wrapping, k) for k in keys]
                finally:
                    # The re-login gave every private object a new handle: reopen the records.
                    self._open_device()
                kcvs = {e.label: e.kcv.hex() for e in wrapped}
                authorized.exported = kcvs
                bundle = self._bundle(meter, authorized, wrapped)
                out.update(kcvs=kcvs, bundle_sha256=hashlib.sha256(canonical(bundle)).hexdigest())
            return bundle
        finally:
            key[:] = bytes(len(key))

    def _bundle(
        self, meter: Meter, authorized: Authorization, wrapped: list[w.WrappedKey]
    ) -> dict[str, Any]:
        certs = meter.certificates
        if certs is None:
            raise DeviceLocked("the device has no certificate: a replacement could not be checked")
        identity = meter.identity
        return {
            "format": BUNDLE_FORMAT,
            "ceremony": authorized.ceremony,
            "purpose": authorized.purpose,
            "exported_at": self.host_now().isoformat(),
            "device": {
                "device_serial": identity.device_serial,
                "vendor_model": identity.vendor_model,
                "authorization_id": identity.authorization_id,
                "algorithm": identity.algorithm.value,
                "software_id": identity.software_id,
            },
            "certificates": {
                name: cert.public_bytes(serialization.Encoding.PEM).decode()
                for name, cert in (
                    ("meter", certs.meter),
                    ("provider", certs.provider),
                    ("postal_root", certs.root),
                )
            },
            "keys": [e.to_json() for e in wrapped],
        }

    def _exportable_keys(self) -> list[w.ExportableKey]:
        self._require_meter()
        if not self.token.has_key(AUDIT_KEY_LABEL):
            raise DeviceLocked("there is no audit key to sign the transcript (Create Audit Key)")
        keys = [w.describe_key(self.token, label, kind) for label, kind in CEREMONY_KEYS]
        for key in keys:
            w.require_wrappable(self.token, key)
        return keys

    # -- Security Officer: finish a move ----------------------------------------

    def ceremony_finish_move(self, ceremony: str, transcript: dict[str, Any]) -> dict[str, Any]:
        """Key Administration (Security Officer): the final-register statement, signed by the
        signing key, and the withdrawal of this device, in one durable step; the transcript
        signed by the audit key. A rerun after the withdrawal returns the same documents."""
        state = self._device_state()
        if state.withdrawn_for is not None and state.withdrawn_for == ceremony:
            with self._service(Service.REQUEST_STATUS, step="finish-move-again", ceremony=ceremony):
                return self._stored_move(ceremony)
        with self._service(
            Service.KEY_ADMINISTRATION, action="finish-move", ceremony=ceremony
        ) as out:
            authorized = self._authorized(ceremony, ("export-move",))
            if authorized.exported is None:
                raise DeviceLocked(
                    f"ceremony '{ceremony}' has not exported the keys yet (a Key Custodian's "
                    "step): the device is not withdrawn without them"
                )
            meter = self._require_meter()
            for old in self.token.data_objects(CEREMONY_APPLICATION):
                self.token.destroy(old)  # a statement of an attempt that never committed
            at = self.meter_now().isoformat()
            r = meter.registers
            statement = {
                "format": STATEMENT_FORMAT,
                "ceremony": ceremony,
                "device_serial": meter.identity.device_serial,
                "key_id": meter.key_id.hex(),
                "ascending": r.ascending,
                "descending": r.descending,
                "control_total": r.control_total,
                "piece_count": r.sequence,
                "last_credit_id": r.last_credit_id.hex(),
                "withdrawn_at": at,
                "kcvs": authorized.exported,
            }
            signature = self.token.sign(
                SIGNING_KEY_LABEL, meter.identity.algorithm, statement_message(statement)
            )
            signed_statement = {"statement": statement, "signature": signature.hex()}
            transcript = {**transcript, "final_registers": signed_statement}
            document = self._signed_transcript(ceremony, transcript)
            record = canonical({"statement": signed_statement, "transcript": document})
            self.token.create_data(CEREMONY_APPLICATION, f"move-{ceremony}", record)
            self.token.make_durable()
            # The commit point: from here the device is withdrawn and never signs again.
            meter.commit_state(
                meter.state.next(withdrawn_at=at, withdrawn_for=ceremony, signing_key_active=False)
            )
            self._ceremony = None
            out["destroyed"] = self._retire_moved_keys()
            out.update(
                ascending=r.ascending,
                descending=r.descending,
                piece_count=r.sequence,
                transcript_sha256=hashlib.sha256(canonical(document)).hexdigest(),
            )
        return {"final_registers": signed_statement, "transcript": document}

    def _stored_move(self, ceremony: str) -> dict[str, Any]:
        for obj in self.token.data_objects(CEREMONY_APPLICATION):
            if obj.label == f"move-{ceremony}":
                stored = json.loads(obj.value)
                return {"final_registers": stored["statement"], "transcript": stored["transcript"]}
        raise DeviceLocked(f"the device was withdrawn for '{ceremony}' but keeps no statement")

    # -- Key Custodian: the transcript ------------------------------------------

    def ceremony_sign_transcript(self, ceremony: str, transcript: dict[str, Any]) -> dict[str, Any]:
        """Key Exchange (Key Custodian): the audit key signs the ceremony's transcript (a
        backup's, or an import's), which ends the ceremony's authorization.

        A failed ceremony's transcript (outcome "failed", any purpose) is signed too, or,
        on a token without an audit key yet (an import's target before its commit point),
        returned unsigned; either way it goes into the audit log."""
        failed = transcript.get("outcome") == "failed"
        with self._service(Service.KEY_EXCHANGE, step="transcript", ceremony=ceremony) as out:
            authorized = self._authorized(
                ceremony, PURPOSES if failed else ("export-backup", "import")
            )
            if authorized.resumed and authorized.exported is None and not failed:
                authorized.exported = self._resumed_kcvs(transcript)
            if authorized.exported is None and not failed:
                raise DeviceLocked(f"ceremony '{ceremony}' has moved no key yet: nothing to sign")
            if failed and not self.token.has_key(AUDIT_KEY_LABEL):
                document = self._unsigned_transcript(ceremony, transcript)
            else:
                document = self._signed_transcript(ceremony, transcript)
            if authorized.purpose == "import" and not failed:
                for marker in self._unsigned_import(ceremony):
                    self.token.destroy(marker)  # signed: a rerun is refused again
            out["outcome"] = "failed" if failed else "completed"
            out["transcript_sha256"] = hashlib.sha256(canonical(document)).hexdigest()
            self._ceremony = None
        return document

    def _unsigned_transcript(self, ceremony: str, transcript: dict[str, Any]) -> dict[str, Any]:
        if transcript.get("ceremony") != ceremony:
            raise InvalidInput(f"the transcript is not the one of ceremony '{ceremony}'")
        body = {**transcript, "device": self._attested()}
        why = "the device has no audit key yet (a target before its import's commit point)"
        self._record(
            self.caller(), "ceremony-transcript", "ok", {"transcript": body, "unsigned": why}
        )
        return {"format": TRANSCRIPT_FORMAT, "transcript": body, "signature": None, "unsigned": why}

    def _attested(self) -> dict[str, Any]:
        """What the device itself vouches for in a transcript, beside what the host reports."""
        authorized = self._ceremony
        attested: dict[str, Any] = {"recorded_at": self.host_now().isoformat()}
        if authorized is not None:
            attested |= {
                "purpose": authorized.purpose,
                "authorized_by": authorized.by,
                "authorized_at": authorized.at,
                "kcvs": authorized.exported,
            }
        meter = self._meter
        if meter is not None:
            attested["device_serial"] = meter.identity.device_serial
        return attested

    def _signed_transcript(self, ceremony: str, transcript: dict[str, Any]) -> dict[str, Any]:
        if transcript.get("ceremony") != ceremony:
            raise InvalidInput(f"the transcript is not the one of ceremony '{ceremony}'")
        public = serialization.load_der_public_key(self.token.public_key_spki(AUDIT_KEY_LABEL))
        algorithm = audit_key_algorithm(public)
        body = {**transcript, "device": self._attested()}
        signature = self.token.sign(AUDIT_KEY_LABEL, algorithm, transcript_message(body))
        # The transcript itself goes into the audit log (its fingerprints, KCVs, outcome).
        self._record(self.caller(), "ceremony-transcript", "ok", {"transcript": body})
        return {
            "format": TRANSCRIPT_FORMAT,
            "transcript": body,
            "signature": {
                "algorithm": algorithm.value,
                "key_id": hashlib.sha256(
                    public.public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                ).hexdigest()[:16],
                "value": signature.hex(),
            },
        }


def _root_digest(text: str | None) -> bytes:
    try:
        digest = bytes.fromhex(text or "")
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise InvalidInput(
            "an import names the postal root the replacement trusts: its SHA-256 (64 hex "
            "digits, of the certificate's DER)"
        )
    return digest
