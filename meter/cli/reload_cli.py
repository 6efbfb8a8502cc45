"""``meter reload``: Download Postage Value over the reload protocol, relayed by this host.

The host is untrusted transport (docs/reload-protocol.md): it carries opaque,
authenticated messages between the device's socket and the provider's HTTP
service and learns nothing it could use. `relay_reload` is the relay; the
commands are ``meter --user P reload AMOUNT --provider URL`` (a Provider user) and
``meter --user CA reload-certify`` (a Certificate Authority user: the meter's reload
key is made in its token and certified by the home's provider token).
"""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import click
from cryptography.hazmat.primitives import serialization

from meter import errors as meter_errors
from meter.cli.common import emit, errors, home_of, parse_postage
from meter.cli.device_session import device
from meter.errors import ConfigurationError, MeterError, ProtocolError, TokenUnavailable
from meter.host import DeviceClient
from meter.pki.reload_certs import make_reload_certificate

__all__ = [
    "ProviderLink",
    "ProviderUnreachable",
    "certify",
    "certify_reload_key",
    "relay_reload",
    "reload",
]


class ProviderUnreachable(TokenUnavailable):
    """The provider did not answer (connection refused, cut, or timed out)."""


class ProviderLink:
    """HTTP/JSON to the provider's reload routes (``http://host:port``)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigurationError(f"provider URL {url!r} must be http://HOST[:PORT]")
        self.url = url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            connection.request(
                "POST",
                self._prefix + path,
                body=data,
                headers={"content-type": "application/json", "content-length": str(len(data))},
            )
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ProviderUnreachable(
                f"the provider at {self.url} is unreachable ({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            connection.close()
        try:
            answer = json.loads(payload)
        except ValueError:
            raise ProviderUnreachable(
                f"the provider at {self.url} answered {response.status} without JSON"
            ) from None
        if response.status >= 400 or not isinstance(answer, dict):
            name = answer.get("error") if isinstance(answer, dict) else None
            message = answer.get("message") if isinstance(answer, dict) else None
            kind = getattr(meter_errors, str(name), None) if name in meter_errors.__all__ else None
            if not (isinstance(kind, type) and issubclass(kind, MeterError)):
                kind = MeterError
            raise kind(f"the provider refused: {message or response.status}")
        return answer


Send = Callable[[str, dict[str, Any]], dict[str, Any]]


def relay_reload(device: DeviceClient, send: Send, amount: int) -> dict[str, Any]:
    """Relay one reload between the device and the provider (``send(path, body)``).

    A failure before the meter applied the credit cancels the device's session, so
    nothing is pending on the meter; the provider settles any transaction it prepared
    at the next contact. A failure after (the receipt did not reach the provider) is
    reported as such: the meter is credited, and the provider commits at the next contact.
    """
    begun = device.reload_begin(amount)
    applied: dict[str, Any] | None = None
    try:
        step = send("/v1/reload/hello", {"message_hex": begun["message_hex"]})
        session_id = str(step["session_id"])
        while True:
            answer = device.reload_next(bytes.fromhex(str(step["message_hex"])))
            if answer.get("done"):
                applied = dict(answer["result"])
            step = send(
                "/v1/reload/next", {"session_id": session_id, "message_hex": answer["message_hex"]}
            )
            if step.get("done"):
                if applied is None:
                    raise ProtocolError("the provider ended the reload before the meter did")
                return {**applied, "provider": step["result"], "provider_settled": True}
            if applied is not None:
                raise ProtocolError("the provider asked for more after the meter's receipt")
    except MeterError as exc:
        if applied is not None:
            return {
                **applied,
                "provider_settled": False,
                "note": f"the meter is credited; the provider did not confirm ({exc}); it "
                "settles the transaction at the next reload",
            }
        with contextlib.suppress(MeterError):
            device.reload_cancel()
        if isinstance(exc, ProviderUnreachable):
            raise ProviderUnreachable(f"{exc}; nothing is pending on the meter") from exc
        raise


def certify_reload_key(device: DeviceClient, sign: Callable[[bytes, int], bytes]) -> dict[str, Any]:
    """Authorize PSD for the reload key: the device makes it, ``sign(spki, serial)`` returns
    the provider's certificate (PEM), the device installs it."""
    key = device.post("/v1/reload/key")
    pem = sign(bytes.fromhex(str(key["public_key_spki_hex"])), int(key["device_serial"]))
    answer: dict[str, Any] = device.post(
        "/v1/reload/certificate", {"certificate_pem": pem.decode()}
    )
    return answer


@click.command("reload")
@click.argument("amount")
@click.option("--provider", "provider_url", required=True, help="http://HOST:PORT")
@click.pass_context
def reload(ctx: click.Context, amount: str, provider_url: str) -> None:
    """Reload AMOUNT dollars (e.g. 25.00) from the provider at --provider over the
    authenticated, encrypted reload protocol (a Provider user's --user)."""
    with errors(ctx):
        mills = parse_postage(amount)
        link = ProviderLink(provider_url)
        with device(ctx) as client:
            result = relay_reload(client, link.post, mills)
        emit(ctx, result, lambda: _text(result))


@click.command("reload-certify")
@click.pass_context
def certify(ctx: click.Context) -> None:
    """Make the meter's reload key and certify it with the home's provider (a Certificate
    Authority user; the provider token's PIN from its environment variable or a prompt)."""
    from meter.provider import Provider

    with errors(ctx):
        home = home_of(ctx)

        def sign(spki: bytes, serial: int) -> bytes:
            with home.open_token("provider") as token:
                provider = Provider.open(token, home.ledger)
                now = datetime.now(UTC).replace(microsecond=0)
                cert = make_reload_certificate(
                    spki, serial, provider.certificate, provider.signer(), now
                )
                return cert.public_bytes(serialization.Encoding.PEM)

        with device(ctx) as client:
            result = certify_reload_key(client, sign)
        emit(
            ctx,
            result,
            lambda: f"reload key certified (certificate {result['certificate_serial']})",
        )


def _text(result: dict[str, Any]) -> str:
    line = (
        f"reloaded {result['amount']} mills (transaction {result['transaction_id']}); "
        f"descending {result['descending']} mills"
    )
    if not result.get("provider_settled"):
        line += f"\n{result.get('note', '')}"
    return line
