"""`meter ceremony` as custodians run it: init-target, export (move), verify-transcript,
import, through the CLI (click's CliRunner feeds the PINs, passphrases and confirmations
the prompts ask for), two device processes and two emulated cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _card_readers import READERS, Readers
from _openpgp_card import OpenPGPApplet
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization

from meter.cli.device_process import running_device
from meter.cli.home import Home
from meter.cli.main import cli
from tests._ceremony import PASSPHRASE, PASSWORDS, PIN
from tests.conftest import TEST_POLICY

FIRST, SECOND = READERS.values()
ENV = {
    "METER_PASSWORD_SECURITY": PASSWORDS["security"],
    "METER_PASSWORD_CUSTODIAN": PASSWORDS["custodian"],
}


def meter(home: Path, *args: str, input: str = "", env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["--home", str(home), "--json", *args], obj={}, input=input, env=env or ENV
    )


def last_json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    loaded: dict[str, Any] = json.loads(result.output.strip().splitlines()[-1])
    return loaded


def test_export_verify_and_import_from_the_command_line(
    device_home: Home, readers: Readers, tmp_path: Path
) -> None:
    out = tmp_path / "ceremony"
    readers.insert(OpenPGPApplet(serial=1), 35963)
    readers.insert(OpenPGPApplet(serial=2), 35964)
    shares = [
        "--share", f"alice:card:{FIRST}",
        "--share", f"bob:card:{SECOND}",
        "--share", f"carol:sealed:{tmp_path / 'carol.share'}",
    ]  # fmt: skip
    with running_device(device_home):
        # A bad policy is refused before anything happens.
        bad = meter(
            device_home.path,
            "ceremony",
            "export",
            "--purpose",
            "move",
            "--policy",
            "officers:4/3",
            *shares,
            "--officer",
            "security",
            "--custodian",
            "custodian",
            "--out",
            str(out),
        )
        assert bad.exit_code == 1 and "threshold" in bad.output
        answers = "\n".join([PIN, "y", PIN, "y", PASSPHRASE, "y"]) + "\n"
        exported = last_json(
            meter(
                device_home.path,
                "ceremony",
                "export",
                "--purpose",
                "move",
                "--policy",
                "officers:2/3",
                *shares,
                "--officer",
                "security",
                "--custodian",
                "custodian",
                "--out",
                str(out),
                "--ceremony-id",
                "cli-move",
                input=answers,
            )
        )
    assert exported["outcome"] == "completed"
    files = {k: Path(v) for k, v in exported["files"].items()}
    bundle = json.loads(files["bundle"].read_text())
    spki = next(k for k in bundle["keys"] if k["label"] == "audit-signing")["public_spki"]
    pem = serialization.load_der_public_key(bytes.fromhex(spki)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "audit.pem").write_bytes(pem)
    verified = last_json(
        meter(
            device_home.path,
            "ceremony",
            "verify-transcript",
            str(files["transcript"]),
            "--key",
            str(tmp_path / "audit.pem"),
        )
    )
    assert verified == {"ok": True, "ceremony": "cli-move", "outcome": "completed"}
    # An altered transcript fails the check.
    document = json.loads(files["transcript"].read_text())
    document["transcript"]["outcome"] = "failed"
    (tmp_path / "altered.json").write_text(json.dumps(document))
    altered = meter(
        device_home.path,
        "ceremony",
        "verify-transcript",
        str(tmp_path / "altered.json"),
        "--key",
        str(tmp_path / "audit.pem"),
    )
    assert altered.exit_code == 1 and "does not verify" in altered.output

    target = tmp_path / "target"
    (target / "device").mkdir(parents=True, mode=0o700)
    (target / "device" / "policy.toml").write_text(TEST_POLICY)
    made = last_json(
        meter(
            target,
            "ceremony",
            "init-target",
            env={
                "METER_ADMIN_PASSWORD": PASSWORDS["admin"],
                "METER_SO_PASSWORD": PASSWORDS["security"],
                "METER_KC_PASSWORD": PASSWORDS["custodian"],
            },
        )
    )
    assert [u["role"] for u in made["users"]] == [
        "administrator",
        "security-officer",
        "key-custodian",
    ]
    with running_device(Home.at(target)):
        imported = last_json(
            meter(
                target,
                "ceremony",
                "import",
                "--bundle",
                str(files["bundle"]),
                "--final-registers",
                str(files["final_registers"]),
                "--export-transcript",
                str(files["transcript"]),
                "--postal-root",
                str(device_home.certs / "postal-root.pem"),
                "--share",
                f"bob:card:{SECOND}",
                "--share",
                f"carol:sealed:{tmp_path / 'carol.share'}",
                "--officer",
                "security",
                "--custodian",
                "custodian",
                "--out",
                str(out),
                input=f"{PIN}\ny\n{PASSPHRASE}\ny\n",
            )
        )
    assert imported["outcome"] == "completed"
    assert imported["device"]["module_state"] == "authorized"
    assert imported["device"]["registers"]["descending"] == 100_000
