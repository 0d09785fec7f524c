"""EXPORTER_NETWORK_ALIASES applies to POSTed events and in proxy mode alike."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import BASE_MS, AppClient, async_wait_until, received
from facilitator_helpers import USDC, ScriptedFacilitator, exchange, start_proxy
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.ingest.proxy import PROXY

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


async def test_an_alias_names_a_network_in_proxy_mode(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    data_dir: Path,
) -> None:
    facilitator = ScriptedFacilitator()
    server = await aiohttp_server(facilitator.app(), port=0)
    registry = CollectorRegistry()
    client = await start_proxy(
        aiohttp_client,
        data_dir,
        str(server.make_url("")).rstrip("/"),
        registry,
        network_aliases={"acme-chain": "eip155:777"},
        proxy_asset_decimals={f"eip155:777/{USDC}": 6},
    )
    body = exchange(1)
    body["paymentRequirements"]["network"] = "acme-chain"
    response = await client.post("/settle", json=body)
    assert response.status == 200
    await client.app[PROXY].drain()
    stored = [json.loads(body) for _, _, body in client.app[COMMITTER].ledger.iter_events()]
    assert {e["data"]["network"] for e in stored if "network" in e["data"]} == {"eip155:777"}
    success = {"network": "eip155:777", "status": "success"}
    assert registry.get_sample_value("facilitator_payments_total", success) == 1


async def test_an_alias_names_its_chain_in_the_networks_analytic(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    """A chain the built-in table does not name is shown by the operator's name for it; a
    built-in chain keeps its own name whatever alias also points at it."""
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        network_aliases={"acme-chain": "eip155:777", "my-base": "eip155:8453"},
    )
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    events = [received("p1", network="acme-chain"), received("p2", network="my-base")]
    assert (await client.post("/v1/events", json=events)).status == 202

    async def chains() -> dict[str, str] | None:
        response = await client.get(f"/v1/analytics/networks?window=1h&at={BASE_MS + 1}")
        assert response.status == 200, await response.text()
        rows = await response.json()
        return {row["chainId"]: row["chainName"] for row in rows} if len(rows) == 2 else None

    names = await async_wait_until(chains, what="both networks in the analytics")
    assert names == {"eip155:777": "acme-chain", "eip155:8453": "Base"}
