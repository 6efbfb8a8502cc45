"""The token's wrapping layer on SoftHSM2: the refusal under an untrusted key, the trusted
wrap, unwrap with key check values, and the key types this token cannot wrap."""

from __future__ import annotations

import os

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from meter.cli import provision
from meter.cli.home import Home
from meter.errors import ConfigurationError, TokenError
from meter.psd.firmware import PSD
from meter.psd.firmware_core import AUDIT_KEY_LABEL
from meter.psd.register_store import MAC_KEY_LABEL
from meter.token import KeyAlgorithm, Token
from meter.token import wrapping as w
from tests.conftest import TEST_METER_PINS, TEST_PASSWORDS, open_meter_token

SIGNING = "indicium-signing"


def _untrusted_aes(token: Token, label: str) -> None:
    """An AES key a user session can make: CKA_WRAP, but not CKA_TRUSTED (only the SO can)."""
    with token._call("create untrusted AES key") as s:
        s.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: os.urandom(32),
                Attribute.TOKEN: False,
                Attribute.PRIVATE: False,
                Attribute.WRAP: True,
                Attribute.LABEL: label,
            }
        )


# The three keys a ceremony moves (meter.psd.services_custody_formats.CEREMONY_KEYS).
MOVED: list[tuple[str, w.KeyClass]] = [
    (SIGNING, "private"),
    (MAC_KEY_LABEL, "secret"),
    (AUDIT_KEY_LABEL, "private"),
]


def _with_audit_key(home: Home) -> Home:
    """The audit key as the device makes it (Create Audit Key: the Security Officer)."""
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        psd.logon("security", TEST_PASSWORDS["METER_SO_PASSWORD"])
        psd.create_audit_key()
    return home


def test_meter_keys_are_extractable_only_under_a_trusted_key(provisioned: Home) -> None:
    with open_meter_token(_with_audit_key(provisioned)) as token:
        for label, kind in MOVED:
            key = w.describe_key(token, label, kind)
            assert (key.extractable, key.wrap_with_trusted, key.sensitive) == (True, True, True)


@pytest.mark.parametrize("label,kind", MOVED)
def test_the_token_refuses_to_wrap_under_an_untrusted_key(
    provisioned: Home, label: str, kind: w.KeyClass
) -> None:
    if label == AUDIT_KEY_LABEL:
        _with_audit_key(provisioned)
    with open_meter_token(provisioned) as token:
        _untrusted_aes(token, "ceremony-transport-untrusted")
        key = w.describe_key(token, label, kind)
        with pytest.raises(TokenError, match=r"CKR_KEY_NOT_WRAPPABLE.*not CKA_TRUSTED"):
            w.wrap_key(token, "ceremony-transport-untrusted", key)


def test_trusted_wrap_unwrap_and_check_values(provisioned: Home) -> None:
    value = bytearray(os.urandom(32))
    pins = TEST_METER_PINS
    with open_meter_token(provisioned) as token:
        entries = []
        with w.trusted_wrapping_key(
            token, "ceremony-transport-t1", value, so_pin=pins["so_pin"], user_pin=pins["user_pin"]
        ) as label:
            assert token.login_state == "user"
            for name, kind in ((SIGNING, "private"), (MAC_KEY_LABEL, "secret")):
                entries.append(w.wrap_key(token, label, w.describe_key(token, name, kind)))  # type: ignore[arg-type]
        # The trusted key is gone once the block ends, and nothing else is left behind.
        assert w.sweep_transport_keys(token) == 0
        signing, mac = entries
        assert signing.public_spki == token.public_key_spki(SIGNING)
        assert mac.kcv == w.secret_kcv(token, MAC_KEY_LABEL)
        with w.unwrapping_key(token, "ceremony-transport-u1", value) as unwrap:
            w.unwrap_key(token, unwrap, signing, "restored-signing")
            w.unwrap_key(token, unwrap, mac, "restored-mac")
        assert signing.public_spki is not None
        w.import_public_key(token, "restored-signing", signing.public_spki)
        w.pairwise_check(token, "restored-signing", KeyAlgorithm.ECDSA_P256, signing.public_spki)
        assert w.secret_kcv(token, "restored-mac") == mac.kcv
        restored = w.describe_key(token, "restored-signing", "private")
        assert restored.wrap_with_trusted and restored.extractable and restored.sensitive
        # Another transport key: RFC 5649's check fails inside the token; nothing is made.
        other_key = bytearray(os.urandom(32))
        with (
            w.unwrapping_key(token, "ceremony-transport-u2", other_key) as other,
            pytest.raises(TokenError, match="does not unwrap"),
        ):
            w.unwrap_key(token, other, mac, "never-made")
        assert not token.has_key("never-made")
        # An altered blob, likewise.
        altered = w.WrappedKey(
            mac.label,
            mac.kind,
            mac.key_type,
            mac.wrapped[:-1] + bytes([mac.wrapped[-1] ^ 1]),
            mac.kcv,
            None,
        )
        with (
            w.unwrapping_key(token, "ceremony-transport-u3", value) as unwrap,
            pytest.raises(TokenError, match="does not unwrap"),
        ):
            w.unwrap_key(token, unwrap, altered, "never-made")
        w.rename_key(token, "restored-mac", "renamed-mac", "secret")
        assert w.secret_kcv(token, "renamed-mac") == mac.kcv


def test_pairwise_check_fails_against_another_public_key(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        token.generate_signing_keypair("other", KeyAlgorithm.ECDSA_P256)
        with pytest.raises(TokenError, match="pairwise"):
            w.pairwise_check(
                token, SIGNING, KeyAlgorithm.ECDSA_P256, token.public_key_spki("other")
            )


def test_ed25519_keys_are_not_exportable_and_the_export_refuses_them(home: Home) -> None:
    provision.init_home(
        home,
        provision.InitOptions(device_serial=983973031310, algorithm=KeyAlgorithm.ED25519),
        meter_pins=TEST_METER_PINS,
    )
    with open_meter_token(home) as token:
        key = w.describe_key(token, SIGNING, "private")
        assert key.key_type == "ed25519" and not key.extractable
        with pytest.raises(
            ConfigurationError, match="Ed25519 private key, which this token cannot wrap"
        ):
            w.require_wrappable(token, key)
        # The register MAC key of that meter is still exportable.
        assert w.describe_key(token, MAC_KEY_LABEL, "secret").extractable


def test_a_non_extractable_key_is_refused(provisioned: Home) -> None:
    with open_meter_token(provisioned) as token:
        token.generate_signing_keypair("fixed", KeyAlgorithm.ECDSA_P256)  # exportable=False
        key = w.describe_key(token, "fixed", "private")
        with pytest.raises(ConfigurationError, match="non-extractable"):
            w.require_wrappable(token, key)
