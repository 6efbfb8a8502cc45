"""Update PSC and postage from rates on a real SoftHSM2 meter.

The provider's code-signing key lives in the provider's token, certified by the postal
root in its own token; the device verifies and installs bundles, prices pieces from
the installed table, and prints the bundle's software id in every indicium.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meter.cli.home import Home
from meter.cli.main import cli
from meter.cli.postoffice_cli import verify_label_image
from meter.errors import AccessDenied, DeviceLocked, InvalidInput, MeterError
from meter.indicium import RateCategory, decode
from meter.pki.codesign import make_code_signing_certificate
from meter.protocol.issue import IssueRequest
from meter.protocol.update_bundle import BundleContents, UpdateBundle
from meter.protocol.watchdog import WatchdogThresholds
from meter.provider import PostalRoot, Provider
from meter.provider.code_signing import CodeSigner, certify_code_signing
from meter.psd.firmware import PSD
from meter.psd.psc_store import BUNDLE_APPLICATION
from meter.rates import default_table
from tests.conftest import ROLE_USERS, open_meter_token
from tests.test_update_bundle import Key, Root

pytestmark = pytest.mark.softhsm

LETTER = IssueRequest(
    postage=None,
    weight="1oz",
    rate_category=RateCategory.FIRST_CLASS_LETTER,
    origin_zip="94043",
    destination_zip="62704",
    address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
)


def _certify(home: Home) -> None:
    """The lab's postal root certifies the provider's code-signing key (both tokens here)."""
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    with home.open_token("postal-root") as rtoken, home.open_token("provider") as ptoken:
        root = PostalRoot.open(rtoken)
        provider = Provider.open(ptoken, home.ledger)
        signer = CodeSigner(ptoken)
        cert = certify_code_signing(
            root, signer.public_key_spki(), provider.authorization_id, "Development Provider", now
        )
        signer.install_certificate(cert, root.certificate, now)


def _contents(version: str, software_id: int, **changes: Any) -> BundleContents:
    contents = BundleContents(
        software_id=software_id,
        vendor_model="PM01",
        version=version,
        issued_at=datetime.now(UTC).replace(microsecond=0),
        rates=default_table(),
        watchdog=WatchdogThresholds(60, 75),
    )
    return replace(contents, **changes)


def _signed(home: Home, version: str, software_id: int, **changes: Any) -> UpdateBundle:
    with home.open_token("provider") as token:
        return CodeSigner(token).sign(_contents(version, software_id, **changes))


def _logon(psd: PSD, role: str) -> None:
    psd.logon(*ROLE_USERS[role])


def _bundle_objects(home: Home) -> int:
    with open_meter_token(home) as token:
        return len(token.data_objects(BUNDLE_APPLICATION))


def _view(psd: PSD) -> dict[str, Any]:
    """What a refused install must not change (as a Security Officer sees it)."""
    status = psd.request_status()
    return {"psc": status["psc"], "registers": status["registers"]}


@pytest.fixture
def signed_home(device_home: Home) -> Home:
    _certify(device_home)
    return device_home


def test_install_then_status_and_every_indicium_show_it(signed_home: Home) -> None:
    home = signed_home
    bundle = _signed(home, "1.1.0", 101)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "security-officer")
        before = psd.request_status()["psc"]
        assert (before["version"], before["software_id"], before["bundle_sha256"]) == (
            "1.0.0",
            100,
            None,
        )
        result = psd.update_psc(bundle.to_bytes())
        assert (result["version"], result["software_id"]) == ("1.1.0", 101)
        assert result["bundle_sha256"] == bundle.sha256
        assert result["watchdog"] == {"warn_days": 60, "stop_days": 75}
        assert result["rate_table"] == default_table().name
        record = psd.audit.records()[-1]
        assert (record.service, record.outcome) == ("update-psc", "ok")
        assert record.values["bundle_sha256"] == bundle.sha256
        psd.logoff()
        _logon(psd, "customer")
        indicium = psd.create_indicium(LETTER)
    assert indicium.software_id == 101
    assert indicium.postage == 740  # the table's 1 oz First-Class Mail letter
    assert indicium.rate_category is RateCategory.FIRST_CLASS_LETTER
    assert _bundle_objects(home) == 1
    # After a restart the device reloads the bundle its state pins, and still prints its id.
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "customer")
        status = psd.request_status()["psc"]
        assert (status["version"], status["software_id"]) == ("1.1.0", 101)
        assert status["bundle_sha256"] == bundle.sha256
        two = psd.create_indicium(replace(LETTER, weight="1.5oz"))
    assert (two.software_id, two.postage) == (101, 1030)
    # A newer release replaces it: one bundle object stays, the newest.
    newer = _signed(home, "1.2.0", 102)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "security-officer")
        assert psd.update_psc(newer.to_bytes())["history"] == ["1.0.0", "1.1.0"]
    assert _bundle_objects(home) == 1


def _foreign_root_bundle(home: Home) -> bytes:
    """Signed by a code-signing key that another postal root (of the same name) certified."""
    root, key = Root("Postal Root (development)"), Key()
    now = datetime.now(UTC) - timedelta(minutes=1)
    cert = make_code_signing_certificate(
        key.spki, 60001, "Development Provider", root.certificate, root.key.sign, now
    )
    return _contents("1.1.0", 101).signed_by(key.sign, cert).to_bytes()


def _altered(bundle: UpdateBundle) -> bytes:
    document = json.loads(bundle.to_bytes())
    document["body"]["rates"]["categories"]["first-class-letter"]["prices"][0] = 10
    return json.dumps(document).encode()


def _unsigned(bundle: UpdateBundle) -> bytes:
    return json.dumps({"body": json.loads(bundle.to_bytes())["body"]}).encode()


def test_refusals_are_audited_and_change_nothing(signed_home: Home) -> None:
    home = signed_home
    installed = _signed(home, "1.1.0", 101)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "security-officer")
        psd.update_psc(installed.to_bytes())
        cases: list[tuple[bytes, str]] = [
            (_unsigned(installed), "not signed"),
            (_altered(installed), "signature does not verify"),
            (_foreign_root_bundle(home), "not issued by this device's postal root"),
            (_signed(home, "1.0.9", 102).to_bytes(), "not newer than the installed 1.1.0"),
            (installed.to_bytes(), "not newer than the installed 1.1.0"),  # a replay
            (_signed(home, "1.2.0", 101).to_bytes(), "software id 101 is not above"),
            (
                _signed(home, "1.2.0", 102, vendor_model="ZZ99").to_bytes(),
                "software for ZZ99 meters",
            ),
            (b"not a bundle", "not JSON"),
        ]
        for data, words in cases:
            before = _view(psd)
            records = len(psd.audit.records())
            with pytest.raises(MeterError) as caught:
                psd.update_psc(data)
            assert words in str(caught.value), (words, str(caught.value))
            record = psd.audit.records()[-1]
            assert len(psd.audit.records()) == records + 1
            assert (record.service, record.outcome) == ("update-psc", "failed")
            assert words in str(record.values["error"])
            assert _view(psd) == before, words
        psd.logoff()
        # Another role may not install at all; that is audited too.
        _logon(psd, "customer")
        newer = _signed(home, "1.2.0", 102).to_bytes()
        with pytest.raises(AccessDenied, match="Update PSC"):
            psd.update_psc(newer)
        record = psd.audit.records()[-1]
        assert (record.service, record.outcome) == ("update-psc", "denied")
        assert psd.create_indicium(LETTER).software_id == 101
    assert _bundle_objects(home) == 1


def test_postage_from_the_table_and_what_it_refuses(signed_home: Home) -> None:
    home = signed_home
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "customer")
        # No bundle yet: explicit postage only, and a weight is refused by name.
        with pytest.raises(InvalidInput, match="no rate table installed"):
            psd.create_indicium(LETTER)
        assert psd.create_indicium(replace(LETTER, postage=730, weight=None)).postage == 730
    with PSD.power_up(home.open_device_token(), home.device) as psd:  # a Customer cannot log off
        _logon(psd, "security-officer")
        psd.update_psc(_signed(home, "1.1.0", 101).to_bytes())
        psd.logoff()
        _logon(psd, "customer")
        zoned = default_table().categories[RateCategory.PRIORITY].zoned_prices
        assert zoned is not None
        priority = replace(
            LETTER, rate_category=RateCategory.PRIORITY, weight="2.2lb", origin_zip="62704"
        )
        piece = psd.create_indicium(replace(priority, destination_zip="94105"))
        assert (piece.postage, piece.rate_category) == (zoned[8][2], RateCategory.PRIORITY)
        assert psd.create_indicium(replace(LETTER, postage=1000)).postage == 1000  # above: ok
        before = psd.retrieve_psd_status()
        refused = [
            (replace(LETTER, rate_category=RateCategory.MEDIA), "media"),
            (replace(LETTER, weight="3.6oz"), "over the rate table's limit of 3.5 oz"),
            (replace(priority, weight="71lb"), "limit of 70 lb"),
            (replace(priority, origin_zip="30301"), "origin ZIP 30301 (prefix 303)"),
            (replace(LETTER, destination_zip="00123"), "prefix 001 is unassigned"),
            (replace(LETTER, postage=739), "below the rate table's 740 mills"),
            (replace(priority, postage=99_000), "does not allow an explicit postage"),
            (replace(LETTER, weight=None), "neither postage nor weight"),
            (replace(LETTER, weight="heavy"), "weight 'heavy'"),
        ]
        for request, words in refused:
            with pytest.raises(InvalidInput) as caught:
                psd.create_indicium(request)
            assert words in str(caught.value), (words, str(caught.value))
        with pytest.raises(InvalidInput, match=r"piece 2 of the batch: .*limit of 3\.5 oz"):
            psd.create_indicium_batch([LETTER, replace(LETTER, weight="4oz")])
        after = psd.retrieve_psd_status()
        for key in ("ascending", "descending", "piece_count"):
            assert after[key] == before[key], key
        batch = psd.create_indicium_batch(
            [LETTER, replace(LETTER, weight="13oz", rate_category=RateCategory.FIRST_CLASS_FLAT)]
        )
        flats = default_table().categories[RateCategory.FIRST_CLASS_FLAT].prices
        assert flats is not None and batch.postages == (740, flats[12])


def test_a_deleted_or_swapped_bundle_object_stops_the_device(signed_home: Home) -> None:
    home = signed_home
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "security-officer")
        psd.update_psc(_signed(home, "1.1.0", 101).to_bytes())
    other = _signed(home, "1.5.0", 150)
    with open_meter_token(home) as token:
        for obj in token.data_objects(BUNDLE_APPLICATION):
            token.destroy(obj)
        # Someone with the token's PIN puts another (validly signed!) bundle in its place.
        token.create_data(BUNDLE_APPLICATION, "bundle-x", other.to_bytes(), private=True)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "customer")
        assert psd.error is not None and "update bundle" in psd.error
        with pytest.raises(DeviceLocked):
            psd.create_indicium(replace(LETTER, postage=740, weight=None))


def test_an_interrupted_install_leaves_the_old_bundle(signed_home: Home) -> None:
    """A bundle object written but never pinned (a crash before the state commit) is
    removed at the next open, and the installed one stays."""
    home = signed_home
    first = _signed(home, "1.1.0", 101)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "security-officer")
        psd.update_psc(first.to_bytes())
    stray = _signed(home, "1.2.0", 102)
    with open_meter_token(home) as token:
        token.create_data(BUNDLE_APPLICATION, "bundle-stray", stray.to_bytes(), private=True)
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "customer")
        assert psd.error is None
        assert psd.request_status()["psc"]["bundle_sha256"] == first.sha256
        assert psd.create_indicium(LETTER).software_id == 101
    assert _bundle_objects(home) == 1


def test_a_revoked_device_issues_nothing(signed_home: Home) -> None:
    home = signed_home
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    bundle = _signed(home, "1.1.0", 101, revocations=((983973031309, past),))
    with PSD.power_up(home.open_device_token(), home.device) as psd:
        _logon(psd, "security-officer")
        psd.update_psc(bundle.to_bytes())
        psd.logoff()
        _logon(psd, "customer")
        before = psd.retrieve_psd_status()["piece_count"]
        with pytest.raises(DeviceLocked, match="revoked since"):
            psd.create_indicium(LETTER)
        assert psd.retrieve_psd_status()["piece_count"] == before


def _run(home: Path, *args: str, role: str | None = None, ok: bool = True) -> dict[str, Any]:
    user: list[str] = []
    env: dict[str, str] = {}
    if role is not None:
        user_id, password = ROLE_USERS[role]
        user, env = ["--user", user_id], {"METER_PASSWORD": password}
    result = CliRunner().invoke(cli, ["--home", str(home), "--json", *user, *args], obj={}, env=env)
    assert (result.exit_code == 0) is ok, result.output
    data: dict[str, Any] = json.loads(result.output.splitlines()[-1])
    return data


def test_the_cli_signs_installs_and_issues_by_weight_end_to_end(
    running: Home, tmp_path: Path
) -> None:
    home = running.path
    certified = _run(home, "provider", "code-signing-certificate")
    assert "code signing" in certified["subject"]
    bundle_path = tmp_path / "bundle-1.1.0.json"
    signed = _run(
        home,
        "provider",
        "sign-update",
        "--version",
        "1.1.0",
        "--software-id",
        "101",
        "--watchdog-warn",
        "90",
        "--watchdog-stop",
        "120",
        "-o",
        str(bundle_path),
    )
    # Not a Security Officer: refused, nothing installed.
    denied = _run(home, "update", "install", str(bundle_path), role="customer", ok=False)
    assert denied["error"] == "AccessDenied"
    installed = _run(home, "update", "install", str(bundle_path), role="security-officer")
    assert installed["bundle_sha256"] == signed["bundle_sha256"]
    status = _run(home, "update", "status", role="auditor")
    assert (status["version"], status["software_id"]) == ("1.1.0", 101)
    assert status["bundle_sha256"] == signed["bundle_sha256"]
    # The same bundle again is a replay: refused with its reason.
    again = _run(home, "update", "install", str(bundle_path), role="security-officer", ok=False)
    assert "not newer" in again["message"]
    preview = _run(
        home, "update", "quote", "--weight", "1oz", "--from-zip", "94043", "--to-zip", "62704"
    )
    issued = _run(
        home,
        "issue",
        "--weight",
        "1oz",
        "--rate",
        "first-class-letter",
        "--from-zip",
        "94043",
        "--to-zip",
        "62704",
        "--to",
        "Jane Q. Public|1234 Main St.|Springfield, IL 62704",
        role="customer",
    )
    indicium = decode(bytes.fromhex(issued["indicium_hex"]))
    assert indicium.postage == preview["postage"] == 740
    assert indicium.software_id == 101
    verdict = verify_label_image(
        running,
        Path(issued["label_png"]),
        running.certs / "postal-root.pem",
        [running.certs / "meter.pem", running.certs / "provider.pem"],
    )
    assert verdict.verdict.value == "VALID", verdict.reason
    over = _run(
        home,
        "issue",
        "--weight",
        "4oz",
        "--from-zip",
        "94043",
        "--to-zip",
        "62704",
        "--to",
        "Jane",
        role="customer",
        ok=False,
    )
    assert "limit of 3.5 oz" in over["message"]
