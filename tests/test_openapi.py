"""The OpenAPI document: valid 3.1, served, and in agreement with the routes the app serves."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from conftest import AppClient, batch_created, batch_settled, failed, received, settled, verified
from openapi_spec_validator import OpenAPIV31SpecValidator

from exporter import Settings, create_app
from exporter.analytics.models import ANALYTIC_NAMES
from exporter.events import EventError, parse_event
from exporter.ingest.signing import SIGNATURE_HEADER, signature_header
from exporter.openapi import OPENAPI_PATH, PROXY_PASS_THROUGH, build_openapi

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
UPSTREAM = "http://127.0.0.1:9"
"""Proxy mode needs an upstream URL; the route tests never start the app."""


def _operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }


def _app(
    data_dir: Path, *, proxy: bool, token: bool = False, signed: bool = False
) -> web.Application:
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        upstream_facilitator=UPSTREAM if proxy else None,
        ingest_token="t0ken" if token else None,
        ingest_signing_secret="a-signing-secret-of-32-characters" if signed else None,
    )
    return create_app(settings)


@pytest.mark.parametrize("auth", [False, True])
@pytest.mark.parametrize("proxy", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_document_is_valid_openapi_3_1(auth: bool, proxy: bool, signed: bool) -> None:
    spec = build_openapi(auth=auth, proxy=proxy, signed=signed)
    assert spec["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(spec).validate()  # raises naming the offending part
    assert ("bearerAuth" in spec["components"].get("securitySchemes", {})) is auth
    assert (PROXY_PASS_THROUGH in spec) is proxy
    headers = {p["name"]: p for p in spec["paths"]["/v1/events"]["post"]["parameters"]}
    assert (SIGNATURE_HEADER in headers) is signed


def test_signature_header_pattern_admits_what_the_exporter_signs() -> None:
    spec = build_openapi(auth=False, proxy=False, signed=True)
    (header,) = [
        p
        for p in spec["paths"]["/v1/events"]["post"]["parameters"]
        if p["name"] == SIGNATURE_HEADER
    ]
    assert header["required"] is True
    signed = signature_header(
        "a-signing-secret-of-32-characters", b"{}", content_type="application/json"
    )
    assert re.fullmatch(header["schema"]["pattern"].strip("^$"), signed)


@pytest.mark.parametrize("proxy", [False, True])
async def test_every_route_has_a_spec_entry_and_every_entry_a_route(
    data_dir: Path, proxy: bool
) -> None:
    """Both directions: each operation resolves to a handler that is not the proxy's
    catch-all, and each registered route is covered by at least one operation."""
    app = _app(data_dir, proxy=proxy)
    spec = build_openapi(auth=False, proxy=proxy)
    operations = _operations(spec)
    pass_through = [r for r in app.router.routes() if r.resource is not None and r.method == "*"]
    for method, path in sorted(operations):
        match = await app.router.resolve(make_mocked_request(method, path))
        assert match.http_exception is None, f"{method} {path} is in the spec but not served"
        assert match.route not in pass_through, f"{method} {path} only reaches the catch-all"
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD beside each GET
            continue
        assert route.resource is not None
        info = route.resource.get_info()
        if route in pass_through:
            # OpenAPI has no catch-all path: the extension documents it instead.
            assert proxy and info["pattern"].fullmatch("/any/other/path")
            assert "forwarded to the upstream" in spec[PROXY_PASS_THROUGH]["description"]
            continue
        pattern: re.Pattern[str] = info.get("pattern") or re.compile(re.escape(info["path"]))
        covered = [p for m, p in operations if m == route.method and pattern.fullmatch(p)]
        assert covered, f"{route.method} {route.resource.canonical} has no spec entry"
    assert pass_through if proxy else not pass_through


def test_every_analytic_is_a_spec_path() -> None:
    spec = build_openapi(auth=True, proxy=False)
    analytics = {p.removeprefix("/v1/analytics/") for p in spec["paths"] if "/analytics/" in p}
    assert analytics == set(ANALYTIC_NAMES)
    for name in ANALYTIC_NAMES:
        assert spec["paths"][f"/v1/analytics/{name}"]["get"]["security"] == [{"bearerAuth": []}]


async def test_every_operation_is_answered_by_the_running_app(client: AppClient) -> None:
    """No operation of the spec is a 404 or 405 on the running app (without proxy mode)."""
    spec = build_openapi(auth=False, proxy=False)
    for method, path in sorted(_operations(spec)):
        body = json.dumps(received("p-spec")) if method == "POST" else None
        response = await client.request(
            method, path, data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status not in (404, 405), f"{method} {path}: {response.status}"
        assert str(response.status) in spec["paths"][path][method.lower()]["responses"]


@pytest.mark.parametrize("token", [False, True])
@pytest.mark.parametrize("signed", [False, True])
async def test_served_document_describes_this_instance(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path, token: bool, signed: bool
) -> None:
    app = _app(data_dir, proxy=False, token=token, signed=signed)
    client = await aiohttp_client(app)
    response = await client.get(OPENAPI_PATH)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == build_openapi(auth=token, proxy=False, signed=signed)


def _event_validator() -> jsonschema.Draft202012Validator:
    spec = build_openapi(auth=False, proxy=False)
    schema = {"$ref": "#/components/schemas/Event", "components": spec["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    "event",
    [
        received("p1"),
        verified("p1"),
        settled("p1"),
        failed("p1", network="eip155:10"),
        failed("unknown"),
        batch_created("b1"),
        batch_settled("b1"),
        {
            "type": "revenue:recorded",
            "id": "r-1",
            "data": {
                "kind": "premium",
                "amount": "2.5",
                "network": "eip155:8453",
                "timestamp": 1_767_225_600_000,
            },
        },
        {"type": "websocket:clients", "data": {"count": 3, "timestamp": 1_767_225_600_000}},
    ],
)
def test_event_schema_accepts_what_the_parser_accepts(event: dict[str, Any]) -> None:
    parse_event(event)
    _event_validator().validate(event)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", "1e5"),
        ("amount", "-1"),
        ("amount", 1.5),
        ("network", "basechain"),
        ("timestamp", 1_700_000_000),
        ("timestamp", "1767225600000"),
        ("payer", " 0xabc"),
        ("paymentId", "a\x00b"),
        ("paymentId", ""),
    ],
)
def test_event_schema_refuses_what_the_parser_refuses(field: str, value: object) -> None:
    event = received("p1")
    event["data"][field] = value
    with pytest.raises(EventError, match=field):
        parse_event(event)
    assert not _event_validator().is_valid(event)


def test_event_schema_is_discriminated_on_type() -> None:
    spec = build_openapi(auth=False, proxy=False)
    event = spec["components"]["schemas"]["Event"]
    assert event["discriminator"]["propertyName"] == "type"
    assert len(event["oneOf"]) == len(event["discriminator"]["mapping"]) == 8
    assert not _event_validator().is_valid({"type": "payment:refunded", "data": {}})


def test_the_optional_settlement_and_verification_fields_are_optional_in_the_schema() -> None:
    schemas = build_openapi(auth=False, proxy=False)["components"]["schemas"]
    settled_required = set(schemas["PaymentSettledData"]["required"])
    assert settled_required == {"paymentId", "fee", "timestamp"}
    assert set(schemas["PaymentVerifiedData"]["required"]) == {"paymentId", "timestamp"}
    bare_settlement = settled("p1")
    for field in ("transaction", "settlementTime"):
        del bare_settlement["data"][field]
    bare_verification = verified("p1")
    del bare_verification["data"]["verificationTime"]
    for event in (bare_settlement, bare_verification):
        parse_event(event)
        _event_validator().validate(event)
    without_fee = settled("p1")
    del without_fee["data"]["fee"]
    assert not _event_validator().is_valid(without_fee)
