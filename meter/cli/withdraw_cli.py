"""``meter postoffice load-revocations`` (a provider's signed revocation export into the post
office's certificate directory), and the device-to-provider round trips behind ``meter
withdraw --provider URL`` and ``meter device-audit --provider URL`` (docs/withdrawal.md).

The round trips run in one device session (the user of ``--user``: Provider for a
withdrawal) and speak to the provider's service with an operator key from
METER_PROVIDER_KEY or a hidden prompt, never a flag. The provider is asked first, so an
unreachable provider or a wrong key leaves the device as it was. A withdrawal resumes
where the device's state and the provider's records say an earlier run stopped.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from meter.cli.common import emit, errors, home_of
from meter.cli.device_session import device
from meter.cli.home import password_from_env
from meter.cli.postoffice_group import postoffice
from meter.cli.workflows import format_mills
from meter.durable import write_atomically
from meter.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigurationError,
    DeviceLocked,
    InsufficientFunds,
    InvalidInput,
    MeterError,
    ProtocolError,
)
from meter.host import DeviceClient
from meter.postoffice.trustdir import REVOCATIONS_FILE, load_revocation_export
from meter.protocol.device_audit import AuditAcknowledgement, DeviceAuditReport, nonce_from_hex
from meter.provider.audits import AuditFailed

__all__ = [
    "KEY_VARIABLE",
    "ProviderService",
    "audit_through",
    "load_revocations",
    "run_device_audit",
    "run_withdraw",
    "withdraw_through",
]


@postoffice.command("load-revocations")
@click.argument("export", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="The post office's certificate directory (default HOME/certs).",
)
@click.pass_context
def load_revocations(ctx: click.Context, export: Path, directory: Path | None) -> None:
    """Verify a provider's signed revocation EXPORT and merge it into revocations.json.

    The export is checked against that provider's certificate in the directory;
    an altered or foreign export, or one naming another provider's meter, is
    refused and the directory is left as it was. A running post office picks
    the new list up at its next request.
    """
    with errors(ctx):
        folder = directory or home_of(ctx).certs
        try:
            data = export.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read revocation export {export}: {exc.strerror}") from exc
        count = load_revocation_export(folder, data, str(export))
        target = folder / REVOCATIONS_FILE
        emit(
            ctx,
            {"revocations": str(target), "devices": count},
            lambda: f"{count} revoked device(s) from {export} merged into {target}",
        )


# -- meter withdraw --provider / meter device-audit --provider ----------------------------

KEY_VARIABLE = "METER_PROVIDER_KEY"  # the provider service's operator key, as `meter provider`
_TIMEOUT_S = 60
_KINDS: dict[str, type[MeterError]] = {
    "InvalidInput": InvalidInput,
    "ProtocolError": ProtocolError,
    "AuditFailed": AuditFailed,
    "InsufficientFunds": InsufficientFunds,
    "AuthenticationFailed": AuthenticationFailed,
    "Unauthorized": AuthenticationFailed,
    "AccessDenied": AccessDenied,
    "Forbidden": AccessDenied,
    "ConfigurationError": ConfigurationError,
}
# The withdrawal's steps as the CLI names them (docs/withdrawal.md, "Withdrawal").
STEPS = ("final-audit", "refund", "destroy-keys", "revocation", "export")


class ProviderService:
    """The provider's HTTP service as one operator uses it (Authorization: Bearer KEY)."""

    def __init__(self, url: str, key: str) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--provider {url!r}: give the service's http(s)://host:port")
        self.url = url.rstrip("/")
        self._key = key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            try:
                refusal = json.loads(exc.read())
                kind, message = str(refusal["error"]), str(refusal["message"])
            except (ValueError, KeyError, TypeError):
                kind, message = "ConfigurationError", f"HTTP {exc.code} from {self.url}{path}"
            raise _KINDS.get(kind, ConfigurationError)(f"the provider: {message}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot reach the provider service at {self.url} ({exc}); nothing more was "
                "done: rerun the command once it answers"
            ) from exc

    def nonce(self, device_serial: int) -> bytes:
        answer = self.call("POST", "/v1/audits/nonce", {"device_serial": device_serial})
        return nonce_from_hex(str(answer["nonce_hex"]))


def provider_service(url: str) -> ProviderService:
    """The service at ``url`` with the operator key from METER_PROVIDER_KEY or a prompt."""
    return ProviderService(url, password_from_env(KEY_VARIABLE, "the provider's operator key"))


def _audit_body(
    report: DeviceAuditReport, certificate_pem: str, post_office: dict[str, Any]
) -> dict[str, Any]:
    return {"report": report.to_json(), "meter_certificate_pem": certificate_pem, **post_office}


def _acknowledgement(answer: Any) -> AuditAcknowledgement:
    if not isinstance(answer, dict) or not isinstance(answer.get("acknowledgement"), dict):
        raise ProtocolError("the provider's answer holds no acknowledgement")
    return AuditAcknowledgement.from_json(answer["acknowledgement"], "the provider's answer")


def _meter_certificate(client: DeviceClient) -> str:
    pem = client.get("/v1/public-key").get("certificate_pem")
    if not isinstance(pem, str):
        raise DeviceLocked("the device has no meter certificate: it is not authorized yet")
    return pem


def _serial(status: dict[str, Any]) -> int:
    serial = status.get("device_serial")
    if not isinstance(serial, int):
        raise DeviceLocked("the device's records cannot be read: no device serial")
    return serial


def _post_office(path: Path | None, without: bool, command: str) -> dict[str, Any]:
    """What the provider checks the report against, as the members of the audit's body: the
    post office's reconciliation, or the operator's explicit waiver (the provider records
    which). Neither or both is refused before the provider or the device is asked."""
    if path is not None and without:
        raise InvalidInput("give --post-office FILE or --without-post-office, not both")
    if without:
        return {"without_post_office": True}
    if path is None:
        raise InvalidInput(
            f"{command} checks the device against a post office's reconciliation: give "
            "--post-office FILE (the JSON of `meter postoffice reconcile --json`), or "
            "--without-post-office to have the provider audit without it (recorded in the "
            "audit); nothing was done"
        )
    try:
        return {"post_office": json.loads(path.read_bytes())}
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"{path}: not the JSON of `meter postoffice reconcile --json` ({exc})"
        ) from exc


def _say(text: str) -> None:
    """Progress on stderr (stdout keeps the one result, JSON with --json)."""
    click.echo(text, err=True)


def withdraw_through(
    client: DeviceClient,
    service: ProviderService,
    revocations_out: Path | None,
    post_office: dict[str, Any],
) -> dict[str, Any]:
    """Withdraw PSD end to end between the device (a Provider session on ``client``) and the
    provider's service; every step resumes where the device's state and the provider's
    records say an earlier run stopped."""
    status = client.get("/v1/status")
    serial = _serial(status)
    done: list[str] = []
    ack: AuditAcknowledgement | None = None
    if status.get("withdrawn_at"):
        resumed = "revocation"
        _say(f"the device was withdrawn at {status['withdrawn_at']}: resuming at step 4")
    elif status.get("withdrawing_since"):
        try:  # refunded already? then the provider signs its acknowledgement again
            ack = _acknowledgement(service.call("GET", f"/v1/withdrawals/{serial}/acknowledgement"))
            resumed = "destroy-keys"
            _say("the provider refunded the meter already: resuming at step 3")
        except ProtocolError:
            resumed = "final-audit"
            _say(
                f"the device stopped issuing at {status['withdrawing_since']}: resuming at "
                "step 1 with a new final report",
            )
    else:
        resumed = None
    if ack is None and resumed != "revocation":
        nonce = service.nonce(serial)  # the provider first: unreachable leaves the device be
        pem = _meter_certificate(client)
        report = client.withdraw_begin(nonce)
        done.append("final-audit")
        _say("step 1: the device stopped issuing and signed its final report")
        answer = service.call("POST", "/v1/withdrawals", _audit_body(report, pem, post_office))
        ack = _acknowledgement(answer)
        done.append("refund")
        _say(f"step 2: the provider checked it and refunded {format_mills(ack.descending)}")
    final: dict[str, Any] = {}
    if ack is not None:
        final = client.withdraw_complete(ack)
        done.append("destroy-keys")
        _say("step 3: the device destroyed its keys and is withdrawn")
    revoked = service.call("POST", f"/v1/withdrawals/{serial}/revocation")
    done.append("revocation")
    _say(f"step 4: the provider revoked the meter from {revoked['revoked_at']} on")
    if revocations_out is not None:
        export = service.call("GET", "/v1/revocations")
        _write(revocations_out, json.dumps(export, indent=1) + "\n")
        done.append("export")
    after = client.get("/v1/status")
    return {
        "device_serial": serial,
        "resumed_at": resumed,
        "steps": done,
        "module_state": after.get("module_state"),
        "withdrawn_at": after.get("withdrawn_at"),
        "refund": None if ack is None else ack.descending,
        "destroyed_keys": final.get("destroyed_keys"),
        "revoked_at": revoked["revoked_at"],
        "revocations_out": None if revocations_out is None else str(revocations_out),
    }


def audit_through(
    client: DeviceClient, service: ProviderService, post_office: dict[str, Any]
) -> dict[str, Any]:
    """One periodic device audit: the provider's nonce, the device's signed report, the
    provider's check and record, its acknowledgement into the device (watchdog restarts)."""
    serial = _serial(client.get("/v1/status"))
    nonce = service.nonce(serial)
    pem = _meter_certificate(client)
    report = client.device_audit(nonce)
    ack = _acknowledgement(
        service.call("POST", "/v1/audits", _audit_body(report, pem, post_office))
    )
    taken = client.acknowledge_audit(ack)
    return {
        "device_serial": serial,
        "report_sha256": report.digest().hex(),
        "audited_at": ack.audited_at.isoformat(),
        "ascending": ack.ascending,
        "descending": ack.descending,
        "piece_count": ack.piece_count,
        "last_audit_at": taken.get("last_audit_at"),
        "watchdog": taken.get("watchdog"),
    }


def _write(path: Path, text: str) -> None:
    try:
        write_atomically(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from exc


def run_withdraw(
    ctx: click.Context,
    provider: str | None,
    revocations_out: Path | None,
    post_office: Path | None,
    without_post_office: bool = False,
) -> None:
    """`meter withdraw`: the whole withdrawal through the provider's service."""
    with errors(ctx):
        if provider is None:
            raise InvalidInput(
                "meter withdraw needs --provider URL: the provider's service gives the nonce, "
                f"checks the final report, refunds and acknowledges (operator key in "
                f"{KEY_VARIABLE}); run it as the device's Provider user (--user)"
            )
        figures = _post_office(post_office, without_post_office, "meter withdraw")
        service = provider_service(provider)
        with device(ctx) as client:
            result = withdraw_through(client, service, revocations_out, figures)
        emit(
            ctx,
            result,
            lambda: (
                f"meter {result['device_serial']} withdrawn"
                + (
                    f"; refunded {format_mills(result['refund'])}"
                    if result["refund"] is not None
                    else ""
                )
                + f"; revoked from {result['revoked_at']}"
                + (f"; revocation export in {revocations_out}" if revocations_out else "")
            ),
        )


def run_device_audit(
    ctx: click.Context,
    provider: str | None,
    post_office: Path | None,
    without_post_office: bool = False,
) -> None:
    """`meter device-audit`: the unsigned health check, or with --provider the signed audit."""
    with errors(ctx):
        if provider is None:
            if post_office is not None or without_post_office:
                raise InvalidInput("--post-office and --without-post-office go with --provider URL")
            with device(ctx) as client:
                answer: dict[str, Any] = client.post("/v1/device-audit", None)
            emit(ctx, answer, lambda: "\n".join(f"{k}: {_plain(v)}" for k, v in answer.items()))
            return
        figures = _post_office(post_office, without_post_office, "meter device-audit --provider")
        service = provider_service(provider)
        with device(ctx) as client:
            result = audit_through(client, service, figures)
        emit(
            ctx,
            result,
            lambda: (
                f"meter {result['device_serial']} audited by the provider at "
                f"{result['audited_at']}; the inspection watchdog restarts from "
                f"{result['last_audit_at']}"
            ),
        )


def _plain(value: object) -> str:
    return (
        json.dumps(value, sort_keys=True, default=str)
        if isinstance(value, dict | list)
        else str(value)
    )
