"""Where the trusted transport key lives on SoftHSM2: a public *session* object, never in
the token's store. SoftHSM2 encrypts only private objects' values, and only the SO may
make a CKA_TRUSTED key, as a public object: had it been a token object, its 32 bytes
would have lain in the store's object file in clear until destroyed (and in freed disk
blocks after). These tests read every file of the store while the key exists, and after
the process holding it is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from pathlib import Path

from pkcs11 import Attribute, KeyType, ObjectClass

from meter.cli.home import Home
from meter.psd.register_store import MAC_KEY_LABEL
from meter.token import wrapping as w
from tests.conftest import TEST_METER_PINS, open_meter_token

LABEL = "ceremony-transport-storage"


def _files_holding(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def _transport_objects(home: Home) -> list[dict[str, object]]:
    """Every secret-key object under the transport prefix that a fresh session can see."""
    with open_meter_token(home) as token, token._call("list transport keys") as s:
        return [
            {"label": o[Attribute.LABEL], "token": o[Attribute.TOKEN]}
            for o in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
            if str(o[Attribute.LABEL]).startswith(w.TRANSPORT_LABEL_PREFIX)
        ]


def test_the_trusted_key_is_a_session_object_and_never_reaches_the_store(
    provisioned: Home,
) -> None:
    value = bytearray(os.urandom(32))
    secret = bytes(value)
    pins = TEST_METER_PINS
    store = provisioned.path / "tokens"
    with open_meter_token(provisioned) as token:
        with w.trusted_wrapping_key(
            token, LABEL, value, so_pin=pins["so_pin"], user_pin=pins["user_pin"]
        ) as label:
            with token._call("inspect the transport key") as s:
                (key,) = list(
                    s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
                )
                assert key[Attribute.TRUSTED] and key[Attribute.WRAP]
                assert not key[Attribute.TOKEN] and not key[Attribute.EXTRACTABLE]
                assert key[Attribute.KEY_TYPE] == KeyType.AES
            # The wrap works under it, and at that moment no file holds its value.
            wrapped = w.wrap_key(token, label, w.describe_key(token, MAC_KEY_LABEL, "secret"))
            assert wrapped.wrapped and _files_holding(store, secret) == []
        assert token.login_state == "user"
    assert _transport_objects(provisioned) == []
    assert _files_holding(store, secret) == []


def test_a_public_token_object_under_the_label_is_never_the_wrapping_key(
    provisioned: Home,
) -> None:
    """Anyone may make a public token object without a PIN: one planted under the
    transport key's label must not be chosen (nor make the ceremony wrap under it)."""
    value = bytearray(os.urandom(32))
    pins = TEST_METER_PINS
    with open_meter_token(provisioned) as token:
        with token._call("plant a public token key") as s:
            s.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: os.urandom(32),
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.WRAP: True,
                    Attribute.LABEL: LABEL,
                }
            )
        with w.trusted_wrapping_key(
            token, LABEL, value, so_pin=pins["so_pin"], user_pin=pins["user_pin"]
        ) as label:
            entry = w.wrap_key(token, label, w.describe_key(token, MAC_KEY_LABEL, "secret"))
        with w.unwrapping_key(token, "ceremony-transport-check", value) as unwrap:
            w.unwrap_key(token, unwrap, entry, "restored-mac")  # it was wrapped under ours
        assert w.secret_kcv(token, "restored-mac") == entry.kcv
        assert w.sweep_transport_keys(token) == 1  # the planted one


def _hold_the_key_then_wait(home_path: str, secret: bytes, ready: Connection) -> None:
    home = Home.at(Path(home_path))
    pins = TEST_METER_PINS
    with (
        open_meter_token(home) as token,
        w.trusted_wrapping_key(
            token, LABEL, bytearray(secret), so_pin=pins["so_pin"], user_pin=pins["user_pin"]
        ),
    ):
        ready.send("holding")
        signal.pause()  # until the parent's SIGKILL


def test_a_process_killed_while_holding_the_key_leaves_nothing(provisioned: Home) -> None:
    secret = os.urandom(32)
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_hold_the_key_then_wait, args=(str(provisioned.path), secret, child)
    )
    process.start()
    try:
        assert parent.poll(60), "the child never made the transport key"
        assert parent.recv() == "holding"
        assert _files_holding(provisioned.path / "tokens", secret) == []
    finally:
        process.kill()
        process.join(10)
    assert process.exitcode == -signal.SIGKILL
    # No left-over for the next logon to sweep: the token never stored it.
    assert _transport_objects(provisioned) == []
    assert _files_holding(provisioned.path / "tokens", secret) == []
