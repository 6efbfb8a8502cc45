"""The meter's audit log: hash-chained records, signed seals, archives, offline verification.

Every service call, logon, logoff, error state and self-test result becomes one
record. Records are written at once and durably (a failed logon happens before
any PIN opens the token), and chained by hash; the audit key in the token signs
the chain's head in *seal* records whenever the firmware holds the token.

Record (one JSON object; canonical JSON = ``sort_keys``, separators ``,`` and
``:``, ASCII only, no NaN)::

    {"index": 7, "at": "2024-05-01T12:00:00Z", "user_id": "alice" | null,
     "role": "customer", "service": "create-indicium", "outcome": "ok",
     "values": {...}, "kind": "event" | "seal", "prev": HEX32, "digest": HEX32}

- ``index`` counts 1, 2, 3 ... and is never reused, across archives and deletes;
- ``digest = SHA-256(b"meter-audit-v1" || prev || canonical JSON of
  {at, index, kind, outcome, role, service, user_id, values})``; ``prev`` is the
  previous record's digest (32 zero bytes before record 1). ``kind`` is hashed
  too, so an event cannot pass for a seal or the reverse;
- a *seal* has user_id null, role ``no-role``, service ``audit-seal``, outcome
  ``ok`` and values ``{"through": N, "head": HEX32, "key_id": HEX8,
  "signature": HEX}``: N is the record before the seal, ``head`` its digest
  (= the seal's ``prev``), ``signature`` the audit key's signature over
  ``b"meter-audit-seal-v1" || head || N as 8 bytes big-endian || the seal's own
  "at" in ASCII`` (so the seal record is covered entirely), and ``key_id`` the
  first 8 bytes of SHA-256 of the audit key's SPKI DER. The audit key is ECDSA
  P-256 where the token has EC (signature: raw r||s, 64 bytes, ECDSA over
  SHA-256), else RSA-2048 (openCryptoki's soft token; signature: 256 bytes,
  RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt). The verifier
  takes the algorithm from the public key it is given.

Files under the log's folder (``HOME/meter/audit/``):

- ``audit.jsonl``: the live log, one canonical record per line. After
  delete_archived its first line is ``{"anchor": {"digest": HEX32, "index": N}}``:
  the last deleted record, from which the live chain continues. On open the
  whole chain is checked; a broken line is a ConfigurationError naming the file,
  line and record, and the file is left as it is. Only a torn last line (no
  final newline: a crash mid-append, never acknowledged) is dropped.
- ``archived.json``: ``{"archived_through": N, "digest": HEX32, "file": PATH}``,
  replaced atomically after each archive.
- ``audit.lock``: every operation holds an exclusive flock on it (the live log
  itself is replaced by delete_archived, so it cannot carry the lock), rereads
  what other processes appended, then writes.

Export and archive files (one JSON object, one record per line)::

    {"format": "meter-audit-export-v1", "kind": "export" | "archive",
     "written_at": "...Z", "key_id": HEX8,
     "anchor": {"index": N, "digest": HEX32} | null,
     "records": [RECORD, ...]}

``anchor`` is the record just before the first one (null when the file starts
at record 1). Both end with a seal. audit_verify.verify_export checks files in order
(archive 1, archive 2, ..., latest export) with the public audit key alone.
A first file that starts after an anchor is checked from that anchor on: the
report is OK and says that earlier records are not in the files; the anchor's
digest is the first record's ``prev``, which the following seal signs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from meter.durable import sync_directory, write_atomically
from meter.errors import ConfigurationError, InvalidInput
from meter.psd.audit_records import (
    _GENESIS,
    _SIGNATURE_BYTES,
    EXPORT_FORMAT,
    SEAL_SERVICE,
    AuditPublicKey,
    AuditRecord,
    _canonical,
    _format_time,
    _json_values,
    _loads,
    _parse_anchor,
    _parse_time,
    audit_key_algorithm,
    audit_key_id,
    seal_message,
    verify_seal_signature,
)

__all__ = [
    "EXPORT_FORMAT",
    "SEAL_SERVICE",
    "AuditLog",
    "AuditPublicKey",
    "AuditRecord",
    "Signer",
    "audit_key_algorithm",
    "audit_key_id",
    "seal_message",
    "verify_seal_signature",
]

Signer = Callable[[bytes], bytes]
"""Returns the audit key's signature of the message: raw r||s (64 bytes) for ECDSA P-256,
256 bytes of RSASSA-PSS for RSA-2048 (see the module docstring).

It is called while the log's lock is held: it must not write to the audit log itself.
"""

_LIVE_LOG = "audit.jsonl"
_STATE_FILE = "archived.json"
_LOCK_FILE = "audit.lock"


@dataclass
class _State:
    records: list[AuditRecord] = field(default_factory=list)
    anchor: tuple[int, bytes] | None = None
    inode: int | None = None
    size: int = 0  # bytes read and checked
    lines: int = 0  # lines read and checked

    @property
    def head(self) -> tuple[int, bytes]:
        if self.records:
            return self.records[-1].index, self.records[-1].digest
        return self.anchor or (0, _GENESIS)

    def digest_of(self, index: int) -> bytes | None:
        if self.anchor is not None and self.anchor[0] == index:
            return self.anchor[1]
        first = self.records[0].index if self.records else 0
        if self.records and first <= index <= self.records[-1].index:
            return self.records[index - first].digest
        return _GENESIS if index == 0 else None


class AuditLog:
    """The live audit log in one folder, shared safely by processes through a flock."""

    def __init__(self, folder: Path) -> None:
        """Use open(): it checks the chain."""
        self._folder = folder
        self._path = folder / _LIVE_LOG
        self._state_path = folder / _STATE_FILE
        self._lock_path = folder / _LOCK_FILE
        self._state = _State()
        self._archived: tuple[int, bytes] = (0, _GENESIS)
        # Torn last lines (a crash mid-append) dropped since open: the firmware may record it.
        self.torn_lines_dropped = 0

    @classmethod
    def open(cls, folder: Path) -> AuditLog:
        """Open (or start) the log in ``folder``; ConfigurationError names a broken record."""
        log = cls(Path(folder))
        with log._locked():
            pass
        return log

    @property
    def path(self) -> Path:
        return self._path

    @property
    def head(self) -> tuple[int, bytes]:
        """(index, digest) of the newest record; (0, 32 zero bytes) for a new log."""
        with self._locked():
            return self._state.head

    @property
    def archived_through(self) -> int:
        with self._locked():
            return self._archived[0]

    def records(self, since: int | None = None) -> list[AuditRecord]:
        """The live records with index >= ``since`` (all when None), oldest first."""
        with self._locked():
            return [r for r in self._state.records if since is None or r.index >= since]

    def append(
        self,
        *,
        at: datetime,
        user_id: str | None,
        role: str,
        service: str,
        outcome: str,
        values: Mapping[str, object],
        durable: bool = True,
    ) -> AuditRecord:
        """Add one event record; it is on disk (fsync) before this returns.

        With ``durable=False`` it is written but not synced: the caller makes it durable
        with something it syncs anyway (``sync``, or a sync of the whole file system)
        before it relies on it, so that one disk flush serves both.
        """
        for name, text in (("role", role), ("service", service), ("outcome", outcome)):
            if not text:
                raise InvalidInput(f"audit record needs a {name}")
        at_text, clean = _format_time(at), _json_values(values)
        with self._locked():
            return self._append(
                at_text=at_text,
                user_id=user_id,
                role=role,
                service=service,
                outcome=outcome,
                values=clean,
                kind="event",
                durable=durable,
            )

    def sync(self) -> None:
        """Make every record written so far durable (those appended with durable=False)."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigurationError(f"audit log {self._path}: {exc.strerror or exc}") from exc
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise ConfigurationError(f"audit log {self._path}: cannot sync: {exc}") from exc
        finally:
            os.close(fd)

    def seal(self, signer: Signer, key_id: bytes, at: datetime) -> AuditRecord | None:
        """Sign the current head in a seal record; None if the newest record is a seal."""
        at_text = _format_time(at)
        with self._locked():
            return self._seal(signer, key_id, at_text)

    def export(self, path: Path, signer: Signer, key_id: bytes, at: datetime) -> int:
        """Seal, then write every live record to ``path`` (replaced if it exists); the count."""
        path = Path(path)
        if path.is_dir():
            raise InvalidInput(f"{path} is a folder: name the export file")
        document, count = self.export_document(signer, key_id, at)
        _write_output(path, document, overwrite=True)
        return count

    def export_document(self, signer: Signer, key_id: bytes, at: datetime) -> tuple[bytes, int]:
        """Seal, then every live record as an export document; and how many records."""
        at_text = _format_time(at)
        with self._locked():
            self._seal(signer, key_id, at_text)
            records = list(self._state.records)
            return _document("export", at_text, key_id, self._state.anchor, records), len(records)

    def archive(self, path: Path, signer: Signer, key_id: bytes, at: datetime) -> int:
        """Seal, write the records not yet archived to a new file ``path``; the count."""
        return self.archive_document(path, signer, key_id, at)[1]

    def archive_document(
        self, path: Path, signer: Signer, key_id: bytes, at: datetime
    ) -> tuple[bytes, int]:
        """As archive, also returning the archive document written to ``path``."""
        at_text, path = _format_time(at), Path(path)
        if path.exists():
            raise InvalidInput(f"{path} exists already: choose a new archive file")
        with self._locked():
            self._seal(signer, key_id, at_text)
            through, through_digest = self._archived
            records = [r for r in self._state.records if r.index > through]
            if not records:
                raise InvalidInput(f"nothing to archive: records through {through} are archived")
            anchor = (through, through_digest) if through else None
            document = _document("archive", at_text, key_id, anchor, records)
            _write_output(path, document, False)
            last = records[-1]
            state = {
                "archived_through": last.index,
                "digest": last.digest.hex(),
                "file": str(path.resolve()),
            }
            self._store(self._state_path, (json.dumps(state, sort_keys=True) + "\n").encode())
            self._archived = (last.index, last.digest)
            return document, len(records)

    def delete_archived(self) -> int:
        """Drop live records already archived, keeping the last as anchor; the count dropped."""
        with self._locked():
            through, through_digest = self._archived
            if through == 0:
                raise InvalidInput("no audit record is archived yet: archive before deleting")
            keep = [r for r in self._state.records if r.index > through]
            dropped = len(self._state.records) - len(keep)
            if dropped == 0:
                return 0
            lines = [_canonical({"anchor": {"digest": through_digest.hex(), "index": through}})]
            lines += [_canonical(r.to_json()) for r in keep]
            data = "".join(line + "\n" for line in lines).encode()
            self._store(self._path, data)
            try:
                inode = os.stat(self._path).st_ino
            except OSError as exc:
                raise ConfigurationError(f"audit log {self._path}: {exc.strerror}") from exc
            anchor = (through, through_digest)
            self._state = _State(keep, anchor, inode, len(data), len(lines))
            return dropped

    # -- inside the lock -----------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"audit log {self._folder}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._refresh()
            yield
        finally:
            os.close(fd)  # also releases the flock

    def _refresh(self) -> None:
        """Read what other processes wrote since we last looked; check it."""
        archived = self._read_archived()
        old = self._state
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            if old.head[0] or archived[0]:
                raise ConfigurationError(
                    f"audit log {self._path} is missing but records through "
                    f"{max(old.head[0], archived[0])} were written; restore it from a backup"
                ) from None
            self._state, self._archived = _State(), archived
            return
        except OSError as exc:
            raise ConfigurationError(f"audit log {self._path}: {exc.strerror or exc}") from exc
        if stat.st_ino == old.inode and stat.st_size == old.size:
            new = old
        elif stat.st_ino == old.inode and stat.st_size > old.size:
            new = self._load(_State(list(old.records), old.anchor, old.inode, old.size, old.lines))
        else:
            new = self._load(_State(inode=stat.st_ino))
            if new.head[0] < old.head[0]:
                raise ConfigurationError(
                    f"audit log {self._path} went back from record {old.head[0]} to "
                    f"{new.head[0]}; restore it from a backup"
                )
        through = archived[0]
        if new.anchor is not None and through < new.anchor[0]:
            raise ConfigurationError(
                f"{self._state_path} says records through {through} are archived, but "
                f"{self._path} has deleted records through {new.anchor[0]}"
            )
        if through and new.digest_of(through) != archived[1]:
            raise ConfigurationError(
                f"{self._state_path} says records through {through} are archived, but record "
                f"{through} in {self._path} is missing or differs from the one archived"
            )
        self._state, self._archived = new, archived

    def _load(self, state: _State) -> _State:
        """Parse the file from ``state.size`` on, appending to ``state``; drops a torn tail."""
        try:
            with open(self._path, "r+b") as f:
                f.seek(state.size)
                data = f.read()
                end = data.rfind(b"\n") + 1
                if end < len(data):
                    # A crash cut the last append short: it was never acknowledged.
                    f.truncate(state.size + end)
                    f.flush()
                    os.fsync(f.fileno())
                    self.torn_lines_dropped += 1
        except OSError as exc:
            raise ConfigurationError(f"audit log {self._path}: {exc.strerror or exc}") from exc
        for raw in data[:end].split(b"\n")[:-1]:
            state.lines += 1
            where, expected = f"line {state.lines}", state.head[0] + 1
            try:
                obj = _loads(raw)
                if state.lines == 1 and isinstance(obj, dict) and set(obj) == {"anchor"}:
                    state.anchor = _parse_anchor(obj["anchor"])
                    continue
                record = AuditRecord.from_json(obj)
            except (ValueError, TypeError, KeyError) as exc:
                raise self._broken(where, expected, f"is unreadable ({exc})") from exc
            if record.index != expected:
                raise self._broken(where, expected, f"holds record {record.index} instead")
            if record.prev != state.head[1]:
                raise self._broken(where, expected, "does not chain to the record before it")
            if record.computed_digest() != record.digest:
                raise self._broken(where, expected, "was altered (its digest does not match)")
            state.records.append(record)
        state.size += end
        return state

    def _broken(self, where: str, index: int, what: str) -> ConfigurationError:
        return ConfigurationError(
            f"audit log {self._path}: {where} (record {index}) {what}; the file was left as it "
            "is: keep it as evidence, restore the log from a backup and check it with "
            "'meter audit verify'"
        )

    def _read_archived(self) -> tuple[int, bytes]:
        try:
            text = self._state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0, _GENESIS
        except OSError as exc:
            raise ConfigurationError(f"{self._state_path}: {exc.strerror or exc}") from exc
        try:
            obj = json.loads(text)
            through, digest = obj["archived_through"], bytes.fromhex(obj["digest"])
            if not isinstance(through, int) or through < 1 or len(digest) != 32:
                raise ValueError("archived_through or digest out of range")
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigurationError(f"{self._state_path} is not an archive marker: {exc}") from exc
        return through, digest

    def _append(
        self,
        *,
        at_text: str,
        user_id: str | None,
        role: str,
        service: str,
        outcome: str,
        values: dict[str, object],
        kind: str,
        durable: bool = True,
    ) -> AuditRecord:
        index, prev = self._state.head
        unsigned = AuditRecord(
            index=index + 1,
            at=_parse_time(at_text),
            user_id=user_id,
            role=role,
            service=service,
            outcome=outcome,
            values=values,
            prev=prev,
            digest=_GENESIS,
            kind=kind,
        )
        record = replace(unsigned, digest=unsigned.computed_digest())
        line = (_canonical(record.to_json()) + "\n").encode()
        created = self._state.inode is None
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"audit log {self._path}: {exc.strerror or exc}") from exc
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
            if created:
                sync_directory(self._folder)
            stat = os.fstat(fd)
        except OSError as exc:
            # Not acknowledged: take back what reached the file.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._state.size)
            raise ConfigurationError(
                f"audit log {self._path}: cannot write record {record.index}: {exc.strerror or exc}"
            ) from exc
        finally:
            os.close(fd)
        self._state.records.append(record)
        self._state.inode, self._state.size = stat.st_ino, stat.st_size
        self._state.lines += 1
        return record

    def _seal(self, signer: Signer, key_id: bytes, at_text: str) -> AuditRecord | None:
        if len(key_id) != 8:
            raise InvalidInput(f"audit key id is {len(key_id)} bytes, expected 8")
        records = self._state.records
        if records and records[-1].kind == "seal":
            return None
        through, head = self._state.head
        signature = signer(seal_message(head, through, at_text))
        if len(signature) not in _SIGNATURE_BYTES.values():
            raise InvalidInput(
                f"audit signer returned {len(signature)} bytes, expected an ECDSA r||s of 64 "
                "or an RSA-2048 signature of 256"
            )
        values: dict[str, object] = {
            "through": through,
            "head": head.hex(),
            "key_id": key_id.hex(),
            "signature": signature.hex(),
        }
        return self._append(
            at_text=at_text,
            user_id=None,
            role="no-role",
            service=SEAL_SERVICE,
            outcome="ok",
            values=values,
            kind="seal",
        )

    def _store(self, path: Path, data: bytes) -> None:
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _document(
    kind: str,
    at_text: str,
    key_id: bytes,
    anchor: tuple[int, bytes] | None,
    records: Sequence[AuditRecord],
) -> bytes:
    """An export or archive file: valid JSON, one record per line for readers and diffs."""
    head = {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "written_at": at_text,
        "key_id": key_id.hex(),
        "anchor": None if anchor is None else {"index": anchor[0], "digest": anchor[1].hex()},
    }
    lines = [f" {json.dumps(k)}: {_canonical(v)}," for k, v in head.items()]
    body = ",\n".join(f"  {_canonical(r.to_json())}" for r in records)
    text = (
        "{\n" + "\n".join(lines) + '\n "records": [\n' + body + ("\n" if body else "") + " ]\n}\n"
    )
    return text.encode("ascii")


def _write_output(path: Path, data: bytes, overwrite: bool) -> None:
    """An export or archive file; unless ``overwrite``, never over an existing file."""
    try:
        write_atomically(path, data, overwrite=overwrite)
    except FileExistsError:
        raise InvalidInput(f"{path} exists already: choose a new archive file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot write: {exc.strerror or exc}") from exc


# -- offline verification ----------------------------------------------------------
