"""The meter's internals driven directly, as a lab with the token's PIN would: for tests of
the records and the cryptography underneath the firmware, not of the device's services."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from meter.cli.home import Home
from meter.cli.workflows import label_info
from meter.indicium import Indicium
from meter.label import render_label, write_label
from meter.protocol.issue import IssueRequest
from meter.provider import Provider
from meter.psd import Meter
from meter.psd.registers import Registers
from tests.conftest import open_meter_token


def credit(home: Home, amount: int) -> Registers:
    """One credit round: the meter asks, the provider grants and records, the meter applies."""
    with open_meter_token(home) as mtoken, home.open_token("provider") as ptoken:
        meter = Meter.open(mtoken)
        provider = Provider.open(ptoken, home.ledger)
        grant = provider.grant_credit(meter.request_credit(), amount, datetime.now(UTC))
        return meter.apply_credit(grant)


def issue(home: Home, request: IssueRequest) -> Indicium:
    with open_meter_token(home) as token:
        return Meter.open(token).issue(request)


def registers(home: Home) -> Registers:
    with open_meter_token(home) as token:
        return Meter.open(token).registers


def issue_label(home: Home, request: IssueRequest) -> Path:
    """Issue directly and lay the label out as the host would; the PNG's path."""
    indicium = issue(home, request)
    label = render_label(indicium.to_bytes(), label_info(indicium, request.address_lines()))
    png = home.labels / f"{indicium.device_serial}-{indicium.sequence:06d}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    write_label(label, png, png.with_suffix(".pdf"))
    return png
