"""The device API's committed OpenAPI description is the one the code serves."""

from __future__ import annotations

import json
from pathlib import Path

from meter.psd.server import openapi_description

DOC = Path(__file__).resolve().parents[1] / "docs" / "device-openapi.json"


def test_the_committed_openapi_description_is_current() -> None:
    committed = json.loads(DOC.read_text())
    assert committed == openapi_description(), (
        "docs/device-openapi.json is stale: regenerate it with "
        "`meter device openapi > docs/device-openapi.json`"
    )


def test_every_service_route_is_described() -> None:
    paths = openapi_description()["paths"]
    for route in ("/v1/logon", "/v1/indicia", "/v1/status", "/v1/credit/grant", "/v1/audit"):
        assert route in paths, route
    summaries = [op["summary"] for ops in paths.values() for op in ops.values()]
    assert any("Create Indicium" in s for s in summaries)
