"""No public object decides anything: a hostile local user with the token library, no PIN.

OpenSC's pkcs11-tool, a PKCS#11 client independent of this project, opens the
meter's token without logging in, as anybody who can load libsofthsm2.so over
the home's token files could. It lists what it sees (nothing of the device's),
deletes what it can (nothing of the device's), and writes public objects under
the device's labels and applications: forged device states, forged registers
with a huge descending register, a rogue certificate chain, public keys and
secret keys it knows. The device, restarted over them, must behave exactly as
before or refuse clearly, and never undo a withdrawal, reactivate a
deactivated key or accept a grant that chains to another root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.errors import DeviceLocked, ProtocolError
from meter.host import DeviceClient
from meter.indicium import Indicium, RateCategory, verify_signature
from meter.protocol.credit import CreditGrant, CreditRequest, verify_provider_certificate
from meter.protocol.issue import IssueRequest
from meter.psd.device_state import DeviceState
from meter.psd.registers import Registers
from meter.token.softhsm import conf_path
from tests.conftest import (
    ROLE_USERS,
    SOFTHSM_MODULE,
    local_grant,
    open_meter_token,
    require_service,
)

pytestmark = [pytest.mark.softhsm]

# What the device keeps in its token (all private): data objects by application,
# key objects by label and class.
APPLICATIONS = ("meter.registers", "meter.state", "meter.identity", "meter.certificate")
CERT_LABELS = ("meter", "provider", "postal-root")
KEY_LABELS = ("indicium-signing", "register-mac", "audit-signing", "key-exchange")
DEVICE_KEYS = (
    ("privkey", "indicium-signing"),
    ("pubkey", "indicium-signing"),
    ("secrkey", "register-mac"),
    ("privkey", "audit-signing"),
    ("pubkey", "audit-signing"),
    ("privkey", "key-exchange"),
    ("pubkey", "key-exchange"),
)
OBJECT_TYPES = ("cert", "privkey", "pubkey", "secrkey", "data")
FORGED_GENERATIONS = range(1, 9)  # the device's records here are at generations 3 to 7
HUGE = 2**40 - 1  # the largest register PIM-1 carries
ROGUE_CUSTOMER = "mallory"
ADDRESS = ["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"]
POSTAGE = 730

PIECE = IssueRequest(
    postage=POSTAGE,
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="62704",
    destination_plus4="1234",
    delivery_point="23",
    address=ADDRESS,
)


# -- pkcs11-tool: the independent client, never logged in ---------------------------


@dataclass(frozen=True)
class Seen:
    """One object as ``pkcs11-tool --list-objects`` prints it."""

    kind: str  # cert, privkey, pubkey, secrkey, data (or the header when unknown)
    label: str | None
    application: str | None
    id: str | None


_HEADERS = (
    ("Data object", "data"),
    ("Certificate Object", "cert"),
    ("Private Key Object", "privkey"),
    ("Public Key Object", "pubkey"),
    ("Secret Key Object", "secrkey"),
)


def _parse_objects(text: str) -> list[Seen]:
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            kind = next((k for h, k in _HEADERS if line.startswith(h)), line.strip())
            blocks.append({"kind": kind})
            continue
        if not blocks:
            continue
        name, sep, value = line.strip().partition(":")
        if sep and name in ("label", "application", "ID"):
            blocks[-1][name] = value.strip().strip("'")
    return [Seen(b["kind"], b.get("label"), b.get("application"), b.get("ID")) for b in blocks]


class Pkcs11Tool:
    """OpenSC's pkcs11-tool on one home's meter token, without --login and without a PIN."""

    def __init__(self, home: Home, scratch: Path) -> None:
        conf = conf_path(home.profile, home.path)
        assert conf is not None and conf.exists(), "the home has no softhsm2.conf"
        self.env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        self.base = ["pkcs11-tool", "--module", SOFTHSM_MODULE]
        self.base += ["--token-label", home.token_label("meter")]
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self._files = 0

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if ok:
            assert done.returncode == 0, f"pkcs11-tool {' '.join(args)}: {done.stderr}"
        return done

    def objects(self, kind: str | None = None) -> list[Seen]:
        args = ["--list-objects"] + (["--type", kind] if kind else [])
        return _parse_objects(self.run(*args).stdout)

    def everything_visible(self) -> list[Seen]:
        """Every object a public session sees; each ``--type`` listing agrees with it."""
        seen = self.objects()
        for kind in OBJECT_TYPES:
            assert sorted(self.objects(kind), key=repr) == sorted(
                (o for o in seen if o.kind == kind), key=repr
            ), kind
        return seen

    def file(self, content: bytes) -> Path:
        self._files += 1
        path = self.scratch / f"object-{self._files}.bin"
        path.write_bytes(content)
        return path

    def write_data(self, application: str, label: str, value: bytes) -> None:
        self.run(
            "--write-object",
            str(self.file(value)),
            "--type",
            "data",
            "--application-label",
            application,
            "--label",
            label,
        )

    def write(self, kind: str, label: str, value: bytes, *extra: str) -> None:
        """A key or certificate object, with the label and CKA_ID (the label) the device uses."""
        path = str(self.file(value))
        self.run(
            "--write-object",
            path,
            "--type",
            kind,
            "--label",
            label,
            *extra,
            "--id",
            label.encode().hex(),
        )

    def delete(self, obj: Seen) -> None:
        args = ["--delete-object", "--type", obj.kind]
        if obj.label is not None:
            args += ["--label", obj.label]
        if obj.application is not None:
            args += ["--application-label", obj.application]
        if obj.id is not None:
            args += ["--id", obj.id]
        self.run(*args)


def pkcs11_tool(home: Home, scratch: Path) -> Pkcs11Tool:
    require_service(shutil.which("pkcs11-tool") is not None, "OpenSC's pkcs11-tool")
    return Pkcs11Tool(home, scratch)


def device_objects(seen: list[Seen]) -> list[Seen]:
    """The listed objects that carry one of the device's labels or applications."""
    labels = {*KEY_LABELS, *CERT_LABELS, "identity"}
    return [
        o
        for o in seen
        if o.application in APPLICATIONS
        or o.label in labels
        or (o.label or "").startswith(("state-", "registers-"))
    ]


def delete_everything_visible(tool: Pkcs11Tool) -> list[Seen]:
    """What a hostile user does first: delete every object a public session can see."""
    deleted: list[Seen] = []
    for _ in range(200):
        visible = tool.everything_visible()
        if not visible:
            return deleted
        tool.delete(visible[0])
        deleted.append(visible[0])
    pytest.fail(f"pkcs11-tool could not delete the public objects {tool.everything_visible()}")


# -- the attacker's own postal root, provider and meter key (software keys) -----------


@dataclass(frozen=True)
class Rogue:
    root: x509.Certificate
    provider: x509.Certificate
    meter: x509.Certificate
    provider_key: ec.EllipticCurvePrivateKey
    meter_key: ec.EllipticCurvePrivateKey
    mac_key: bytes  # the "register-mac" value the attacker writes, to MAC forged records

    def mac(self, body: bytes) -> bytes:
        return hmac.new(self.mac_key, body, hashlib.sha256).digest()

    def sign_grant(self, request: CreditRequest, amount: int) -> CreditGrant:
        grant = CreditGrant(
            request.authorization_id,
            request.device_serial,
            request.nonce,
            secrets.token_bytes(16),
            amount,
            datetime.now(UTC).replace(microsecond=0),
        )
        der = self.provider_key.sign(grant.signed_part(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return dataclasses.replace(grant, signature=r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def make_rogue(home: Home) -> Rogue:
    """A chain with the real chain's names (read from the home's public PEM exports) and the
    attacker's keys: only the keys tell it from the real one."""

    def real(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((home.certs / f"{name}.pem").read_bytes())

    real_root, real_provider, real_meter = real("postal-root"), real("provider"), real("meter")
    root_key, provider_key, meter_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    root = _certificate(
        real_root.subject, real_root.subject, root_key.public_key(), root_key, ca=True
    )
    provider = _certificate(
        real_provider.subject, root.subject, provider_key.public_key(), root_key, ca=True
    )
    meter = _certificate(
        real_meter.subject, provider.subject, meter_key.public_key(), provider_key, ca=False
    )
    # The rogue chain is well formed: only its root is not the device's.
    verify_provider_certificate(provider, root, datetime.now(UTC))
    meter.verify_directly_issued_by(provider)
    return Rogue(root, provider, meter, provider_key, meter_key, secrets.token_bytes(32))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tamper(tool: Pkcs11Tool, rogue: Rogue, device_serial: int, authorization_id: int) -> None:
    """List, delete, and forge every record of the device as public objects; check the
    forgeries are there."""
    # 1. Nothing of the device's is visible, by any listing.
    visible = tool.everything_visible()
    assert device_objects(visible) == []
    assert visible == []  # a device home holds no public object at all
    # Nor can the device's objects be deleted blindly, by label or application.
    for kind, label in DEVICE_KEYS:
        done = tool.run("--delete-object", "--type", kind, "--label", label, ok=False)
        assert done.returncode != 0 and "object not found" in done.stderr, (kind, label)
    for application in APPLICATIONS:
        done = tool.run(
            "--delete-object", "--type", "data", "--application-label", application, ok=False
        )
        assert done.returncode != 0 and "object not found" in done.stderr, application

    # 2. Delete every public object there is (none), then write the forgeries.
    assert delete_everything_visible(tool) == []
    root_digest = hashlib.sha256(_der(rogue.root)).digest()
    for generation in FORGED_GENERATIONS:
        state = DeviceState(
            generation=generation,
            customer=ROGUE_CUSTOMER,
            administration_authorized=True,
            signing_key_active=True,
            withdrawn_at=None,
        )
        tool.write_data(
            "meter.state", f"state-{generation}", state.body() + rogue.mac(state.body())
        )
    for generation in [*FORGED_GENERATIONS, 1_000_000]:
        registers = Registers(
            device_serial,
            generation,
            ascending=0,
            descending=HUGE,
            control_total=HUGE,
            sequence=0,
            state_generation=min(generation, max(FORGED_GENERATIONS)),
            root_digest=root_digest,
        )
        body = registers.body()
        tool.write_data("meter.registers", f"registers-{generation}", body + rogue.mac(body))
    identity = {
        "device_serial": device_serial,
        "vendor_model": "EVIL",
        "authorization_id": authorization_id,
        "algorithm": "ecdsa-p256",
        "software_id": 6666,
    }
    tool.write_data("meter.identity", "identity", json.dumps(identity).encode())
    chain = dict(zip(CERT_LABELS, (rogue.meter, rogue.provider, rogue.root), strict=True))
    for label, cert in chain.items():
        tool.write_data("meter.certificate", label, _der(cert))
        tool.write("cert", label, _der(cert))
    for label in ("indicium-signing", "audit-signing", "key-exchange"):
        tool.write("pubkey", label, _spki(rogue.meter_key))
    tool.write("secrkey", "register-mac", rogue.mac_key, "--key-type", "AES:32")
    tool.run("--keygen", "--key-type", "GENERIC:32", "--label", "register-mac")
    # A private key the attacker knows: pkcs11-tool makes key objects CKA_PRIVATE, which a
    # public session may not create. Should a later version manage, the device must ignore
    # that one too, so it is only required to be listed then.
    pkcs8 = rogue.meter_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    done = tool.run(
        "--write-object",
        str(tool.file(pkcs8)),
        "--type",
        "privkey",
        "--label",
        "indicium-signing",
        ok=False,
    )
    private_key_written = done.returncode == 0
    if not private_key_written:
        assert "CKR_USER_NOT_LOGGED_IN" in done.stderr, done.stderr

    # The writes happened: pkcs11-tool lists every forgery.
    seen = tool.everything_visible()
    data = {(o.application, o.label) for o in seen if o.kind == "data"}
    expected = {("meter.state", f"state-{g}") for g in FORGED_GENERATIONS}
    expected |= {("meter.registers", f"registers-{g}") for g in [*FORGED_GENERATIONS, 1_000_000]}
    expected |= {("meter.identity", "identity")}
    expected |= {("meter.certificate", label) for label in CERT_LABELS}
    assert data == expected
    assert len(tool.objects("data")) == len(expected)
    keys = sorted((o.kind, o.label) for o in seen if o.kind != "data")
    assert keys == sorted(
        [("cert", label) for label in CERT_LABELS]
        + [("pubkey", label) for label in ("indicium-signing", "audit-signing", "key-exchange")]
        + [("secrkey", "register-mac")] * 2
        + ([("privkey", "indicium-signing")] if private_key_written else [])
    )


# -- the device -----------------------------------------------------------------------


@contextmanager
def logged_on(home: Home, role: str) -> Iterator[DeviceClient]:
    user_id, password = ROLE_USERS[role]
    with DeviceClient(home.socket) as client:
        client.logon(user_id, password)
        yield client  # the session ends with the connection (not every role may Logoff)


def status(home: Home, role: str = "provider") -> dict[str, Any]:
    with logged_on(home, role) as client:
        answer: dict[str, Any] = client.get("/v1/status")
    return answer


def private_records(home: Home) -> dict[str, Any]:
    """The device's own objects, read with the lab's PIN while no device runs."""
    with open_meter_token(home) as token:
        records: dict[str, Any] = {
            application: sorted(
                (o.label, hashlib.sha256(o.value).hexdigest())
                for o in token.data_objects(application)
            )
            for application in APPLICATIONS
        }
        records["keys"] = {label: token.has_key(label) for label in KEY_LABELS}
        records["indicium-signing"] = (  # a withdrawal destroys the key pair
            token.public_key_spki("indicium-signing")
            if records["keys"]["indicium-signing"]
            else None
        )
    return records


def tampered(home: Home, scratch: Path, rogue: Rogue, serial: int, auth_id: int) -> None:
    """Tamper while no device runs, checking the device's private objects stay as they were."""
    before = private_records(home)
    counts = {app: len(before[app]) for app in APPLICATIONS}
    assert counts["meter.identity"] == 1 and counts["meter.state"] == 1
    assert counts["meter.certificate"] == 3 and counts["meter.registers"] >= 1
    # A set-up device has no key-exchange key yet (Key Exchange makes it); a withdrawn one
    # keeps only its register MAC key.
    assert before["keys"] in (
        {**dict.fromkeys(KEY_LABELS, True), "key-exchange": False},
        {**dict.fromkeys(KEY_LABELS, False), "register-mac": True},
    )
    tamper(pkcs11_tool(home, scratch), rogue, serial, auth_id)
    assert private_records(home) == before


def identity_of(home: Home) -> tuple[int, int]:
    """The device serial and authorization id, from the public meter certificate."""
    cert = x509.load_pem_x509_certificate((home.certs / "meter.pem").read_bytes())
    provider = x509.load_pem_x509_certificate((home.certs / "provider.pem").read_bytes())

    def number(c: x509.Certificate) -> int:
        return int(str(c.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value))

    return number(cert), number(provider)


def assert_real_signature(home: Home, indicium: Indicium) -> None:
    cert = x509.load_pem_x509_certificate((home.certs / "meter.pem").read_bytes())
    verify_signature(
        indicium.algorithm, cert.public_key(), indicium.signed_part(), indicium.signature
    )


# -- the scenarios ----------------------------------------------------------------


def test_normal_operation_continues_exactly_over_forged_public_objects(
    device_home: Home, tmp_path: Path
) -> None:
    home = device_home
    rogue = make_rogue(home)
    serial, auth_id = identity_of(home)
    with running_device(home), logged_on(home, "customer") as client:
        first = client.issue(PIECE)
        before = client.get("/v1/status")
    assert before["module_state"] == "authorized"

    tampered(home, tmp_path / "tool", rogue, serial, auth_id)

    with running_device(home):
        with logged_on(home, "customer") as client:
            second = client.issue(PIECE)
            after = client.get("/v1/status")
        with logged_on(home, "provider") as client:
            provider_view = client.get("/v1/status")
    assert after["module_state"] == "authorized" and after["error"] is None
    assert after["state_verified"] is True
    assert after["customer"] == before["customer"] != ROGUE_CUSTOMER
    assert after["keys"]["indicium-signing"]["state"] == "active"
    # The same key, the same identity, and the registers go on from the last piece.
    assert second.key_id == first.key_id
    assert (second.vendor_model, second.software_id) == (first.vendor_model, first.software_id)
    assert second.device_serial == first.device_serial == serial
    assert second.sequence == first.sequence + 1
    assert second.ascending == first.ascending + POSTAGE
    assert second.descending == first.descending - POSTAGE
    assert_real_signature(home, second)
    assert provider_view["registers"] == {
        "ascending": second.ascending,
        "descending": second.descending,
        "control_total": before["registers"]["control_total"],
        "piece_count": second.sequence,
    }
    # The forgeries were there all along: the device ran over them, it did not clean them up.
    tool = pkcs11_tool(home, tmp_path / "tool")
    assert len(device_objects(tool.everything_visible())) >= len(FORGED_GENERATIONS) * 2


def test_a_deactivated_signing_key_stays_deactivated(device_home: Home, tmp_path: Path) -> None:
    home = device_home
    rogue = make_rogue(home)
    serial, auth_id = identity_of(home)
    with running_device(home):
        with logged_on(home, "security-officer") as client:
            keys = client.post("/v1/keys", {"action": "deactivate-signing-key"})["keys"]
        assert keys["indicium-signing"]["state"] == "inactive"
        before = status(home)

    tampered(home, tmp_path / "tool", rogue, serial, auth_id)  # states saying "active"

    with running_device(home):
        with logged_on(home, "customer") as client:
            with pytest.raises(DeviceLocked, match="signing key is deactivated"):
                client.issue(PIECE)
            answer = client.get("/v1/status")
        after = status(home)
    assert answer["keys"]["indicium-signing"]["state"] == "inactive"
    assert answer["module_state"] == "authorized" and answer["customer"] != ROGUE_CUSTOMER
    assert after["registers"] == before["registers"]


def test_a_grant_chaining_to_a_rogue_root_is_refused(device_home: Home, tmp_path: Path) -> None:
    home = device_home
    rogue = make_rogue(home)
    serial, auth_id = identity_of(home)
    with running_device(home):
        before = status(home)

    tampered(home, tmp_path / "tool", rogue, serial, auth_id)  # the rogue chain, public

    with running_device(home), logged_on(home, "provider") as client:
        request = client.request_credit()
        grant = rogue.sign_grant(request, 50_000_000)
        grant.verify(rogue.provider)  # a good grant under the rogue chain
        with pytest.raises(ProtocolError, match="provider signature does not verify"):
            client.apply_credit(grant)
        refused = client.get("/v1/status")
        # The outstanding request still stands, and the real provider's grant is taken.
        client.apply_credit(local_grant(home, 1_000)(request))
        credited = client.get("/v1/status")
    assert (request.device_serial, request.authorization_id) == (serial, auth_id)
    assert refused["module_state"] == "authorized"
    assert refused["registers"] == before["registers"]
    registers = before["registers"]
    assert credited["registers"] == {
        **registers,
        "descending": registers["descending"] + 1_000,
        "control_total": registers["control_total"] + 1_000,
    }


def test_a_withdrawn_device_stays_withdrawn(device_home: Home, tmp_path: Path) -> None:
    from tests._audit_lab import withdraw_over_socket

    home = device_home
    rogue = make_rogue(home)
    serial, auth_id = identity_of(home)
    with running_device(home), logged_on(home, "provider") as client:
        withdrawn_at = withdraw_over_socket(client, home, tmp_path / "provider")["withdrawn_at"]
        before = client.get("/v1/status")
    assert before["module_state"] == "withdrawn"

    tampered(home, tmp_path / "tool", rogue, serial, auth_id)  # states not withdrawn

    with running_device(home):
        with logged_on(home, "customer") as client:
            answer = client.get("/v1/status")
            with pytest.raises(DeviceLocked, match="withdrawn"):
                client.issue(PIECE)
        after = status(home)
    assert answer["module_state"] == "withdrawn"
    assert answer["withdrawn_at"] == withdrawn_at
    assert answer["keys"]["indicium-signing"]["state"] == "inactive"
    assert after["registers"] == before["registers"]
