"""The ``meter`` command through click's CliRunner, on real SoftHSM2 homes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meter.cli.device_process import running_device
from meter.cli.home import PIN_VARIABLES, Home
from meter.cli.main import cli
from meter.indicium import decode
from meter.label import decode_image
from tests.conftest import ROLE_USERS

VECTORS = (
    Path(__file__).parent / "vectors" / "pim1-vectors-v1.json"
)  # a copy of the authority's file


def run(home: Path, *args: str, ok: bool = True, role: str | None = None) -> dict[str, object]:
    """``meter --json ARGS``; with ``role``, logged on as that role's test user."""
    user: list[str] = []
    env = {}
    if role is not None:
        user_id, password = ROLE_USERS[role]
        user, env = ["--user", user_id], {"METER_PASSWORD": password}
    result = CliRunner().invoke(cli, ["--home", str(home), "--json", *user, *args], obj={}, env=env)
    assert (result.exit_code == 0) is ok, result.output
    return json.loads(result.output.splitlines()[-1]) if result.output else {}


def test_demo_prints_label_indicium_verdict_and_certificates(
    softhsm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pair in PIN_VARIABLES.values():
        for var in pair:
            monkeypatch.delenv(var, raising=False)
    out = run(tmp_path / "demo", "demo")
    assert out["verdict"] == "VALID"
    png, pdf = Path(str(out["label_png"])), Path(str(out["label_pdf"]))
    assert png.exists() and pdf.read_bytes().startswith(b"%PDF")
    assert decode_image(png).hex() == out["indicium_hex"]
    certs = out["certificates"]
    assert isinstance(certs, dict) and {"postal_root", "provider", "meter"} <= set(certs)
    creds = out["development_credentials"]
    assert isinstance(creds, dict)
    pins = {v for party, pair in PIN_VARIABLES.items() if party != "meter" for v in pair}
    assert {k for k in creds if k.isupper()} == pins | {"METER_ADMIN_PASSWORD", "METER_SO_PASSWORD"}
    # Nobody is shown the meter token's PINs: they are sealed in the users' slots.
    assert not {"METER_USER_PIN", "METER_SO_PIN"} & set(creds)
    # The printed credentials let the user go on issuing from the demo meter.
    for var, value in creds.items():
        if var.isupper():
            monkeypatch.setenv(var, value)
    monkeypatch.setenv("METER_PASSWORD", str(creds["password of customer"]))
    # The demo started its device and stopped it again.
    demo_home = Home.at(tmp_path / "demo")
    assert not demo_home.socket.exists()
    assert "no device is running" in str(run(demo_home.path, "status", ok=False)["message"])
    with running_device(demo_home):
        issued = run(
            *(demo_home.path, "--user", "customer", "issue", "--postage", "1.20"),
            *("--rate", "priority", "--from-zip", "94043", "--to-zip", "10001"),
            *("--to", "ACME|PO Box 42"),
        )
    assert decode(bytes.fromhex(str(issued["indicium_hex"]))).sequence == 2
    # Re-running the demo without the PINs is refused clearly; the home is untouched.
    for var in creds:
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "demo"), "demo"], obj={})
    assert result.exit_code == 1 and "export the development credentials" in result.output


def test_issue_verify_and_duplicate(running: Home) -> None:
    h = running.path
    run(h, "credit", "20.00", role="provider")
    issued = run(
        h,
        "issue",
        "--postage",
        "0.73",
        "--from-zip",
        "94043",
        "--to-zip",
        "62704",
        "--to-plus4",
        "1234",
        "--delivery-point",
        "23",
        "--to",
        "Jane|1 Main St",
        role="customer",
    )
    first = run(h, "verify", "--image", str(issued["label_png"]))
    assert first["verdict"] == "VALID"
    again = run(h, "verify", str(issued["indicium_hex"]), ok=False)
    assert again["verdict"] == "DUPLICATE"
    status = run(h, "psd-status", role="customer")
    assert (status["piece_count"], status["ascending"], status["descending"]) == (1, 730, 119_270)
    # Issuing is the Customer's service only.
    denied = run(
        h,
        "issue",
        "--postage",
        "0.73",
        "--from-zip",
        "94043",
        "--to-zip",
        "62704",
        "--to",
        "X",
        role="provider",
        ok=False,
    )
    assert denied["error"] == "AccessDenied" and "Provider" in str(denied["message"])


BAD_ISSUES = [
    (["--postage", "0"], "postage 0 mills"),
    (["--postage", "0.7305"], "more precision than a mill"),
    (["--postage", "abc"], "not an amount"),
    (["--postage", "0.73", "--rate", "pigeon"], "first-class-letter"),
    (["--postage", "0.73", "--date", "2026-13-01"], "not YYYY-MM-DD"),
    (["--postage", "9999.00"], "exceeds the descending register"),
    (["--postage", "0.73", "--to", "Jane\u0007Doe|1 Main St"], "cannot be printed"),
    (["--postage", "0.73", "--out", "/dev/null/label"], "nothing was issued"),
]


def test_issue_errors_are_clear_and_change_nothing(running: Home) -> None:
    h = running.path
    base = ["issue", "--from-zip", "94043", "--to-zip", "62704", "--to", "X"]
    for args, message in BAD_ISSUES:
        err = run(h, *base, *args, ok=False, role="customer")
        assert message in str(err["message"]), (args, err)
        assert run(h, "psd-status", role="customer")["piece_count"] == 0, args


def test_verify_batch_gives_every_vector_its_verdict(softhsm: None, tmp_path: Path) -> None:
    vectors = json.loads(VECTORS.read_text())
    certs = vectors["certificates"]
    (tmp_path / "root.pem").write_text(certs["postal_root"])
    (tmp_path / "certs.pem").write_text("".join(certs["providers"] + certs["meters"]))
    (tmp_path / "revoked.json").write_text(json.dumps(vectors["revoked"]))
    (tmp_path / "input.txt").write_text(
        "".join(v["indicium_hex"] + "\n" for v in vectors["vectors"])
    )
    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(tmp_path / "po"),
            "verify-batch",
            "--root",
            str(tmp_path / "root.pem"),
            "--certs",
            str(tmp_path / "certs.pem"),
            "--revoked",
            str(tmp_path / "revoked.json"),
            "--date",
            vectors["verification_date"],
            str(tmp_path / "input.txt"),
        ],
        obj={},
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    got = [line["verdict"] for line in lines]
    # The empty vector is an empty line: verify-batch skips blank lines.
    expected = [v["verdict"] for v in vectors["vectors"] if v["indicium_hex"]]
    assert got == expected
    for line, vector in zip(
        lines, [v for v in vectors["vectors"] if v["indicium_hex"]], strict=True
    ):
        if "fields" in vector:
            assert line["fields"] == vector["fields"]


def test_verify_batch_reads_label_images_and_reports_unreadable_ones(
    running: Home, tmp_path: Path
) -> None:
    h = running.path
    issued = run(
        h,
        "issue",
        "--postage",
        "0.50",
        "--from-zip",
        "94043",
        "--to-zip",
        "62704",
        "--to",
        "X",
        role="customer",
    )
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    (tmp_path / "in.txt").write_text(f"{issued['label_png']}\n{junk}\n{issued['indicium_hex']}\n")
    result = CliRunner().invoke(
        cli, ["--home", str(h), "verify-batch", str(tmp_path / "in.txt")], obj={}
    )
    assert result.exit_code == 0, result.output
    verdicts = [json.loads(line)["verdict"] for line in result.output.splitlines()]
    assert verdicts == ["VALID", "ERROR", "DUPLICATE"]


def test_every_command_has_help() -> None:
    for command in [
        "demo",
        "init",
        "credit",
        "issue",
        "verify",
        "verify-batch",
        "status",
        "export-certs",
    ]:
        result = CliRunner().invoke(cli, [command, "--help"], obj={})
        assert result.exit_code == 0 and "Usage" in result.output, command
