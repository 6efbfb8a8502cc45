"""Authorize Customer, provider side: record a meter under a customer and sign the binding.

The ledger records first (it refuses an unknown customer, or a meter another
customer holds); then the provider's token signs the record the meter will
verify and keep (meter/protocol/authorization.py). Asking again for the same
customer and meter signs a new record with a new time: the meter takes a
record no older than the one it holds.
"""

from __future__ import annotations

from datetime import datetime

from meter.protocol.authorization import CustomerAuthorization, check_customer_id
from meter.provider.ledger import Ledger
from meter.provider.service import Provider

__all__ = ["authorize_meter"]


def authorize_meter(
    provider: Provider, ledger: Ledger, customer: str, device_serial: int, now: datetime
) -> CustomerAuthorization:
    """Bind meter ``device_serial`` to ``customer`` in the ledger; the signed record."""
    check_customer_id(customer)
    ledger.authorize_meter(customer, device_serial, now)
    return CustomerAuthorization.issue(
        provider.authorization_id, device_serial, customer, now, provider.signer()
    )
