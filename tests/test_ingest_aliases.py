"""EXPORTER_NETWORK_ALIASES applies to POSTed events as it does in proxy mode."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import AppClient, received
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER

NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.mark.parametrize("framing", ["object", "array", "ndjson"])
async def test_an_alias_names_a_network_on_ingest(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path, framing: str
) -> None:
    settings = Settings(
        data_dir=data_dir, listen="127.0.0.1:0", network_aliases={"acme-chain": "eip155:777"}
    )
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(settings, registry))
    event = received("p1", network="acme-chain")
    if framing == "object":
        response = await client.post("/v1/events", json=event)
    elif framing == "array":
        response = await client.post("/v1/events", json=[event, received("p2", network="base")])
    else:
        response = await client.post(
            "/v1/events", data=json.dumps(event).encode() + b"\n", headers=NDJSON
        )
    assert response.status == 202
    stored = [json.loads(body) for _, _, body in client.app[COMMITTER].ledger.iter_events()]
    assert stored[0]["data"]["network"] == "eip155:777"
    pending = registry.get_sample_value("facilitator_pending_payments", {"network": "eip155:777"})
    assert pending == 1


async def test_without_the_alias_the_name_is_refused(client: AppClient) -> None:
    response = await client.post("/v1/events", json=received("p1", network="acme-chain"))
    assert response.status == 422
    assert "acme-chain" in (await response.json())["rejected"][0]["error"]
