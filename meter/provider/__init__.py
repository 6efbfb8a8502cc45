"""The provider side: postal root and provider certifying parties, credit grants, ledger."""

from meter.provider.authority import CertifyingParty, PostalRoot
from meter.provider.service import Provider

__all__ = ["CertifyingParty", "PostalRoot", "Provider"]
