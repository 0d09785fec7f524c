"""Proxy mode against a fake upstream facilitator: pass-through, derived events, metrics.

The fake facilitator (aiohttp on port 0) answers as the request's ``X-Fake-Answer``
header says: valid, invalid, settled, failed, slow (never, until the test ends) or 500.
Payloads follow the x402 specification (v1: network names and ``maxAmountRequired``;
v2: CAIP-2 networks, ``amount`` and the ``accepted`` requirements in the payload).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import BASE_MS, AppClient, free_port
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.cli.common import settings_from_args
from exporter.cli.main import build_parser
from exporter.errors import LedgerUnavailableError
from exporter.ingest.payments import evm_payment_id
from exporter.ingest.proxy import PROXY
from exporter.ledger import Submission, SubmissionResult

USDC_BASE_SEPOLIA = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
SIGNATURE = (
    "0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8"
    "dbbf5836e9bd15092f9ecab05ded3d6293af148b571c"
)
TX = "0x1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef"
STEP_S = 0.25
"""Each upstream round trip takes exactly this long on the proxy's fake timer."""


def nonce(n: int) -> str:
    """A distinct 32-byte EIP-3009 nonce."""
    return "0x" + f"{n:064x}"


def payment_id(network: str, n: int, asset: str = USDC_BASE_SEPOLIA, payer: str = PAYER) -> str:
    """The id the proxy gives the payment of ``v1_request(n)``/``v2_request(n)``."""
    return evm_payment_id(network, asset, payer, nonce(n), SIGNATURE)


def v2_request(
    n: int,
    *,
    network: str = "eip155:84532",
    amount: str = "10000",
    asset: str = USDC_BASE_SEPOLIA,
    payer: str = PAYER,
    signature: str = SIGNATURE,
) -> dict[str, Any]:
    """A version 2 /verify or /settle body for the exact EVM scheme (spec section 7.1)."""
    requirements = {
        "scheme": "exact",
        "network": network,
        "amount": amount,
        "asset": asset,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    return {
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "resource": {
                "url": "https://api.example.com/premium-data",
                "description": "Access to premium market data",
                "mimeType": "application/json",
            },
            "accepted": requirements,
            "payload": {
                "signature": signature,
                "authorization": {
                    "from": payer,
                    "to": PAY_TO,
                    "value": amount,
                    "validAfter": "1740672089",
                    "validBefore": "1740672154",
                    "nonce": nonce(n),
                },
            },
        },
        "paymentRequirements": requirements,
    }


def v1_request(
    n: int, *, network: str = "base-sepolia", amount: str = "10000", asset: str = USDC_BASE_SEPOLIA
) -> dict[str, Any]:
    """A version 1 /verify or /settle body: network names and ``maxAmountRequired``."""
    return {
        "x402Version": 1,
        "paymentPayload": {
            "x402Version": 1,
            "scheme": "exact",
            "network": network,
            "payload": {
                "signature": SIGNATURE,
                "authorization": {
                    "from": PAYER,
                    "to": PAY_TO,
                    "value": amount,
                    "validAfter": "1740672089",
                    "validBefore": "1740672154",
                    "nonce": nonce(n),
                },
            },
        },
        "paymentRequirements": {
            "scheme": "exact",
            "network": network,
            "maxAmountRequired": amount,
            "resource": "https://api.example.com/premium-data",
            "description": "Access to premium market data",
            "mimeType": "application/json",
            "payTo": PAY_TO,
            "maxTimeoutSeconds": 60,
            "asset": asset,
            "outputSchema": None,
            "extra": {"name": "USDC", "version": "2"},
        },
    }


@dataclass
class FakeFacilitator:
    """An x402 facilitator that answers as told and remembers what it was sent."""

    url: str = ""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        """The facilitator's routes."""
        app = web.Application()
        app.router.add_post("/verify", self._verify)
        app.router.add_post("/settle", self._settle)
        app.router.add_get("/supported", self._supported)
        app.router.add_route("*", "/{path:.*}", self._other)
        return app

    async def _common(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, dict(request.headers), body))
        answer = request.headers.get("X-Fake-Answer", "")
        if answer == "slow":
            await self.release.wait()
        return answer, json.loads(body)

    async def _verify(self, request: web.Request) -> web.Response:
        answer, _ = await self._common(request)
        if answer == "500":
            return web.Response(status=500, text="facilitator exploded")
        if answer == "invalid":
            body = {
                "isValid": False,
                "invalidReason": "insufficient_funds",
                "invalidMessage": "balance 0 < 10000",
                "payer": PAYER,
            }
            return web.json_response(body, status=400, headers={"X-Upstream": "fake"})
        return web.json_response({"isValid": True, "payer": PAYER}, headers={"X-Upstream": "fake"})

    async def _settle(self, request: web.Request) -> web.Response:
        answer, body = await self._common(request)
        network = body["paymentRequirements"]["network"]
        if answer == "500":
            return web.Response(status=503, text="facilitator overloaded")
        if answer == "pending":
            pending = {
                "success": False,
                "errorReason": "settlement_pending",
                "payer": PAYER,
                "transaction": TX,
                "network": network,
            }
            return web.json_response(pending, headers={"X-Upstream": "fake"})
        if answer == "failed":
            failure = {
                "success": False,
                "errorReason": "invalid_exact_evm_payload_authorization_valid_before",
                "payer": PAYER,
                "transaction": "",
                "network": network,
            }
            return web.json_response(failure, headers={"X-Upstream": "fake"})
        success = {"success": True, "payer": PAYER, "transaction": TX, "network": network}
        return web.json_response(success, headers={"X-Upstream": "fake"})

    async def _supported(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, dict(request.headers), b""))
        kinds = [
            {"x402Version": 1, "scheme": "exact", "network": "base-sepolia"},
            {"x402Version": 2, "scheme": "exact", "network": "eip155:84532"},
        ]
        return web.json_response({"kinds": kinds, "extensions": [], "signers": {}})

    async def _other(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, dict(request.headers), body))
        return web.Response(
            status=418, text=f"{request.method} {request.path_qs}", headers={"X-Other": "yes"}
        )


@pytest.fixture
async def upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[FakeFacilitator]:
    """The fake facilitator, listening on a free loopback port."""
    fake = FakeFacilitator()
    server = await aiohttp_server(fake.app(), port=0)
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    fake.release.set()  # let a "slow" handler finish before the server closes


ProxyFactory = Callable[..., Awaitable[AppClient]]


@pytest.fixture
def proxy_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
    upstream: FakeFacilitator,
) -> ProxyFactory:
    """Start the exporter in proxy mode in front of the fake, on deterministic clocks."""

    async def start(**overrides: Any) -> AppClient:
        options: dict[str, Any] = {
            "data_dir": data_dir,
            "listen": "127.0.0.1:0",
            "upstream_facilitator": upstream.url,
            "upstream_timeout_seconds": 0.5,
            "proxy_fee_bps": 100,
        }
        options.update(overrides)
        client = await aiohttp_client(create_app(Settings(**options), registry))
        proxy = client.app[PROXY]
        ticks = itertools.count(0.0, STEP_S)
        proxy.clock = lambda: BASE_MS / 1000
        proxy.timer = lambda: next(ticks)
        return client

    return start


def stored_events(client: AppClient) -> list[dict[str, Any]]:
    """Every event in the ledger, in commit order, as stored (canonical form)."""
    ledger = client.app[COMMITTER].ledger
    return [json.loads(body) for _, _, body in ledger.iter_events()]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric sample's value; 0 when the series does not exist."""
    return registry.get_sample_value(name, labels) or 0.0


def requests(
    registry: CollectorRegistry,
    endpoint: str,
    outcome: str,
    network: str = "unknown",
    scheme: str = "exact",
) -> float:
    """x402_facilitator_requests_total{endpoint,outcome,network,scheme}."""
    return sample(
        registry,
        "x402_facilitator_requests_total",
        endpoint=endpoint,
        outcome=outcome,
        network=network,
        scheme=scheme,
    )


def duration(registry: CollectorRegistry, endpoint: str, suffix: str = "sum") -> float:
    """x402_facilitator_request_duration_seconds_{sum,count}{endpoint}."""
    return sample(
        registry, f"x402_facilitator_request_duration_seconds_{suffix}", endpoint=endpoint
    )


async def post(client: AppClient, path: str, body: dict[str, Any], answer: str) -> Any:
    """POST ``body`` through the proxy, asking the fake for ``answer``."""
    response = await client.post(path, json=body, headers={"X-Fake-Answer": answer})
    await client.app[PROXY].drain()
    return response


def received_event(pid: str, network: str, amount: str = "0.01") -> dict[str, Any]:
    """The ``payment:received`` the proxy derives for the fixtures."""
    return {
        "type": "payment:received",
        "data": {
            "paymentId": pid,
            "payer": PAYER.lower(),
            "payee": PAY_TO.lower(),
            "amount": amount,
            "network": network,
            "timestamp": BASE_MS,
        },
    }


async def test_v2_verify_valid_then_settled(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    response = await post(client, "/verify", v2_request(1), "valid")
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fake"
    assert await response.json() == {"isValid": True, "payer": PAYER}
    response = await post(client, "/settle", v2_request(1), "settled")
    assert response.status == 200
    assert await response.json() == {
        "success": True,
        "payer": PAYER,
        "transaction": TX,
        "network": "eip155:84532",
    }
    pid = payment_id("eip155:84532", 1)
    assert pid.startswith(f"eip155:84532/{USDC_BASE_SEPOLIA.lower()}/{PAYER.lower()}/{nonce(1)}/")
    assert stored_events(client) == [
        received_event(pid, "eip155:84532"),
        {
            "type": "payment:verified",
            "data": {"paymentId": pid, "verificationTime": 250.0, "timestamp": BASE_MS},
        },
        {
            "type": "payment:settled",
            "data": {
                "paymentId": pid,
                "transaction": TX,
                "fee": "0.0001",  # 100 basis points of 0.01
                "settlementTime": 250.0,
                "timestamp": BASE_MS,
                "network": "eip155:84532",
            },
        },
    ]
    net = "eip155:84532"
    assert requests(registry, "verify", "valid", net) == 1
    assert requests(registry, "settle", "settled", net) == 1
    assert sample(registry, "facilitator_payments_total", network=net, status="success") == 1
    assert sample(registry, "facilitator_volume_usd_total", network=net) == 0.01
    assert sample(registry, "facilitator_fees_usd_total", network=net) == 0.0001
    assert sample(registry, "facilitator_pending_payments", network=net) == 0
    assert sample(registry, "facilitator_settlement_duration_seconds_sum", network=net) == 0.25
    assert duration(registry, "verify", "count") == 1
    assert duration(registry, "settle") == STEP_S
    assert sample(registry, "exporter_events_received_total", type="payment:verified") == 1


async def test_v2_verify_invalid_records_a_failure(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    response = await post(client, "/verify", v2_request(2), "invalid")
    assert response.status == 400  # the upstream's status, unchanged
    assert (await response.json())["invalidReason"] == "insufficient_funds"
    pid = payment_id("eip155:84532", 2)
    assert stored_events(client) == [
        received_event(pid, "eip155:84532"),
        {
            "type": "payment:failed",
            "data": {
                "paymentId": pid,
                "error": "insufficient_funds: balance 0 < 10000",
                "timestamp": BASE_MS,
                "network": "eip155:84532",
            },
        },
    ]
    net = "eip155:84532"
    assert requests(registry, "verify", "invalid", net) == 1
    assert sample(registry, "facilitator_payments_total", network=net, status="failed") == 1
    assert sample(registry, "facilitator_pending_payments", network=net) == 0


async def test_v1_settle_failed_maps_the_network_name(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    response = await post(client, "/settle", v1_request(3), "failed")
    assert response.status == 200
    body = await response.json()
    assert body["success"] is False and body["network"] == "base-sepolia"
    pid = payment_id("eip155:84532", 3)
    assert stored_events(client) == [
        received_event(pid, "eip155:84532"),
        {
            "type": "payment:failed",
            "data": {
                "paymentId": pid,
                "error": "invalid_exact_evm_payload_authorization_valid_before",
                "timestamp": BASE_MS,
                "network": "eip155:84532",
            },
        },
    ]
    assert requests(registry, "settle", "failed", "eip155:84532") == 1
    net = "eip155:84532"
    assert sample(registry, "facilitator_payments_total", network=net, status="failed") == 1


async def test_v1_verify_and_settle_on_base_join(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client(proxy_fee_bps=0)
    request = v1_request(4, network="base", amount="1500000", asset=USDC_BASE)
    assert (await post(client, "/verify", request, "valid")).status == 200
    assert (await post(client, "/settle", request, "settled")).status == 200
    events = stored_events(client)
    pid = payment_id("eip155:8453", 4, USDC_BASE)
    assert [e["type"] for e in events] == [
        "payment:received",
        "payment:verified",
        "payment:settled",
    ]
    assert events[0] == received_event(pid, "eip155:8453", amount="1.5")
    assert {e["data"]["paymentId"] for e in events} == {pid}
    assert events[2]["data"]["fee"] == "0"
    assert requests(registry, "verify", "valid", "eip155:8453") == 1
    assert requests(registry, "settle", "settled", "eip155:8453") == 1
    assert sample(registry, "facilitator_volume_usd_total", network="eip155:8453") == 1.5
    assert sample(registry, "facilitator_fees_usd_total", network="eip155:8453") == 0


async def test_a_repeated_verify_is_recorded_once(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    for _ in range(3):
        assert (await post(client, "/verify", v2_request(5), "valid")).status == 200
    assert [e["type"] for e in stored_events(client)] == ["payment:received", "payment:verified"]
    assert requests(registry, "verify", "valid", "eip155:84532") == 3
    assert sample(registry, "facilitator_pending_payments", network="eip155:84532") == 1


async def test_slow_upstream_times_out_with_504_and_records_nothing(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client(upstream_timeout_seconds=0.2)
    client.app[PROXY].timer = time.perf_counter
    response = await post(client, "/settle", v2_request(6), "slow")
    assert response.status == 504
    body = await response.json()
    assert body["error"] == "the upstream facilitator did not answer within 0.2 s"
    assert body["endpoint"] == "/settle"
    assert stored_events(client) == []
    assert requests(registry, "settle", "timeout", "eip155:84532") == 1
    assert 0.2 <= duration(registry, "settle") < 5


async def test_a_body_slower_than_the_read_timeout_is_a_408_and_not_forwarded(
    proxy_client: ProxyFactory, upstream: FakeFacilitator
) -> None:
    client = await proxy_client(body_read_timeout_seconds=0.3)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /settle HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    started = time.monotonic()
    try:
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 408"), status
        assert 0.3 <= time.monotonic() - started < 2
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1)
        assert b"Connection: close" in head
        length = int(head.partition(b"Content-Length: ")[2].partition(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 1)
        assert json.loads(body)["error"] == "the request body did not arrive within 0.3 s"
    finally:
        writer.close()
    assert upstream.seen == []
    assert stored_events(client) == []


async def test_upstream_5xx_passes_through_and_records_nothing(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    response = await post(client, "/verify", v2_request(7), "500")
    assert response.status == 500
    assert await response.text() == "facilitator exploded"
    response = await post(client, "/settle", v1_request(7), "500")
    assert response.status == 503
    assert await response.text() == "facilitator overloaded"
    assert stored_events(client) == []
    assert requests(registry, "verify", "upstream_error", "eip155:84532") == 1
    assert requests(registry, "settle", "upstream_error", "eip155:84532") == 1


async def test_unreachable_upstream_is_a_502_with_a_clear_body(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", upstream_facilitator=upstream)
    client = await aiohttp_client(create_app(settings, registry))
    response = await client.post("/verify", json=v2_request(8))
    assert response.status == 502
    body = await response.json()
    assert body["error"].startswith("the upstream facilitator is unreachable: ")
    assert (body["upstream"], body["endpoint"]) == (upstream, "/verify")
    assert requests(registry, "verify", "unreachable", "eip155:84532") == 1
    response = await client.get("/supported")
    assert response.status == 502
    assert requests(registry, "supported", "unreachable", scheme="unknown") == 1


async def test_supported_and_other_paths_pass_through(
    proxy_client: ProxyFactory, registry: CollectorRegistry, upstream: FakeFacilitator
) -> None:
    client = await proxy_client()
    response = await client.get("/supported", headers={"Authorization": "Bearer cdp-jwt"})
    assert response.status == 200
    assert (await response.json())["kinds"][1]["network"] == "eip155:84532"
    assert upstream.seen[-1][2]["Authorization"] == "Bearer cdp-jwt"
    response = await client.request("PUT", "/discovery/resources?type=http&limit=1", data=b"x")
    assert response.status == 418
    assert response.headers["X-Other"] == "yes"
    assert await response.text() == "PUT /discovery/resources?type=http&limit=1"
    assert upstream.seen[-1][3] == b"x"
    # The exporter's own routes stay its own.
    assert (await client.get("/healthz")).status == 200
    assert requests(registry, "supported", "ok", scheme="unknown") == 1
    assert requests(registry, "other", "client_error", scheme="unknown") == 1
    assert stored_events(client) == []


async def test_configured_decimals_and_unknown_assets(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    usdt_bsc = "0x55d398326f99059fF775485246999027B3197955"
    client = await proxy_client(proxy_asset_decimals={f"eip155:56/{usdt_bsc}": 18})
    request = v2_request(9, network="eip155:56", amount="2500000000000000000", asset=usdt_bsc)
    assert (await post(client, "/verify", request, "valid")).status == 200
    pid = payment_id("eip155:56", 9, usdt_bsc)
    assert stored_events(client)[0] == received_event(pid, "eip155:56", amount="2.5")
    unknown = v2_request(10, network="eip155:56", asset="0x" + "e" * 40)
    response = await post(client, "/verify", unknown, "valid")
    assert response.status == 200
    assert len(stored_events(client)) == 2  # nothing more
    failures = "x402_proxy_recording_failures_total"
    assert sample(registry, failures, reason="unknown_asset") == 1
    assert requests(registry, "verify", "valid", "eip155:56") == 2
    odd = v2_request(11, network="eip155:999999")
    await post(client, "/verify", odd, "valid")
    assert requests(registry, "verify", "valid", "other") == 1  # no unbounded labels


async def test_recording_failure_never_changes_the_answer(
    proxy_client: ProxyFactory, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await proxy_client()

    async def refuse(submission: Submission) -> SubmissionResult:
        raise LedgerUnavailableError("disk full")

    monkeypatch.setattr(client.app[COMMITTER], "submit", refuse)
    response = await post(client, "/verify", v2_request(12), "valid")
    assert response.status == 200
    assert await response.json() == {"isValid": True, "payer": PAYER}
    failures = "x402_proxy_recording_failures_total"
    assert sample(registry, failures, reason="ledger_unavailable") == 1
    assert stored_events(client) == []
    # Once the ledger is back, the payment is recorded in full: nothing was marked as done.
    monkeypatch.undo()
    await post(client, "/verify", v2_request(12), "valid")
    assert [e["type"] for e in stored_events(client)] == ["payment:received", "payment:verified"]


async def test_unparseable_body_is_forwarded_and_counted(
    proxy_client: ProxyFactory, registry: CollectorRegistry, upstream: FakeFacilitator
) -> None:
    client = await proxy_client()
    response = await client.post(
        "/settle",
        data=b'{"paymentRequirements": {"network": "base"}}',
        headers={"Content-Type": "application/json", "X-Fake-Answer": "failed"},
    )
    await client.app[PROXY].drain()
    assert response.status == 200
    assert upstream.seen[-1][3] == b'{"paymentRequirements": {"network": "base"}}'
    assert sample(registry, "x402_proxy_recording_failures_total", reason="unparseable") == 1
    assert stored_events(client) == []


def test_settings_and_cli_flag() -> None:
    args = build_parser().parse_args(["serve", "--upstream-facilitator", "https://x402.org/f/"])
    assert settings_from_args(args).upstream_facilitator == "https://x402.org/f"
    assert Settings().upstream_facilitator is None
    with pytest.raises(ValidationError, match="http:// or https:// URL"):
        Settings(upstream_facilitator="x402.org")
    with pytest.raises(ValidationError, match="asset address"):
        Settings(proxy_asset_decimals={"base/0xabc": 6})
    decimals = Settings(proxy_asset_decimals={"eip155:56/0xABC": 18, "0xDEF": 18})
    assert decimals.proxy_asset_decimals == {"eip155:56/0xabc": 18, "0xdef": 18}
    with pytest.raises(ValidationError):
        Settings(proxy_fee_bps=10_001)


async def test_settlement_pending_is_not_a_failure_and_the_retry_settles(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    await post(client, "/verify", v2_request(20), "valid")
    await post(client, "/settle", v2_request(20), "pending")
    net = "eip155:84532"
    assert [e["type"] for e in stored_events(client)] == ["payment:received", "payment:verified"]
    assert requests(registry, "settle", "pending", net) == 1
    assert sample(registry, "facilitator_pending_payments", network=net) == 1
    await post(client, "/settle", v2_request(20), "settled")
    assert [e["type"] for e in stored_events(client)][-1] == "payment:settled"
    assert sample(registry, "facilitator_payments_total", network=net, status="success") == 1
    assert sample(registry, "facilitator_payments_total", network=net, status="failed") == 0
    assert sample(registry, "facilitator_pending_payments", network=net) == 0


async def test_two_payers_with_one_nonce_are_two_payments(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    other = "0x1111111111111111111111111111111111111111"
    for payer in (PAYER, other):
        await post(client, "/verify", v2_request(21, payer=payer), "valid")
        await post(client, "/settle", v2_request(21, payer=payer), "settled")
    net = "eip155:84532"
    assert sample(registry, "facilitator_payments_total", network=net, status="success") == 2
    assert sample(registry, "facilitator_volume_usd_total", network=net) == 0.02
    settled = {
        e["data"]["paymentId"] for e in stored_events(client) if e["type"] == "payment:settled"
    }
    assert settled == {payment_id(net, 21), payment_id(net, 21, payer=other)}


async def test_a_forged_copy_of_a_pending_authorization_cannot_fail_the_real_payment(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    await post(client, "/verify", v2_request(22), "valid")
    forged = v2_request(22, signature="0x" + "ab" * 65)
    await post(client, "/verify", forged, "invalid")
    await post(client, "/settle", v2_request(22), "settled")
    events = stored_events(client)
    real = payment_id("eip155:84532", 22)
    assert [e["type"] for e in events if e["data"]["paymentId"] == real] == [
        "payment:received",
        "payment:verified",
        "payment:settled",
    ]
    net = "eip155:84532"
    assert sample(registry, "facilitator_payments_total", network=net, status="success") == 1


async def test_a_replayed_settle_of_a_settled_payment_records_nothing_new(
    proxy_client: ProxyFactory, registry: CollectorRegistry
) -> None:
    client = await proxy_client()
    await post(client, "/settle", v2_request(23), "settled")
    before = stored_events(client)
    await post(client, "/settle", v2_request(23), "failed")
    await post(client, "/settle", v2_request(23), "settled")
    assert stored_events(client) == before
    net = "eip155:84532"
    assert sample(registry, "facilitator_payments_total", network=net, status="success") == 1
    assert sample(registry, "facilitator_payments_total", network=net, status="failed") == 0


@pytest.mark.parametrize(
    ("name", "caip2", "asset"),
    [
        ("monad", "eip155:143", "0x754704Bc059F8C67012fEd69BC8A327a5aafb603"),
        ("celo", "eip155:42220", "0xcebA9300f2b948710d2653dD7B07f33A8B32118C"),
        ("stable-testnet", "eip155:2201", "0x78Cf24370174180738C5B8E352B6D14c83a6c9A9"),
    ],
)
async def test_v1_names_the_sdks_added_later_are_recorded(
    proxy_client: ProxyFactory, registry: CollectorRegistry, name: str, caip2: str, asset: str
) -> None:
    client = await proxy_client()
    await post(client, "/settle", v1_request(24, network=name, asset=asset), "settled")
    assert sample(registry, "facilitator_payments_total", network=caip2, status="success") == 1
    assert stored_events(client)[0]["data"]["network"] == caip2
