"""Edges of the core logic that mutation testing found unpinned: what a refusal keeps as a
dead letter (reason, message and the exact bytes), the messages of whole-body refusals, and
the pure rules of the analytics and the metrics at their boundaries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from analytics_helpers import delivered
from conftest import BASE_MS, AppClient, failed, received, settled
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.analytics.models import AnalyticKey, PaymentMetrics, Window
from exporter.app import COMMITTER
from exporter.ledger import DeadLetterRow

NDJSON = {"Content-Type": "application/x-ndjson"}
OP = "eip155:10"


def letters(client: AppClient, reason: str) -> list[DeadLetterRow]:
    """The app's dead letters of ``reason``, oldest first."""
    return list(reversed(client.app[COMMITTER].ledger.dead_letters(reason)))


def rejected(registry: CollectorRegistry, reason: str) -> float | None:
    """``exporter_events_rejected_total{reason}``."""
    return registry.get_sample_value("exporter_events_rejected_total", {"reason": reason})


async def test_an_invalid_array_item_is_kept_as_its_compact_json_with_its_error(
    client: AppClient,
) -> None:
    invalid = received("bad", amount="x")
    response = await client.post("/v1/events", json=[received("ok"), invalid])
    assert response.status == 202
    answer = await response.json()
    [rejection] = answer["rejected"]
    [letter] = letters(client, "invalid")
    assert letter.error == rejection["error"]
    assert letter.error.startswith("data.amount:")
    assert letter.raw == json.dumps(invalid, separators=(",", ":")).encode()


async def test_an_invalid_ndjson_line_is_kept_as_the_line_it_came_as(client: AppClient) -> None:
    line = json.dumps(received("bad", amount="x"), indent=None).encode()
    body = json.dumps(received("ok")).encode() + b"\n" + line + b"\n"
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 202
    answer = await response.json()
    assert answer["accepted"] == 1
    assert [r["index"] for r in answer["rejected"]] == [1]
    [letter] = letters(client, "invalid")
    assert (letter.raw, letter.error) == (line, answer["rejected"][0]["error"])


async def test_a_malformed_ndjson_line_refuses_and_keeps_the_whole_body(
    client: AppClient, registry: CollectorRegistry
) -> None:
    good = json.dumps(received("p")).encode()
    body = good + b"\n\n" + b"{oops\n"
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"].startswith("line 3 is not valid JSON: ")
    detail = answer["error"].removeprefix("line 3 is not valid JSON: ")
    assert answer["rejected"] == [{"index": 1, "error": f"line 3: {detail}"}]
    [letter] = letters(client, "malformed")
    assert (letter.raw, letter.error) == (body, answer["error"])
    assert rejected(registry, "malformed") == 1


async def test_an_empty_array_is_422_saying_so(
    client: AppClient, registry: CollectorRegistry
) -> None:
    response = await client.post("/v1/events", json=[])
    assert response.status == 422
    assert await response.json() == {
        "accepted": 0,
        "duplicates": 0,
        "rejected": [],
        "error": "the body holds no events",
    }
    assert rejected(registry, "invalid") == 0


async def test_a_chunked_body_over_the_limit_keeps_its_head(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", max_body_bytes=2048)
    client = await aiohttp_client(create_app(settings, registry))
    piece = b"[" + b" " * 2999

    async def chunks() -> Any:
        yield piece
        await asyncio.sleep(0)
        yield b"]"

    response = await client.post(
        "/v1/events", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 413
    assert (await response.json())["error"] == "body is over the limit of 2048 bytes"
    [letter] = letters(client, "too_large")
    assert letter.error == "body is over the limit of 2048 bytes"
    assert letter.raw == piece + b"]"  # all of it came before the check: all of it is kept


async def test_a_restarted_app_restores_the_gauges_from_the_ledger(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0")
    first = await aiohttp_client(create_app(settings, CollectorRegistry()))
    clients = {"type": "websocket:clients", "data": {"count": 7, "timestamp": BASE_MS}}
    events = [received("a"), received("b"), received("c", network=OP), clients]
    assert (await first.post("/v1/events", json=events)).status == 202
    await first.close()

    registry = CollectorRegistry()
    await aiohttp_client(create_app(settings, registry))
    pending = "facilitator_pending_payments"
    assert registry.get_sample_value(pending, {"network": "eip155:8453"}) == 2
    assert registry.get_sample_value(pending, {"network": OP}) == 1
    assert registry.get_sample_value("facilitator_active_websocket_clients") == 7


async def test_volume_and_fees_are_exact_to_the_micro_unit(
    client: AppClient, registry: CollectorRegistry
) -> None:
    events = [
        received("a", amount="0.000001"),
        settled("a", fee="0.000001"),
        received("b", amount="2.000003", network=OP),
        settled("b", fee="0"),
    ]
    assert (await client.post("/v1/events", json=events)).status == 202
    volume, fees = "facilitator_volume_usd_total", "facilitator_fees_usd_total"
    assert registry.get_sample_value(volume, {"network": "eip155:8453"}) == 0.000001
    assert registry.get_sample_value(fees, {"network": "eip155:8453"}) == 0.000001
    assert registry.get_sample_value(volume, {"network": OP}) == 2.000003
    assert registry.get_sample_value(fees, {"network": OP}) == 0


async def test_one_settled_payment_is_every_percentile_of_the_snapshot(tmp_path: Path) -> None:
    events = [received("a", amount="2.50"), settled("a", settlement_ms=1234)]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        snapshot = await analytics.compute_all(BASE_MS + 10_000)
    answer = snapshot[AnalyticKey("payments", Window.H1)]
    assert isinstance(answer, PaymentMetrics)
    assert answer.successfulPayments == 1
    assert (answer.p95SettlementTime, answer.p99SettlementTime) == (1234, 1234)
    assert answer.medianPaymentSize == "2.500000"


async def test_revenue_per_hour_is_this_utc_hours_fees_only(tmp_path: Path) -> None:
    minute = 60_000
    events = [
        received("before", BASE_MS - 20 * minute),
        settled("before", BASE_MS - 10 * minute, fee="0.05"),  # the previous UTC hour
        received("now", BASE_MS + 20 * minute),
        settled("now", BASE_MS + 30 * minute, fee="0.02"),
    ]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        stats = await analytics.realtime(BASE_MS + 40 * minute)
        later = await analytics.realtime(BASE_MS + 90 * minute)  # nothing settled this hour
    assert stats.revenuePerHour == "0.020000"
    assert later.revenuePerHour == "0.000000"


def _party(digit: str) -> str:
    return "0x" + digit * 40


async def test_top_lists_order_by_amount_then_address(tmp_path: Path) -> None:
    a, b, c, x, y, z = (_party(d) for d in "abc123")
    events: list[dict[str, Any]] = []
    for pid, payer, payee, amount in [
        ("1", b, y, "1.00"),
        ("2", c, z, "3.00"),
        ("3", a, x, "3.00"),
    ]:
        events += [received(pid, amount=amount, payer=payer, payee=payee), settled(pid)]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        at = BASE_MS + 10_000
        payers = await analytics.top_payers(Window.H1, at)
        payees = await analytics.top_payees(Window.H1, at)
        routes = await analytics.top_routes(Window.H1, at)
        first_two = await analytics.top_routes(Window.H1, at, limit=2)
    assert [(p.address, p.totalPaid) for p in payers] == [
        (a, "3.000000"),
        (c, "3.000000"),
        (b, "1.000000"),
    ]
    assert [(p.address, p.totalReceived) for p in payees] == [
        (x, "3.000000"),
        (z, "3.000000"),
        (y, "1.000000"),
    ]
    assert [(r.payer, r.payee, r.volume) for r in routes] == [
        (a, x, "3.000000"),
        (c, z, "3.000000"),
        (b, y, "1.000000"),
    ]
    assert first_two == routes[:2]


async def test_time_series_per_hour_for_each_metric(tmp_path: Path) -> None:
    hour = 3_600_000
    events = [
        received("a", BASE_MS + 60_000, amount="2.50"),
        settled("a", BASE_MS + 120_000, fee="0.25"),
        received("b", BASE_MS + 180_000, amount="1.25"),
        settled("b", BASE_MS + 240_000, fee="0.125"),
        received("c", BASE_MS + 2 * hour + 60_000, amount="4.00"),
        settled("c", BASE_MS + 2 * hour + 120_000, fee="0.5"),
    ]
    at = BASE_MS + 2 * hour + 30 * 60_000
    async with delivered(events, tmp_path, "duckdb") as analytics:
        series = {
            metric: await analytics.timeseries(Window.H6, at, metric)
            for metric in ("payments", "volume", "fees")
        }
    starts = [BASE_MS + k * hour for k in range(-4, 3)]  # from the hour of at - 6 h
    for metric, series_of in series.items():
        assert series_of.name == metric
        assert series_of.aggregation == ("count" if metric == "payments" else "sum")
        assert [p.timestamp for p in series_of.points] == starts
    values = {metric: [p.value for p in s.points] for metric, s in series.items()}
    assert values["payments"] == [0, 0, 0, 0, 2, 0, 1]
    assert values["volume"] == [0, 0, 0, 0, 3.75, 0, 4.0]
    assert values["fees"] == [0, 0, 0, 0, 0.375, 0, 0.5]


async def test_health_and_payments_of_an_empty_window_and_of_failures_only(
    tmp_path: Path,
) -> None:
    events = [
        received("a", BASE_MS),
        settled("a", BASE_MS + 10, settlement_ms=1000),
        received("b", BASE_MS + 20),
        settled("b", BASE_MS + 30, settlement_ms=4000),
        received("c", BASE_MS + 3 * 3_600_000),
        failed("c", BASE_MS + 3 * 3_600_000 + 10),
    ]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        busy = await analytics.health(Window.H1, BASE_MS + 60_000)
        empty = await analytics.health(Window.H1, BASE_MS + 2 * 3_600_000)
        failures_only = await analytics.payments(Window.H1, BASE_MS + 3 * 3_600_000 + 60_000)
    assert (busy.status, busy.errorRate, busy.averageSettlementTime) == ("healthy", 0.0, 2500.0)
    assert (empty.status, empty.errorRate, empty.averageSettlementTime) == ("healthy", 0.0, 0.0)
    assert (failures_only.failedPayments, failures_only.averageSettlementTime) == (1, 0.0)
    assert (failures_only.medianPaymentSize, failures_only.p95SettlementTime) == ("0.000000", 0)
