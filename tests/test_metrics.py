"""Metrics: exact values after a known scenario, and a valid exposition."""

from __future__ import annotations

import asyncio
import logging
import subprocess

import pytest
from conftest import (
    BASE_MS,
    AppClient,
    batch_created,
    batch_settled,
    failed,
    received,
    require_tool,
    settled,
    verified,
)
from prometheus_client import CollectorRegistry

from exporter.ledger import GaugeSnapshot
from exporter.metrics import AUTH_LOG_INTERVAL_SECONDS, Metrics
from exporter.networks import OTHER_NETWORK

BASE = "eip155:8453"
OP = "eip155:10"

SCENARIO = [
    received("a", amount="1.50", network=BASE),
    verified("a"),
    settled("a", fee="0.015", settlement_ms=800),
    received("b", amount="2.25", network=BASE),
    settled("b", fee="0.02", settlement_ms=12_000),
    # settled before received: counted on the received's network when it arrives
    settled("c", fee="0.05", settlement_ms=45_000),
    received("c", amount="10", network=OP),
    received("d", amount="3", network=OP),
    failed("d"),
    failed("unknown"),
    failed("unknown", network=OP, error="other"),
    received("e", amount="4", network=OP),  # stays pending
    settled("a", fee="0.015", settlement_ms=800),  # duplicate
    batch_settled("x", gas="150000"),
    batch_created("x", network=OP),
    {"type": "websocket:clients", "data": {"count": 12, "timestamp": BASE_MS + 10}},
    {"type": "websocket:clients", "data": {"count": 3, "timestamp": BASE_MS}},  # older
]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """One sample's value."""
    return registry.get_sample_value(name, labels)


async def test_known_scenario_gives_exact_values(
    client: AppClient, registry: CollectorRegistry
) -> None:
    response = await client.post("/v1/events", json=SCENARIO)
    assert response.status == 202
    assert (await response.json())["duplicates"] == 1

    assert sample(registry, "facilitator_payments_total", network=BASE, status="success") == 2
    assert sample(registry, "facilitator_payments_total", network=OP, status="success") == 1
    assert sample(registry, "facilitator_payments_total", network=OP, status="failed") == 2
    assert sample(registry, "facilitator_payments_total", network="unknown", status="failed") == 1
    assert sample(registry, "facilitator_payments_total", network="batch", status="success") is None
    assert sample(registry, "facilitator_volume_usd_total", network=BASE) == pytest.approx(3.75)
    assert sample(registry, "facilitator_volume_usd_total", network=OP) == pytest.approx(10)
    assert sample(registry, "facilitator_fees_usd_total", network=BASE) == pytest.approx(0.035)
    assert sample(registry, "facilitator_fees_usd_total", network=OP) == pytest.approx(0.05)
    assert sample(registry, "facilitator_settlement_duration_seconds_count", network=BASE) == 2
    assert (
        sample(registry, "facilitator_settlement_duration_seconds_bucket", network=BASE, le="1.0")
        == 1
    )
    assert (
        sample(registry, "facilitator_settlement_duration_seconds_bucket", network=BASE, le="30.0")
        == 2
    )
    assert (
        sample(registry, "facilitator_settlement_duration_seconds_bucket", network=OP, le="30.0")
        == 0
    )
    assert sample(
        registry, "facilitator_settlement_duration_seconds_sum", network=OP
    ) == pytest.approx(45)
    assert sample(registry, "facilitator_gas_used_count", network=OP) == 1
    assert sample(registry, "facilitator_gas_used_bucket", network=OP, le="200000.0") == 1
    assert sample(registry, "facilitator_gas_used_bucket", network=OP, le="100000.0") == 0
    assert sample(registry, "facilitator_pending_payments", network=BASE) == 0
    assert sample(registry, "facilitator_pending_payments", network=OP) == 1
    assert sample(registry, "facilitator_pending_payments", network="unknown") is None
    assert sample(registry, "facilitator_active_websocket_clients") == 12
    assert sample(registry, "exporter_events_received_total", type="payment:settled") == 3
    assert sample(registry, "exporter_events_received_total", type="payment:failed") == 3
    assert sample(registry, "exporter_events_duplicate_total") == 1
    assert sample(registry, "exporter_events_rejected_total", reason="invalid") == 0


async def test_metrics_endpoint_passes_promtool(client: AppClient) -> None:
    promtool = require_tool("promtool")
    await client.post("/v1/events", json=SCENARIO)
    response = await client.get("/metrics")
    assert response.status == 200
    exposition = await response.read()
    assert b"facilitator_payments_total{" in exposition
    check = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


async def test_openmetrics_when_asked(client: AppClient) -> None:
    response = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).rstrip().endswith("# EOF")


async def test_health_and_readiness(client: AppClient) -> None:
    assert (await client.get("/healthz")).status == 200
    await client.post("/v1/events", json=[received("p1"), settled("p2")])
    ready = await client.get("/readyz")
    assert ready.status == 200
    body = await ready.json()
    assert body["status"] == "ready"
    assert body["ledger"]["events"] == 2
    assert body["ledger"]["waitingForJoin"] == 1
    assert body["store"]["name"] == "duckdb"


def test_refused_tokens_log_one_line_per_interval_carrying_the_refusals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    metrics = Metrics(CollectorRegistry(), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="exporter.metrics")
    metrics.auth_failed("ingest", None)
    metrics.auth_failed("ingest", "10.0.0.7")
    now[0] += AUTH_LOG_INTERVAL_SECONDS - 0.5
    metrics.auth_failed("ingest", "10.0.0.7")
    now[0] += 0.5  # exactly one interval after the first line: the next line is due
    metrics.auth_failed("ingest", "10.0.0.8")
    metrics.auth_failed("analytics", "10.0.0.9")
    lines = [
        (r.getMessage(), vars(r)["route"], vars(r)["peer"], vars(r)["refusals"])
        for r in caplog.records
    ]
    assert lines == [
        ("bearer token refused", "ingest", "unknown", 1),
        ("bearer token refused", "ingest", "10.0.0.8", 3),
        ("bearer token refused", "analytics", "10.0.0.9", 1),
    ]
    assert sample(metrics.registry, "exporter_auth_failures_total", route="ingest") == 4


def test_a_tracked_backlog_is_read_at_scrape_time_under_its_store_label() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    backlog = [3]
    metrics.track_backlog("influxdb", lambda: backlog[0])
    backlog[0] = 7
    assert sample(registry, "exporter_ledger_backlog_events", store="influxdb") == 7


def test_restored_pending_counts_of_networks_past_the_bound_add_up_under_other() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_network_labels=1)
    pending = {BASE: 2, OP: 3, "eip155:1": 4}
    metrics.restore(GaugeSnapshot(pending_by_network=pending, websocket_clients=None))
    assert sample(registry, "facilitator_pending_payments", network=BASE) == 2
    assert sample(registry, "facilitator_pending_payments", network=OTHER_NETWORK) == 7
    assert sample(registry, "facilitator_pending_payments", network=OP) is None
    assert sample(registry, "exporter_network_labels_overflow_total") == 2
    assert sample(registry, "facilitator_active_websocket_clients") == 0
