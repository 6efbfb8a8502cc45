"""``meter hsm probe``: what a token really does, against what its profile claims.

Opens the profile's module, lists the chosen slot's mechanisms, logs in on a
throwaway session and runs every check of :mod:`meter.token.probe_checks`.
The verdict is "ok" when every capability the meter needs with the profile's
choices (signing algorithm, register MAC, sealing, wrap, key agreement) works,
else "unusable", naming each missing capability and what needs it. Claims that
differ from what was measured are listed too: a profile must not claim what
its token lacks (the self-tests and provisioning go by the claims).
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass

from meter.token._errors import translated
from meter.token.module import Pkcs11Module, load_module
from meter.token.probe_checks import CHECKS, Check, Trial
from meter.token.profile import HsmProfile, Selection
from meter.token.slot_token import check_pin_length, find_slot

__all__ = ["CheckResult", "ProbeReport", "choose_slot", "format_report", "probe"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    claimed: bool
    works: bool
    needed_for: str | None  # the meter's purpose that needs it with this profile, if any
    detail: str
    per_second: float | None = None


@dataclass(frozen=True)
class ProbeReport:
    profile: str
    profile_file: str
    module: str
    slot: int
    token_label: str
    claims: str
    mechanisms: list[str]
    checks: list[CheckResult]
    verdict: str
    missing: list[dict[str, str]] = field(default_factory=list)
    wrong_claims: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_slot(
    module: Pkcs11Module, profile: HsmProfile, *, slot: int | None, token_label: str | None
) -> pkcs11.Slot:
    """The slot given on the command line, else the one the profile selects."""
    if slot is None and token_label is None:
        if profile.selection.kind is Selection.SLOT:
            slot = profile.selection.slot
        else:
            token_label = profile.labels.meter
    return find_slot(module, slot=slot, label=token_label)


def _mechanism_name(mechanism: Any) -> str:
    return mechanism.name if isinstance(mechanism, Mechanism) else f"0x{int(mechanism):08x}"


def probe(
    profile: HsmProfile, pin: str, *, slot: int | None = None, token_label: str | None = None
) -> ProbeReport:
    """Run every check on the token; raise (changing nothing) for a bad module, slot or PIN."""
    module = load_module(profile.module)
    chosen = choose_slot(module, profile, slot=slot, token_label=token_label)
    where = f"module {module.path}, slot {chosen.slot_id}"
    with module.lock, translated(where, "list mechanisms"):
        available = set(chosen.get_mechanisms())
        token = chosen.get_token()
    # Before any login: a PIN of the wrong length would count as a failed attempt.
    check_pin_length(module, chosen, pin, "the user PIN")
    needed: dict[str, str] = {}
    for cap, why in profile.needs():
        needed[cap] = f"{needed[cap]}; {why}" if cap in needed else why
    results = []
    run_id = secrets.token_hex(6)  # the soft token is machine-wide: labels unique to this run
    with module.lock, translated(where, "log in"), token.open(rw=True, user_pin=pin) as session:
        for check in CHECKS:
            results.append(_run(check, session, run_id, available, profile, needed))
        _remove_leftovers(session, run_id)
    missing = [
        {"capability": r.name, "needed_for": r.needed_for or ""}
        for r in results
        if r.needed_for is not None and not r.works
    ]
    return ProbeReport(
        profile=profile.name,
        profile_file=str(profile.source),
        module=profile.module,
        slot=int(chosen.slot_id),
        token_label=str(token.label),
        claims=profile.claims_source,
        mechanisms=sorted(_mechanism_name(m) for m in available),
        checks=results,
        verdict="unusable" if missing else "ok",
        missing=missing,
        wrong_claims=[r.name for r in results if r.claimed and not r.works],
    )


def _run(
    check: Check,
    session: pkcs11.Session,
    run_id: str,
    available: set[Any],
    profile: HsmProfile,
    needed: dict[str, str],
) -> CheckResult:
    def result(works: bool, detail: str, rate: float | None = None) -> CheckResult:
        return CheckResult(
            name=check.capability,
            claimed=profile.can(check.capability),
            works=works,
            needed_for=needed.get(check.capability),
            detail=detail,
            per_second=None if rate is None else round(rate, 1),
        )

    absent = [m for m in check.mechanisms if m not in available]
    if absent:
        names = ", ".join(f"CKM_{m.name}" for m in absent)
        return result(False, f"not in the token's mechanism list: {names}")
    trial = Trial(session, run_id)
    try:
        outcome = check.run(trial)
    except (pkcs11.PKCS11Error, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        detail = str(exc) or type(exc).__name__
        return result(False, f"failed: {detail}")
    finally:
        trial.cleanup()
    return result(True, outcome.detail, outcome.per_second)


def _remove_leftovers(session: pkcs11.Session, run_id: str) -> None:
    """Data objects of this run a failed check could not destroy (token objects persist)."""
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.APPLICATION: "meter-probe",
        Attribute.LABEL: f"meter-probe-{run_id}",
    }
    for obj in list(session.get_objects(template)):
        obj.destroy()


def format_report(report: ProbeReport) -> str:
    """The probe's report for a terminal."""
    lines = [
        f"profile   {report.profile} ({report.profile_file})",
        f"claims    {report.claims}",
        f"module    {report.module}",
        f"token     slot {report.slot}, label '{report.token_label}'",
        f"mechanisms ({len(report.mechanisms)}): {' '.join(report.mechanisms)}",
        "",
        f"{'capability':22} {'claimed':8} {'works':6} {'rate':>9}  detail",
    ]
    for c in report.checks:
        rate = f"{c.per_second:.0f}/s" if c.per_second is not None else ""
        need = f"  [needed: {c.needed_for}]" if c.needed_for else ""
        lines.append(
            f"{c.name:22} {_yes(c.claimed):8} {_yes(c.works):6} {rate:>9}  {c.detail}{need}"
        )
    lines.append("")
    if report.wrong_claims:
        lines.append(f"claims that do not hold: {', '.join(report.wrong_claims)}")
    if report.verdict == "ok":
        lines.append(f"verdict: ok: everything the meter needs with profile {report.profile} works")
    else:
        missing = "; ".join(f"{m['capability']} (for {m['needed_for']})" for m in report.missing)
        lines.append(f"verdict: unusable with profile {report.profile}: missing {missing}")
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"
