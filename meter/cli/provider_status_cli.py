"""``meter provider issue-status``: the postal root's signed status of the provider's certificate.

Every reload handshake staples it (docs/reload-protocol.md, "Provider status"), the
way OCSP stapling works for TLS: a meter refuses a provider whose status is revoked,
forged, about another certificate or stale. The root renews it before it goes stale
(it is valid 7 days by default); `meter provider serve` rereads the file when it
changes, so a renewal needs no restart.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from cryptography.exceptions import InvalidSignature

from meter.cli.common import emit, errors, home_of
from meter.durable import write_atomically
from meter.errors import InvalidInput
from meter.pki.reload_certs import STATUS_VALIDITY, ProviderStatus, ProviderStatusKind

__all__ = ["issue_status"]

MAX_VALIDITY_DAYS = 31


@click.command("issue-status")
@click.option("--revoked", is_flag=True, help="State that the provider's certificate is REVOKED.")
@click.option(
    "--days",
    type=click.IntRange(1, MAX_VALIDITY_DAYS),
    default=STATUS_VALIDITY.days,
    show_default=True,
    help="How long meters accept this status.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write it (default: HOME/provider/status.bin, where `serve` looks).",
)
@click.option(
    "--provider-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The provider's certificate (PEM). Default: read from the home's provider token "
    "(which a running `meter provider serve` holds: give the PEM then, e.g. from "
    "`meter export-certs`).",
)
@click.pass_context
def issue_status(
    ctx: click.Context, revoked: bool, days: int, out: Path | None, provider_cert: Path | None
) -> None:
    """The postal root signs the status of the provider's certificate (needs
    POSTAL_ROOT_USER_PIN; without --provider-cert also PROVIDER_USER_PIN)."""
    with errors(ctx):
        from cryptography import x509

        from meter.provider import PostalRoot, Provider

        home = home_of(ctx)
        now = datetime.now(UTC)
        kind = ProviderStatusKind.REVOKED if revoked else ProviderStatusKind.GOOD
        if provider_cert is not None:
            try:
                certificate = x509.load_pem_x509_certificate(provider_cert.read_bytes())
            except ValueError as exc:
                raise InvalidInput(f"{provider_cert}: not a PEM certificate ({exc})") from exc
        else:
            with home.open_token("provider") as ptoken:
                certificate = Provider.open(ptoken, home.ledger).certificate
        with home.open_token("postal-root") as rtoken:
            root = PostalRoot.open(rtoken)
            try:
                certificate.verify_directly_issued_by(root.certificate)
            except (ValueError, TypeError, InvalidSignature):
                raise InvalidInput(
                    "the provider's certificate is not issued by this postal root"
                ) from None
            status = ProviderStatus.issue(
                certificate, kind, root.signer(), now, validity=timedelta(days=days)
            )
        target = out or home.path / "provider" / "status.bin"
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(target, status.to_bytes())
        data = {
            "out": str(target),
            "status": kind.name,
            "authorization_id": status.authorization_id,
            "certificate_serial": f"{status.certificate_serial:x}",
            "produced_at": status.produced_at.isoformat(),
            "next_update": status.next_update.isoformat(),
        }
        emit(
            ctx,
            data,
            lambda: (
                f"wrote {target}: provider {status.authorization_id} {kind.name} until "
                f"{status.next_update.isoformat()}"
            ),
        )
