"""A share as a passphrase-sealed file, for a custodian without a card.

The file is JSON (format ``meter-custody-sealed-share/1``)::

    {"format": "meter-custody-sealed-share/1",
     "kdf": {"name": "scrypt", "log2_n": 17, "r": 8, "p": 1, "salt": "<16 bytes, base64>"},
     "cipher": "AES-256-GCM", "nonce": "<12 bytes, base64>",
     "share": {"ceremony": ..., "group": ..., "group_index": ..., "member": ...,
               "members": ..., "check": "<hex>", "fingerprint": "<hex>"},
     "ciphertext": "<base64>"}

The key is scrypt(passphrase as NFC UTF-8, salt, n=2**log2_n, r, p), 32 bytes; the
plaintext is the share's binary record (`CustodyShare.to_record`); the associated data is
every field but ``ciphertext``, as canonical JSON (sorted keys, no spaces), so that the
metadata a custodian can read without the passphrase cannot be altered unnoticed. scrypt
at n=2**17, r=8 (128 MiB, about half a second) makes each guess at a stolen file's
passphrase costly; a file asking for less than 2**14 or more than 2**20 is refused, so a
doctored file can neither weaken the key nor exhaust memory.

Files are written atomically with mode 0600 and never overwrite an existing file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import unicodedata
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from meter.custody.shares import CustodyShare
from meter.durable import write_atomically
from meter.errors import CustodyError

__all__ = ["FORMAT", "MIN_PASSPHRASE", "SCRYPT_LOG2_N", "open_sealed", "seal", "unseal"]

FORMAT = "meter-custody-sealed-share/1"
SCRYPT_LOG2_N = 17
SCRYPT_R = 8
SCRYPT_P = 1
_LOG2_N_ACCEPTED = range(14, 21)
MIN_PASSPHRASE = 12  # characters: the file may be copied and attacked offline
_SALT = 16
_NONCE = 12
_MAX_FILE = 64 * 1024  # a sealed share is well under 2 KiB: anything larger is not one


def seal(share: CustodyShare, path: Path, passphrase: str, *, log2_n: int = SCRYPT_LOG2_N) -> None:
    """Write ``share`` sealed under ``passphrase`` to a new file ``path`` (mode 0600)."""
    path = Path(path)
    if len(passphrase) < MIN_PASSPHRASE:
        raise CustodyError(
            f"a sealing passphrase has at least {MIN_PASSPHRASE} characters; this one has {len(passphrase)}"
        )
    if log2_n not in _LOG2_N_ACCEPTED:
        raise CustodyError(f"scrypt log2_n {log2_n} is outside {_range(_LOG2_N_ACCEPTED)}")
    if path.exists():
        raise CustodyError(f"{path} already exists: a share file is never overwritten")
    header: dict[str, Any] = {
        "format": FORMAT,
        "kdf": {
            "name": "scrypt",
            "log2_n": log2_n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": _b64(os.urandom(_SALT)),
        },
        "cipher": "AES-256-GCM",
        "nonce": _b64(os.urandom(_NONCE)),
        "share": _metadata(share),
    }
    key = _derive(passphrase, header["kdf"])
    ciphertext = AESGCM(key).encrypt(
        base64.b64decode(header["nonce"]), share.to_record(), _associated(header)
    )
    document = {**header, "ciphertext": _b64(ciphertext)}
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    try:
        write_atomically(path, data, overwrite=False, mode=0o600)
    except FileExistsError:
        raise CustodyError(f"{path} already exists: a share file is never overwritten") from None
    except OSError as exc:
        raise CustodyError(f"cannot write the sealed share {path}: {exc.strerror}") from None


def open_sealed(path: Path) -> dict[str, Any]:
    """The file's clear metadata (ceremony, group, member, fingerprint) without the passphrase."""
    return dict(_read(Path(path))["share"])


def unseal(path: Path, passphrase: str) -> CustodyShare:
    """The share sealed in ``path``; CustodyError if wrong passphrase, altered or truncated."""
    path = Path(path)
    document = _read(path)
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    try:
        nonce = base64.b64decode(document["nonce"], validate=True)
        ciphertext = base64.b64decode(document["ciphertext"], validate=True)
    except (binascii.Error, TypeError):
        raise CustodyError(f"{path} is damaged: a base64 field does not decode") from None
    key = _derive(passphrase, header["kdf"], path)
    try:
        record = AESGCM(key).decrypt(nonce, ciphertext, _associated(header))
    except (InvalidTag, ValueError):
        raise CustodyError(
            f"cannot open the sealed share {path}: wrong passphrase, or the file was altered"
        ) from None
    share = CustodyShare.from_record(record, f"the sealed share {path}")
    if _metadata(share) != header["share"]:  # cannot differ unless sealed by other code: say so
        raise CustodyError(f"{path}: its clear metadata does not describe the share inside")
    return share


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise CustodyError(f"no sealed share at {path}") from None
    except OSError as exc:
        raise CustodyError(f"cannot read the sealed share {path}: {exc.strerror}") from None
    if len(data) > _MAX_FILE:
        raise CustodyError(f"{path} is larger than any sealed share: not one")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CustodyError(f"{path} is truncated or not a sealed share file (no JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise CustodyError(
            f"{path} is not a sealed share file of format {FORMAT} (found {found!r})"
        )
    fields = {"kdf", "cipher", "nonce", "share", "ciphertext"}
    if not fields <= document.keys() or not isinstance(document["kdf"], dict):
        missing = sorted(fields - document.keys())
        raise CustodyError(f"{path} is truncated or damaged: it lacks {missing or ['a valid kdf']}")
    if document["cipher"] != "AES-256-GCM":
        raise CustodyError(f"{path} names cipher {document['cipher']!r}; only AES-256-GCM is read")
    return document


def _derive(passphrase: str, kdf: dict[str, Any], path: Path | None = None) -> bytes:
    where = f"{path}: " if path else ""
    try:
        name, log2_n, r, p = kdf["name"], kdf["log2_n"], kdf["r"], kdf["p"]
        salt = base64.b64decode(kdf["salt"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise CustodyError(f"{where}its kdf parameters are damaged") from None
    if name != "scrypt" or log2_n not in _LOG2_N_ACCEPTED or (r, p) != (SCRYPT_R, SCRYPT_P):
        raise CustodyError(
            f"{where}kdf {name!r} n=2**{log2_n} r={r} p={p} is refused: only scrypt with "
            f"log2_n in {_range(_LOG2_N_ACCEPTED)}, r={SCRYPT_R}, p={SCRYPT_P} is read"
        )
    if len(salt) != _SALT:
        raise CustodyError(f"{where}its salt is {len(salt)} bytes, not {_SALT}")
    secret = unicodedata.normalize("NFC", passphrase).encode()
    return Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(secret)


def _metadata(share: CustodyShare) -> dict[str, Any]:
    return {
        "ceremony": share.ceremony,
        "group": share.group,
        "group_index": share.group_index,
        "member": share.member,
        "members": share.members,
        "check": share.check.hex(),
        "fingerprint": share.fingerprint,
    }


def _associated(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _range(values: range) -> str:
    return f"{values.start}..{values.stop - 1}"
