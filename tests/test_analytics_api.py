"""The analytics JSON API, the cached gauges and the write-back, through the whole app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import AppClient, async_wait_until, failed, free_port, received, settled
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.analytics import Analytics
from exporter.analytics.duckdb import DuckDBAnalyticsSource
from exporter.analytics.flux import FluxAnalyticsSource
from exporter.analytics.service import AnalyticsAPI, AnalyticsService
from exporter.app import ANALYTICS, COMMITTER, STORE
from exporter.errors import StoreError
from exporter.store.duckdb import DuckDBStore

HOUR = 3_600_000


def _scenario(now_ms: int) -> list[dict[str, Any]]:
    """Two settled payments and one failure in the last hour, on two networks."""
    return [
        received("a", now_ms - 50 * 60_000, amount="2.00", network="eip155:8453"),
        settled("a", now_ms - 49 * 60_000, fee="0.02", settlement_ms=1200),
        received("b", now_ms - 40 * 60_000, amount="1.00", network="eip155:10"),
        settled("b", now_ms - 39 * 60_000, fee="0.01", settlement_ms=3400),
        received("c", now_ms - 30 * 60_000, amount="5.00", network="eip155:10"),
        failed("c", now_ms - 29 * 60_000),
    ]


async def _ingest_and_drain(client: AppClient, events: list[dict[str, Any]]) -> None:
    response = await client.post("/v1/events", json=events)
    assert response.status == 202
    ledger = client.app[COMMITTER].ledger

    async def drained() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(drained, what="store caught up")


async def test_on_demand_answer_for_an_instant(client: AppClient) -> None:
    now = int(time.time() * 1000)
    await _ingest_and_drain(client, _scenario(now))
    response = await client.get(f"/v1/analytics/payments?window=1h&at={now}")
    assert response.status == 200
    assert response.headers["X-Analytics-At"] == str(now)
    body = await response.json()
    assert body["totalPayments"] == 3
    assert body["successfulPayments"] == 2
    assert body["failedPayments"] == 1
    assert body["totalVolume"] == "3.000000"
    assert body["totalFees"] == "0.030000"
    assert body["averagePaymentSize"] == "1.500000"
    assert body["p95SettlementTime"] == 3400
    before = await client.get(f"/v1/analytics/payments?window=1h&at={now - HOUR}")
    assert (await before.json())["totalPayments"] == 0


async def test_cached_results_gauges_and_write_back(
    client: AppClient, registry: CollectorRegistry
) -> None:
    now = int(time.time() * 1000)
    await _ingest_and_drain(client, _scenario(now))
    service = client.app[ANALYTICS]
    for key in ("1h", "24h", "realtime"):
        assert await service.scheduler.refresh(key)
    response = await client.get("/v1/analytics/networks?window=1h")
    assert response.status == 200
    assert response.headers["X-Analytics-Stale"] == "false"
    networks = await response.json()
    assert [(n["chainId"], n["chainName"], n["totalPayments"]) for n in networks] == [
        ("eip155:8453", "Base", 1),
        ("eip155:10", "Optimism", 2),
    ]
    assert networks[1]["successRate"] == 50
    limited = await client.get("/v1/analytics/top/payers?window=24h&limit=1")
    assert len(await limited.json()) == 1

    def gauge(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert gauge("facilitator_error_ratio", window="1h") == pytest.approx(1 / 3)
    assert gauge("facilitator_settlement_p95_seconds", window="1h") == pytest.approx(3.4)
    assert gauge("facilitator_revenue_projected_monthly_usd", window="24h") == pytest.approx(0.9)
    assert gauge("facilitator_health_status", status="critical") == 1
    assert gauge("facilitator_health_status", status="healthy") == 0

    store = client.app[STORE]
    assert isinstance(store, DuckDBStore)
    rows = store.query(
        'SELECT name, "window", field, value FROM analytics WHERE "window" = ? ORDER BY name, '
        "field",
        ["24h"],
    )
    assert ("health", "24h", "status", 2.0) in rows
    assert ("revenue", "24h", "projectedMonthlyRevenue", pytest.approx(0.9)) in rows


async def test_bad_requests_name_the_problem(client: AppClient) -> None:
    bad_window = await client.get("/v1/analytics/payments?window=2h")
    assert bad_window.status == 400
    assert "allowed windows: 1h, 6h, 24h, 7d, 30d, 90d" in (await bad_window.json())["error"]
    for limit in ("0", "1001", "ten"):
        response = await client.get(f"/v1/analytics/top/payers?limit={limit}")
        assert response.status == 400
        assert "limit" in (await response.json())["error"]
    unknown = await client.get("/v1/analytics/profits")
    assert unknown.status == 404
    bad_at = await client.get("/v1/analytics/health?at=yesterday")
    assert bad_at.status == 400
    bad_metric = await client.get("/v1/analytics/timeseries?metric=gas")
    assert bad_metric.status == 400


async def test_rfc3339_at_is_accepted(client: AppClient) -> None:
    response = await client.get("/v1/analytics/timeseries?window=6h&at=2026-01-01T06:00:00Z")
    assert response.status == 200
    body = await response.json()
    assert body["aggregation"] == "sum"
    assert [p["timestamp"] for p in body["points"]][-1] == 1_767_247_200_000


async def test_analytics_need_the_token_when_one_is_set(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    client = await aiohttp_client(create_app(Settings(data_dir=data_dir, ingest_token="tkn")))
    assert (await client.get("/v1/analytics/realtime")).status == 401
    allowed = await client.get("/v1/analytics/realtime", headers={"Authorization": "Bearer tkn"})
    assert allowed.status == 200
    assert set(await allowed.json()) == {
        "paymentsPerMinute",
        "revenuePerHour",
        "pendingSettlements",
        "activeConnections",
    }


# ----------------------------------------------------------------------- store unavailable


async def _api_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]], url: str, timeout_seconds: float = 5
) -> tuple[AppClient, AnalyticsService]:
    """The analytics API alone, over a Flux source at ``url``; nothing refreshes, so every
    answer is computed on demand."""
    source = FluxAnalyticsSource.connect(
        url, "test-token", "test-org", "payments", timeout_seconds=timeout_seconds
    )
    service = AnalyticsService(Analytics(source), CollectorRegistry(), None)
    app = web.Application()
    app.router.add_get("/v1/analytics/{name:.+}", AnalyticsAPI(service, None).handle)
    return await aiohttp_client(app), service


async def test_influxdb_down_answers_503_json_naming_it(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client, service = await _api_client(aiohttp_client, url)
    try:
        for name in ("payments", "realtime", "top/payers"):
            response = await client.get(f"/v1/analytics/{name}", params={"window": "1h"})
            assert response.status == 503, await response.text()
            assert response.content_type == "application/json"
            error = (await response.json())["error"]
            assert error.startswith("analytics unavailable: ") and f"{url} is unreachable" in error
            assert "Traceback" not in error
            assert response.headers["Retry-After"] == "15"  # the realtime refresh cadence
    finally:
        await service.stop()


@pytest.mark.parametrize(
    ("status", "retry_after", "says"),
    [
        (500, None, "answered a query 500"),
        (502, None, "answered a query 502"),
        (401, None, "check EXPORTER_INFLUX_TOKEN"),
        (503, "7", "retry after 7s"),
    ],
)
async def test_influxdb_refusing_queries_answers_503_json(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[Any]],
    status: int,
    retry_after: str | None,
    says: str,
) -> None:
    async def query(request: web.Request) -> web.Response:
        headers = {"Retry-After": retry_after} if retry_after else None
        body = {"code": "error", "message": "no"}
        return web.json_response(body, status=status, headers=headers)

    influx = web.Application()
    influx.router.add_post("/api/v2/query", query)
    server = await aiohttp_server(influx)
    client, service = await _api_client(aiohttp_client, str(server.make_url("")))
    try:
        response = await client.get("/v1/analytics/health", params={"window": "24h"})
        assert response.status == 503
        assert says in (await response.json())["error"]
        assert response.headers["Retry-After"] == (retry_after or "15")
    finally:
        await service.stop()


async def test_influxdb_timing_out_answers_503_json(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[Any]],
) -> None:
    answered = asyncio.Event()

    async def query(request: web.Request) -> web.Response:
        await answered.wait()  # never, until the test ends
        return web.json_response({})

    influx = web.Application()
    influx.router.add_post("/api/v2/query", query)
    server = await aiohttp_server(influx)
    client, service = await _api_client(
        aiohttp_client, str(server.make_url("")), timeout_seconds=0.2
    )
    try:
        response = await client.get("/v1/analytics/payments", params={"window": "1h"})
        assert response.status == 503
        assert "did not answer a query within 0.2s" in (await response.json())["error"]
    finally:
        answered.set()
        await service.stop()


async def test_a_closed_source_answers_503_not_a_query(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    client, service = await _api_client(aiohttp_client, f"http://127.0.0.1:{free_port()}")
    await service.stop()
    response = await client.get("/v1/analytics/payments", params={"window": "1h"})
    assert response.status == 503
    assert "are closed" in (await response.json())["error"]


async def test_a_closed_duckdb_source_refuses_queries(tmp_path: Path) -> None:
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    try:
        source = DuckDBAnalyticsSource(store)
        assert (await source.point_in_time(0)).pending_payments == 0
        await source.close()
        with pytest.raises(StoreError, match="are closed"):
            await source.point_in_time(0)
    finally:
        await store.close()


async def test_networks_lists_every_network_cached_or_on_demand(client: AppClient) -> None:
    # ``limit`` belongs to the top lists: the networks analytic lists every network.
    now = int(time.time() * 1000)
    chains = [f"eip155:{chain_id}" for chain_id in range(1000, 1012)]
    events: list[dict[str, Any]] = []
    for n, network in enumerate(chains):
        events.append(received(f"n{n}", now - 60_000, amount="1.00", network=network))
        events.append(settled(f"n{n}", now - 59_000))
    await _ingest_and_drain(client, events)
    on_demand = await client.get(f"/v1/analytics/networks?window=1h&at={now}")
    assert sorted(entry["chainId"] for entry in await on_demand.json()) == sorted(chains)
    assert await client.app[ANALYTICS].scheduler.refresh("1h")
    cached = await client.get("/v1/analytics/networks?window=1h")
    assert cached.headers["X-Analytics-Stale"] == "false"
    assert len(await cached.json()) == len(chains)
    top = await client.get(f"/v1/analytics/top/payers?window=1h&at={now}&limit=1")
    assert len(await top.json()) == 1
