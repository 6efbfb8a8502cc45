"""``meter ceremony``: key export and import ceremonies (docs/custody.md).

The commands talk to the running device (``meter device serve``) and to the custodians at
this terminal: passwords from ``METER_PASSWORD_<USER>`` (the user id upper-cased, ``-`` and
``.`` as ``_``) or a hidden prompt; card PINs and sealed-file passphrases only from a hidden
prompt. A share's words are never printed, only its fingerprint.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.home import Home, password_from_env
from meter.custody.ceremony import CeremonyResult, Place, export_keys, import_keys, new_ceremony_id
from meter.custody.ceremony_transcript import verify_transcript
from meter.custody.shares import Group, Policy
from meter.errors import ConfigurationError, InvalidInput
from meter.host import DeviceClient
from meter.psd.firmware import secrets_for
from meter.psd.passwords import PasswordPolicy
from meter.psd.roles import Role
from meter.psd.users import UserStore
from meter.token import ensure_token
from meter.token.slot_token import new_pins

__all__ = ["TerminalPrompter", "ceremony", "init_target_home", "parse_places", "parse_policy"]

_GROUP = re.compile(r"([A-Za-z][A-Za-z0-9_-]*):(\d+)/(\d+)")
_KINDS = ("card", "sealed", "paper")


class TerminalPrompter:
    """The people at this terminal: messages on stderr, secrets from hidden prompts."""

    def say(self, message: str) -> None:
        click.echo(message, err=True)

    def password(self, user_id: str) -> str:
        variable = "METER_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user_id.upper())
        return password_from_env(variable, f"password of device user '{user_id}'")

    def secret(self, what: str) -> str:
        return str(click.prompt(what, hide_input=True, err=True))

    def confirm(self, message: str) -> bool:
        return bool(click.confirm(message, default=False, err=True))


def parse_policy(text: str, groups_needed: int | None) -> Policy:
    """``officers:2/3,auditors:1/2``: each group's name, threshold and size."""
    groups = []
    for part in text.split(","):
        match = _GROUP.fullmatch(part.strip())
        if match is None:
            raise InvalidInput(f"policy group '{part}' is not NAME:THRESHOLD/COUNT (officers:2/3)")
        groups.append(Group(match[1], int(match[2]), int(match[3])))
    return Policy(groups, groups_needed if groups_needed is not None else len(groups))


def parse_places(specs: tuple[str, ...]) -> list[Place]:
    """``CUSTODIAN:KIND:WHERE``: e.g. ``alice:card:Virtual PCD 00 00``, ``bob:sealed:bob.json``."""
    places = []
    for spec in specs:
        custodian, _, rest = spec.partition(":")
        kind, _, where = rest.partition(":")
        if not custodian or kind not in _KINDS or not where:
            raise InvalidInput(
                f"share place '{spec}' is not CUSTODIAN:KIND:WHERE with KIND one of {_KINDS}"
            )
        places.append(Place(kind, where, custodian))  # type: ignore[arg-type]
    return places


def init_target_home(home: Home, users: list[tuple[str, Role, str]]) -> dict[str, Any]:
    """A replacement device: an empty meter token with random PINs and its first users
    (Administrator, Security Officer, Key Custodian), ready for `meter ceremony import`."""
    if not home.meter_in_store:
        raise ConfigurationError(
            f"HSM profile {home.profile.name} keeps the meter token outside the home: prepare "
            "that token with the vendor's tools (empty, initialized), then provision users there"
        )
    if home.token_exists("meter"):
        raise ConfigurationError(f"{home.path} has a meter token already: a target must be new")
    home.device.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = UserStore.open(home.device, PasswordPolicy.load(home.device / "policy.toml"))
    if store.count():
        raise ConfigurationError(f"{home.device} has users already: a target must be new")
    for user_id, _, password in users:
        store.policy.check(password, user_id)
    pins = new_pins(home.profile.selection.pin_min, home.profile.selection.pin_max)
    ensure_token(
        home.profile, home.path, home.token_label("meter"), pins["so_pin"], pins["user_pin"]
    )
    now = datetime.now(UTC).replace(microsecond=0)
    made = [
        store.create(uid, role, pw, secrets_for(role, pins), now).to_json()
        for uid, role, pw in users
    ]
    home.keep_profile()
    return {"home": str(home.path), "users": made}


@click.group()
def ceremony() -> None:
    """Key ceremonies: export the meter's keys to custodians' shares, import them elsewhere."""


@ceremony.command("init-target")
@click.option("--admin-user", default="admin", show_default=True)
@click.option("--so-user", default="security", show_default=True)
@click.option("--custodian-user", default="custodian", show_default=True)
@click.pass_context
def init_target(ctx: click.Context, admin_user: str, so_user: str, custodian_user: str) -> None:
    """Make this home a replacement device: an empty token and its first three users.

    Passwords from METER_ADMIN_PASSWORD, METER_SO_PASSWORD, METER_KC_PASSWORD or prompts.
    """
    with errors(ctx):
        users = [
            (
                uid,
                role,
                password_from_env(var, f"password for {role.display} '{uid}'", confirm=True),
            )
            for uid, role, var in (
                (admin_user, Role.ADMINISTRATOR, "METER_ADMIN_PASSWORD"),
                (so_user, Role.SECURITY_OFFICER, "METER_SO_PASSWORD"),
                (custodian_user, Role.KEY_CUSTODIAN, "METER_KC_PASSWORD"),
            )
        ]
        result = init_target_home(home_of(ctx), users)
        emit(ctx, result, lambda: f"replacement device ready in {result['home']}")


_SHARE_HELP = "CUSTODIAN:KIND:WHERE, KIND card (a reader), sealed or paper (a file); repeat."


@ceremony.command("export")
@click.option("--purpose", type=click.Choice(["backup", "move"]), required=True)
@click.option("--policy", "policy_text", required=True, help="e.g. officers:2/3,auditors:1/2")
@click.option("--groups-needed", type=int, default=None, help="groups that must be complete")
@click.option("--share", "shares", multiple=True, required=True, help=_SHARE_HELP)
@click.option("--officer", required=True, help="the Security Officer's device user id")
@click.option("--custodian", required=True, help="the Key Custodian's device user id")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--ceremony-id", default=None, help="to rerun an interrupted ceremony")
@click.pass_context
def export(
    ctx: click.Context,
    purpose: Literal["backup", "move"],
    policy_text: str,
    groups_needed: int | None,
    shares: tuple[str, ...],
    officer: str,
    custodian: str,
    out: Path,
    ceremony_id: str | None,
) -> None:
    """Export the meter's keys under a split transport key, one share per --share."""
    with errors(ctx):
        policy = parse_policy(policy_text, groups_needed)
        places = parse_places(shares)
        home = home_of(ctx)
        full: Literal["export-backup", "export-move"] = (
            "export-move" if purpose == "move" else "export-backup"
        )
        with DeviceClient(home.socket, home=home.path) as client:
            result = export_keys(
                client,
                ceremony=ceremony_id or new_ceremony_id(full),
                purpose=full,
                policy=policy,
                places=places,
                officer=officer,
                custodian=custodian,
                out=out,
                prompter=TerminalPrompter(),
            )
        emit(ctx, _summary(result), lambda: _text(result))


@ceremony.command("import")
@click.option("--bundle", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--final-registers", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--export-transcript",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="the export's signed transcript: its share check value is checked",
)
@click.option(
    "--postal-root",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="the postal root certificate (PEM) the replacement trusts, from the authority",
)
@click.option("--share", "shares", multiple=True, required=True, help=_SHARE_HELP)
@click.option("--officer", required=True)
@click.option("--custodian", required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.pass_context
def import_(
    ctx: click.Context,
    bundle: Path,
    final_registers: Path,
    export_transcript: Path,
    postal_root: Path,
    shares: tuple[str, ...],
    officer: str,
    custodian: str,
    out: Path,
) -> None:
    """Import an export into this (replacement) device from the custodians' shares."""
    with errors(ctx):
        document = _load(export_transcript)
        try:
            check = bytes.fromhex(document["transcript"]["keys"]["share_check_value"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{export_transcript} names no share check value") from exc
        home = home_of(ctx)
        with DeviceClient(home.socket, home=home.path) as client:
            result = import_keys(
                client,
                bundle_path=bundle,
                final_registers_path=final_registers,
                places=parse_places(shares),
                expected_check=check,
                postal_root_pem=_read_bytes(postal_root, "postal root certificate"),
                officer=officer,
                custodian=custodian,
                out=out,
                prompter=TerminalPrompter(),
            )
        emit(ctx, _summary(result), lambda: _text(result))


@ceremony.command("verify-transcript")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def verify(ctx: click.Context, file: Path, key_path: Path) -> None:
    """Check a ceremony transcript offline against the audit key (PEM, Export Audit Key)."""
    with errors(ctx):
        try:
            pem = key_path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read the audit key {key_path}: {exc.strerror}") from exc
        body = verify_transcript(_load(file), pem)
        emit(
            ctx,
            {"ok": True, "ceremony": body["ceremony"], "outcome": body["outcome"]},
            lambda: f"OK: transcript of ceremony {body['ceremony']} ({body['outcome']})",
        )


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the {what} {path}: {exc.strerror}") from exc


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc


def _summary(result: CeremonyResult) -> dict[str, Any]:
    return {
        "ceremony": result.ceremony,
        "files": {k: str(v) for k, v in result.files.items()},
        "outcome": result.transcript["transcript"]["outcome"],
        "device": result.device,
    }


def _text(result: CeremonyResult) -> str:
    files = os.linesep.join(f"  {k}: {v}" for k, v in result.files.items())
    return f"ceremony {result.ceremony}: {result.transcript['transcript']['outcome']}\n{files}"
