"""One logged-in session on one token, owned by this process, every call serialized."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from meter.errors import AccessDenied, ConfigurationError, TokenError, TokenUnavailable
from meter.token._errors import translated
from meter.token.module import Pkcs11Module
from meter.token.profile import CAPABILITIES, KeyAlgorithm
from meter.token.spki import ec_point, ed25519_spki, rsa_spki

__all__ = ["DataObject", "KeyKind", "Login", "Token"]

KeyKind = Literal["private", "public", "secret"]
Login = Literal["user", "so"]
_KEY_CLASSES = {
    "private": ObjectClass.PRIVATE_KEY,
    "public": ObjectClass.PUBLIC_KEY,
    "secret": ObjectClass.SECRET_KEY,
}

_P256_OID = "1.2.840.10045.3.1.7"
_ED25519_OID = "1.3.101.112"
_CURVES = {
    KeyAlgorithm.ECDSA_P256: (KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, _P256_OID),
    KeyAlgorithm.ED25519: (KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, _ED25519_OID),
}


@dataclass(frozen=True)
class DataObject:
    """A token data object: its label and value, and the handle to destroy it."""

    label: str
    value: bytes
    _object: Any


class Token:
    """A read-write session on one token, public or logged in. Use as a context manager.

    Every PKCS#11 call takes the module's lock; a file lock keeps other
    processes from opening the same token through this class at once.
    """

    def __init__(
        self,
        module: Pkcs11Module,
        label: str,
        token: pkcs11.Token,
        session: pkcs11.Session,
        lock_fd: int,
        sync_dir: Path | None,
        login: Login | None = "user",
        capabilities: frozenset[str] | None = None,
        profile_name: str | None = None,
    ) -> None:
        self._module = module
        self.label = label
        self._token = token
        self._session: pkcs11.Session | None = session
        self._lock_fd = lock_fd
        self._sync_dir = sync_dir
        self._syncer: ThreadPoolExecutor | None = None  # see make_durable_async
        self.where = f"token '{label}' in module {module.path}"
        self._login: Login | None = login
        # Key handles by (class, label): a lookup is a C_FindObjects round trip
        # on every signature otherwise. Keys only change through this object.
        self._keys: dict[tuple[ObjectClass, str], Any] = {}
        # What the HSM profile claims this token can do (None: not known, assume all);
        # the self-tests run only what is claimed.
        self.capabilities = capabilities
        self.profile_name = profile_name  # named by every "this token cannot" message

    # -- lifetime ---------------------------------------------------------

    @classmethod
    def open(
        cls,
        module: Pkcs11Module,
        label: str,
        pin: str | None,
        *,
        lock_dir: Path,
        so: bool = False,
        sync_dir: Path | None = None,
        capabilities: frozenset[str] | None = None,
        slot: int | None = None,
        lock_name: str | None = None,
        profile_name: str | None = None,
    ) -> Token:
        """Open the token labelled ``label`` (or the token in ``slot``), taking its lock.

        With a PIN, log in as user (or SO); with ``pin=None``, open a public
        session: public objects are readable and session objects can be made,
        and :meth:`login` can follow once a PIN is known. ``label`` then only
        names the token in messages. ``lock_name`` is the lock file's name in
        ``lock_dir`` (default ``token-LABEL.lock``).
        """
        if pin is None and so:
            raise TokenError(f"token '{label}' in module {module.path}: an SO session needs a PIN")
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock_path = lock_dir / (lock_name or f"token-{label}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise TokenUnavailable(
                f"token '{label}' in module {module.path} is in use by another process "
                f"(lock {lock_path})"
            ) from exc
        try:
            token = module.get_token(label) if slot is None else module.token_in_slot(slot)
            where = f"token '{label}' in module {module.path}"
            with module.lock, translated(where, _login_what(so, pin)):
                if pin is None:
                    session = token.open(rw=True)
                elif so:
                    session = token.open(rw=True, so_pin=pin)
                else:
                    session = token.open(rw=True, user_pin=pin)
            module.open_sessions += 1
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        login: Login | None = None if pin is None else "so" if so else "user"
        return cls(module, label, token, session, fd, sync_dir, login, capabilities, profile_name)

    @property
    def login_state(self) -> Login | None:
        """Who is logged in to the open session: "user", "so", or None (public session)."""
        return self._login

    def login(self, pin: str, so: bool = False) -> None:
        """Log the open token in as user (or SO), keeping its process lock.

        python-pkcs11 logs in only while opening a session, and PKCS#11 login
        state belongs to the application, not the session: so a logged-in
        session replaces the public one. Session objects of the old session go.
        """
        if self._login is not None:
            raise TokenError(
                f"{self.where}: already logged in as {self._login}; log out first ({_login_what(so, pin)})"
            )
        with self._call(_login_what(so, pin)):
            new = (
                self._token.open(rw=True, so_pin=pin)
                if so
                else self._token.open(rw=True, user_pin=pin)
            )
            self._replace_session(new, "so" if so else "user")

    def logout(self) -> None:
        """Log out (C_Logout), keeping a public session open and the process lock; idempotent."""
        if self._login is None or self._session is None:
            return
        with self._call("log out"):
            self._replace_session(self._token.open(rw=True), None)

    def _replace_session(self, new: pkcs11.Session, login: Login | None) -> None:
        old, self._session, self._login = self._session, new, login
        self._keys.clear()  # handles of private objects die with the login
        if old is not None:
            old.close()  # python-pkcs11 calls C_Logout first if the old session logged in

    @contextmanager
    def side_session(self, what: str) -> Iterator[pkcs11.Session]:
        """A second, public session on this token for the block (use it through `call_on`).

        PKCS#11 login state belongs to the application, but a session object belongs to
        the session that made it: an object made in this session survives the main
        session's logins and logouts, is visible to them, and is destroyed by the token
        when this session closes, at the end of the block or when the process dies. The
        token never writes it to its store.
        """
        with self._module.lock, translated(self.where, f"open a public session to {what}"):
            side = self._token.open(rw=True)
        self._module.open_sessions += 1
        try:
            yield side
        finally:
            try:
                with self._module.lock, suppress(pkcs11.PKCS11Error):
                    side.close()  # C_CloseSession destroys the session's objects
            finally:
                self._module.open_sessions -= 1

    @contextmanager
    def call_on(self, session: pkcs11.Session, what: str) -> Iterator[pkcs11.Session]:
        """`_call` for a `side_session`: the token's one lock, errors translated."""
        with self._module.lock, translated(self.where, what):
            yield session

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        if self._session is None:
            return
        session, self._session = self._session, None
        try:
            with self._module.lock, translated(self.where, "close session"):
                session.close()
        finally:
            self._module.open_sessions -= 1
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _call(self, what: str) -> Iterator[pkcs11.Session]:
        if self._session is None:
            raise TokenError(f"{self.where}: session is closed ({what})")
        with self._module.lock, translated(self.where, what):
            yield self._session

    def _require_user(self, what: str) -> None:
        if self._login != "user":
            who = "the SO is logged in" if self._login == "so" else "no user is logged in"
            raise AccessDenied(f"{self.where}: {who}; {what} needs the token's user login")

    def _key(self, session: pkcs11.Session, object_class: ObjectClass, label: str) -> Any:
        key = self._keys.get((object_class, label))
        if key is None:
            key = self._keys[(object_class, label)] = self._one(session, object_class, label)
        return key

    def _one(self, session: pkcs11.Session, object_class: ObjectClass, label: str) -> Any:
        """The one private token object of ``object_class`` labelled ``label``.

        Only private objects count, everywhere in this class: anyone may create public
        objects without a PIN, so a public key, certificate or "private key" object
        made by somebody else under one of our labels must be invisible, never chosen.
        """
        found = list(session.get_objects(_private(label, object_class)))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise TokenError(f"{self.where}: {what} private {object_class.name} '{label}'")
        return found[0]

    def can(self, capability: str) -> bool:
        """Does the token's HSM profile claim ``capability``? (No profile known: assume so.)"""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}")
        return self.capabilities is None or capability in self.capabilities

    def require(self, capability: str, purpose: str) -> None:
        """Refuse ``purpose``, before anything changes, on a token whose profile lacks it."""
        if not self.can(capability):
            profile = f"HSM profile {self.profile_name}" if self.profile_name else "its HSM profile"
            raise ConfigurationError(
                f"{self.where}: {purpose} needs capability {capability} "
                f"({CAPABILITIES[capability]}), which {profile} does not have"
            )

    def audit_algorithm(self) -> KeyAlgorithm:
        """The audit key's algorithm on this token: ECDSA P-256 where it can, else RSA-PSS-2048.

        ``meter audit verify`` accepts both (meter/psd/audit.py).
        """
        if self.can("raw_ecdsa"):
            return KeyAlgorithm.ECDSA_P256
        if self.can("rsa_pss"):
            return KeyAlgorithm.RSA_PSS_2048
        profile = f"HSM profile {self.profile_name}" if self.profile_name else "its HSM profile"
        raise ConfigurationError(
            f"{self.where}: the audit key needs capability raw_ecdsa or rsa_pss, "
            f"which {profile} does not have"
        )

    @property
    def serial(self) -> str:
        return self._token.serial.decode("ascii", "replace").strip()

    # -- keys -------------------------------------------------------------

    def _private_template(self, label: str, exportable: bool = False) -> dict[Attribute, Any]:
        # Exportable keys leave only wrapped, and only under a key the token's SO marked
        # CKA_TRUSTED (meter/token/wrapping.py); CKA_WRAP_WITH_TRUSTED cannot be cleared.
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: exportable,
            Attribute.SIGN: True,
            Attribute.LABEL: label,
            Attribute.ID: label.encode(),
        }
        if exportable:  # only then: a token without key wrap may not know the attribute
            template[Attribute.WRAP_WITH_TRUSTED] = True
        return template

    def can_export(self, algorithm: KeyAlgorithm | None) -> bool:
        """Can this token wrap such a key (None: a secret key) for a custodians' ceremony?"""
        if not self.can("aes_key_wrap_pad"):
            return False
        return algorithm is not KeyAlgorithm.ED25519 or self.can("wrap_ed25519_private")

    def _public_template(self, label: str) -> dict[Attribute, Any]:
        # The public half is private to the token's user too: nobody without the PIN
        # can read, delete or replace it (Retrieve PSD Public Key is the device's job).
        return {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.VERIFY: True,
            Attribute.LABEL: label,
            Attribute.ID: label.encode(),
        }

    def generate_signing_keypair(
        self, label: str, algorithm: KeyAlgorithm, *, exportable: bool = False
    ) -> bytes:
        """Generate a signing key pair in the token; return the public SPKI DER.

        Non-extractable, unless ``exportable`` and the token can wrap it (`can_export`):
        then extractable only under a trusted key (CKA_WRAP_WITH_TRUSTED).
        """
        export = exportable and self.can_export(algorithm)
        return self._generate_keypair(label, algorithm, derive=False, exportable=export)

    def _generate_keypair(
        self, label: str, algorithm: KeyAlgorithm, *, derive: bool, exportable: bool = False
    ) -> bytes:
        """A key pair for signing, or with ``derive`` for key agreement only."""
        if self.has_key(label):
            raise TokenError(f"{self.where}: a key labelled '{label}' exists already")
        pub_t = self._public_template(label)
        priv_t = self._private_template(label, exportable)
        if derive:
            # Explicitly not for signatures: SoftHSM2 defaults CKA_SIGN to true.
            pub_t[Attribute.VERIFY] = priv_t[Attribute.SIGN] = False
            pub_t[Attribute.DERIVE] = priv_t[Attribute.DERIVE] = True
        if algorithm is KeyAlgorithm.RSA_PSS_2048:
            key_type, mechanism, length = KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, 2048
            pub_t[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
        else:
            key_type, mechanism, oid = _CURVES[algorithm]
            length = None
            pub_t[Attribute.EC_PARAMS] = encode_named_curve_parameters(oid)
        purpose = "key-agreement" if derive else str(algorithm)
        with self._call(f"generate {purpose} key pair '{label}'") as s:
            s.generate_keypair(
                key_type,
                length,
                mechanism=mechanism,
                public_template=pub_t,
                private_template=priv_t,
                store=True,
            )
        return self.public_key_spki(label)

    def public_key_spki(self, label: str) -> bytes:
        """The DER SubjectPublicKeyInfo of the public key labelled ``label``."""
        with self._call(f"read public key '{label}'") as s:
            key: Any = self._one(s, ObjectClass.PUBLIC_KEY, label)
            key_type = key.key_type
            if key_type == KeyType.EC:
                return bytes(encode_ec_public_key(key))
            if key_type == KeyType.EC_EDWARDS:
                return ed25519_spki(ec_point(bytes(key[Attribute.EC_POINT])))
            if key_type == KeyType.RSA:
                return rsa_spki(bytes(encode_rsa_public_key(key)))
        raise TokenError(f"{self.where}: public key '{label}' has unsupported type {key_type}")

    def has_key(self, label: str) -> bool:
        with self._call(f"look up key '{label}'") as s:
            return any(True for _ in s.get_objects(_private(label)))

    def key_attributes(self, label: str, kind: KeyKind) -> dict[str, bool]:
        """Security attributes of a stored key, read back from the token."""
        with self._call(f"read attributes of '{label}'") as s:
            key = self._one(s, _KEY_CLASSES[kind], label)
            return {
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "extractable": bool(key[Attribute.EXTRACTABLE]),
                "private": bool(key[Attribute.PRIVATE]),
                "token": bool(key[Attribute.TOKEN]),
            }

    def sign(self, label: str, algorithm: KeyAlgorithm, message: bytes) -> bytes:
        """Sign ``message`` inside the token, returning the signature in PIM-1's form.

        ECDSA: SHA-256 outside (SoftHSM2 lacks CKM_ECDSA_SHA256), raw CKM_ECDSA
        inside, r||s out. Ed25519: CKM_EDDSA over the message. RSA: PSS with
        SHA-256, MGF1-SHA-256 and a 32-byte salt.
        """
        self._require_user(f"sign with key '{label}'")
        with self._call(f"sign with key '{label}'") as s:
            key = self._key(s, ObjectClass.PRIVATE_KEY, label)
            if not hasattr(key, "sign"):  # python-pkcs11 offers sign() only with CKA_SIGN
                raise TokenError(f"{self.where}: key '{label}' is not a signing key")
            if algorithm is KeyAlgorithm.ECDSA_P256:
                return bytes(key.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))
            if algorithm is KeyAlgorithm.ED25519:
                return bytes(key.sign(message, mechanism=Mechanism.EDDSA))
            return bytes(
                key.sign(
                    message,
                    mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                    mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32),
                )
            )

    def generate_key_exchange_keypair(self, label: str) -> bytes:
        """An ECDH P-256 key pair for key agreement (CKA_DERIVE), private half non-extractable.

        Refused with a ConfigurationError naming ``ecdh_derive`` and the profile on a
        token without it (openCryptoki 3.8's soft token has no EC at all).
        """
        self.require("ecdh_derive", "Key Exchange (the custodians' ECDH P-256 key)")
        return self._generate_keypair(label, KeyAlgorithm.ECDSA_P256, derive=True)

    def generate_hmac_key(self, label: str, *, exportable: bool = False) -> None:
        """A 256-bit HMAC-SHA-256 key, generated in the token, sensitive and not extractable
        (with ``exportable``, where the token can wrap it: only under a trusted key)."""
        export = exportable and self.can_export(None)
        if self.has_key(label):
            raise TokenError(f"{self.where}: a key labelled '{label}' exists already")
        with self._call(f"generate HMAC key '{label}'") as s:
            s.generate_key(
                KeyType.GENERIC_SECRET,
                256,
                label=label,
                id=label.encode(),
                store=True,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: export,
                    Attribute.SIGN: True,
                    Attribute.VERIFY: True,
                }
                | ({Attribute.WRAP_WITH_TRUSTED: True} if export else {}),
            )

    def hmac(self, label: str, data: bytes) -> bytes:
        """HMAC-SHA-256 of ``data`` under the token's secret key ``label``."""
        self._require_user(f"HMAC with key '{label}'")
        with self._call(f"HMAC with key '{label}'") as s:
            key = self._key(s, ObjectClass.SECRET_KEY, label)
            return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))

    def destroy_key(self, label: str) -> None:
        self._keys = {k: v for k, v in self._keys.items() if k[1] != label}
        with self._call(f"destroy key '{label}'") as s:
            for obj in list(s.get_objects(_private(label))):
                obj.destroy()

    def random(self, length: int) -> bytes:
        with self._call("generate random") as s:
            return bytes(s.generate_random(length * 8))

    # -- data objects -----------------------------------------------------

    def create_data(
        self, application: str, label: str, value: bytes, *, private: bool = True
    ) -> DataObject:
        """Store a new token data object (SoftHSM2 cannot change a stored value in place)."""
        with self._call(f"create data object '{label}'") as s:
            obj = s.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: private,
                    Attribute.MODIFIABLE: False,
                    Attribute.APPLICATION: application,
                    Attribute.LABEL: label,
                    Attribute.VALUE: value,
                }
            )
        return DataObject(label, value, obj)

    def data_objects(self, application: str) -> list[DataObject]:
        """Every private data object of ``application`` in the token, in no particular order."""
        with self._call(f"list data objects of '{application}'") as s:
            found = s.get_objects(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.APPLICATION: application,
                    Attribute.PRIVATE: True,  # see _one: public ones are anybody's
                }
            )
            return [
                DataObject(str(obj[Attribute.LABEL]), bytes(obj[Attribute.VALUE]), obj)
                for obj in found
            ]

    def destroy(self, obj: DataObject) -> None:
        with self._call(f"destroy data object '{obj.label}'"):
            obj._object.destroy()

    def covers(self, path: Path) -> bool:
        """Does make_durable flush ``path`` too (a file on the synced file system)?"""
        if self._sync_dir is None:
            return False
        return os.stat(path).st_dev == os.stat(self._sync_dir).st_dev

    def make_durable_async(self, also: Callable[[], None] | None = None) -> Future[None]:
        """make_durable, then ``also``, on the token's own syncing thread: a sync waits for the
        disk, not for the token, so the caller's next token calls can run meanwhile."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-sync")

        def run() -> None:
            self.make_durable()
            if also is not None:
                also()

        return self._syncer.submit(run)

    def make_durable(self) -> None:
        """Flush what the token wrote to stable storage, where the token does not itself."""
        if self._sync_dir is None:
            return
        fd = os.open(self._sync_dir, os.O_RDONLY)
        try:
            if _libc().syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise TokenError(
                    f"{self.where}: syncfs of {self._sync_dir} failed: {os.strerror(err)}"
                )
        finally:
            os.close(fd)


def _private(label: str, object_class: ObjectClass | None = None) -> dict[Attribute, Any]:
    template: dict[Attribute, Any] = {
        Attribute.LABEL: label,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
    }
    if object_class is not None:
        template[Attribute.CLASS] = object_class
    return template


def _login_what(so: bool, pin: str | None) -> str:
    if pin is None:
        return "open public session"
    return "log in as SO" if so else "log in"


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
    return _LIBC
