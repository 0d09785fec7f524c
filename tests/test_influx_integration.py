"""Against a real InfluxDB 2.x: a scenario written through the exporter, read back with Flux.

Runs when ``EXPORTER_TEST_INFLUX_URL``, ``_TOKEN``, ``_ORG`` and ``_BUCKET`` are set
(``docker compose --profile test run --rm tests`` starts ``influxdb:2.7`` and sets them);
skipped with that reason otherwise. CI lets only these ``needs_influxdb`` tests skip.

Every run writes under its own id (payment ids, batch ids, a network of its own) in the
last hour, so runs against one bucket never see each other's points.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import BASE_MS, AppClient, async_wait_until
from fluxcheck import assert_flux_valid
from influx_helpers import SKIP_REASON, TARGET, InfluxTarget, rows_query
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.records import BatchRecord, StoreRecord
from exporter.store.influx.store import InfluxStore

pytestmark = pytest.mark.needs_influxdb


@pytest.fixture
def target() -> InfluxTarget:
    """The InfluxDB under test, or a skip naming the variables."""
    if TARGET is None:
        pytest.skip(SKIP_REASON)
    return TARGET


@pytest.fixture
async def influx(target: InfluxTarget) -> AsyncIterator[InfluxDBClientAsync]:
    """The official async client, for reading back with Flux."""
    client = InfluxDBClientAsync(url=target.url, token=target.token, org=target.org)
    yield client
    await cast(Callable[[], Awaitable[None]], client.close)()


async def _flux(client: InfluxDBClientAsync, query: str) -> list[dict[str, Any]]:
    """Rows of a Flux query, each a dict of column values."""
    tables = await cast(Callable[[str], Awaitable[Any]], client.query_api().query)(query)
    return [dict(record.values) for table in tables for record in table.records]


async def test_scenario_written_through_the_exporter_reads_back_with_flux(
    target: InfluxTarget,
    influx: InfluxDBClientAsync,
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    tmp_path: Path,
) -> None:
    """Every event becomes one enriched point; ids are fields, money integer micro-units."""
    run = uuid.uuid4().hex[:8]
    network = f"test:{run}"
    base = int(time.time() * 1000) - 3_600_000
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        store="influxdb",
        influx_url=target.url,
        influx_token=target.token,
        influx_org=target.org,
        influx_bucket=target.bucket,
    )
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    payer, payee = "0x" + "a" * 40, "0x" + "b" * 40
    tx = "0x" + "c" * 64
    events: list[dict[str, Any]] = [
        {
            "type": "payment:received",
            "data": {
                "paymentId": f"{run}-1",
                "payer": payer,
                "payee": payee,
                "amount": "1.50",
                "network": network,
                "timestamp": base,
            },
        },
        # Same tags, same millisecond, another payment: must stay a point of its own.
        {
            "type": "payment:received",
            "data": {
                "paymentId": f"{run}-2",
                "payer": payer,
                "payee": payee,
                "amount": "2.25",
                "network": network,
                "timestamp": base,
            },
        },
        {
            "type": "payment:verified",
            "data": {"paymentId": f"{run}-1", "verificationTime": 120, "timestamp": base + 100},
        },
        {
            "type": "payment:settled",
            "data": {
                "paymentId": f"{run}-1",
                "transaction": tx,
                "fee": "0.01",
                "settlementTime": 1500,
                "timestamp": base + 2000,
            },
        },
        {
            "type": "payment:failed",
            "data": {
                "paymentId": f"{run}-2",
                "error": 'nonce "too low", retry = no',
                "timestamp": base + 2500,
            },
        },
        {
            "type": "batch:created",
            "data": {
                "batchId": f"{run}-b",
                "paymentCount": 2,
                "totalAmount": "3.75",
                "network": network,
                "timestamp": base + 3000,
            },
        },
        {
            "type": "batch:settled",
            "data": {
                "batchId": f"{run}-b",
                "transaction": tx,
                "totalFees": "0.02",
                "gasUsed": "84000",
                "timestamp": base + 5000,
            },
        },
        {
            "type": "revenue:recorded",
            "data": {
                "kind": "premium",
                "amount": "0.25",
                "network": network,
                "timestamp": base + 6000,
                "paymentId": f"{run}-1",
            },
        },
    ]
    answer = await client.post("/v1/events", json=events)
    assert answer.status == 202, await answer.text()
    ledger = client.app[COMMITTER].ledger

    async def delivered() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(delivered, within=30, what="delivery to InfluxDB")
    ready = await (await client.get("/readyz")).json()
    assert ready["store"]["name"] == "influxdb" and ready["store"]["reachable"] is True

    async def rows(measurement: str) -> list[dict[str, Any]]:
        query = rows_query(target.bucket, measurement, network, base - 1, base + 10_000)
        return await _flux(influx, query)

    payments = await rows("payment")
    assert [(r["status"], r["payment_id"]) for r in payments] in (
        [
            ("received", f"{run}-1"),
            ("received", f"{run}-2"),
            ("verified", f"{run}-1"),
            ("settled", f"{run}-1"),
            ("failed", f"{run}-2"),
        ],
        [
            ("received", f"{run}-2"),
            ("received", f"{run}-1"),
            ("verified", f"{run}-1"),
            ("settled", f"{run}-1"),
            ("failed", f"{run}-2"),
        ],
    )
    by_status = {r["status"]: r for r in payments if r["payment_id"] == f"{run}-1"}
    settled = by_status["settled"]
    assert settled["amount_micro"] == 1_500_000 and isinstance(settled["amount_micro"], int)
    assert settled["fee_micro"] == 10_000
    assert settled["settlement_ms"] == 1500.0 and isinstance(settled["settlement_ms"], float)
    assert (settled["payer"], settled["payee"], settled["tx"]) == (payer, payee, tx)
    assert by_status["verified"]["verification_ms"] == 120.0
    failed = next(r for r in payments if r["status"] == "failed")
    assert failed["error"] == 'nonce "too low", retry = no'
    assert failed["amount_micro"] == 2_250_000  # enriched from its payment:received

    batches = await rows("batch")
    assert [(r["status"], r["batch_id"]) for r in batches] == [
        ("created", f"{run}-b"),
        ("settled", f"{run}-b"),
    ]
    assert batches[1]["gas_used"] == 84_000 and batches[1]["total_amount_micro"] == 3_750_000
    revenue = await rows("revenue")
    assert [(r["kind"], r["amount_micro"], r["payment_id"]) for r in revenue] == [
        ("premium", 250_000, f"{run}-1"),
    ]


@pytest.fixture
async def store(target: InfluxTarget) -> AsyncIterator[InfluxStore]:
    """The store aimed at the real InfluxDB."""
    influx_store = InfluxStore(target.url, target.token, target.org, target.bucket)
    yield influx_store
    await influx_store.close()


def _batch(run: str, i: int, ms: int, gas: int) -> StoreRecord:
    return BatchRecord(
        f"batch:settled:{run}-{i}", ms, f"test:{run}", "settled", f"{run}-{i}", 1, 1_000, 10, gas
    )


async def test_replay_overwrites_and_a_poison_line_is_isolated(
    target: InfluxTarget, influx: InfluxDBClientAsync, store: InfluxStore
) -> None:
    """Writing a batch twice leaves one point each; a value InfluxDB cannot parse (gas
    beyond int64) comes back as a rejection with InfluxDB's own message."""
    run = uuid.uuid4().hex[:8]
    base = int(time.time() * 1000) - 3_600_000
    records = [_batch(run, i, base + i // 2, 21_000 + i) for i in range(20)]
    poison = _batch(run, 99, base, 10**20)
    refused = await store.write([*records[:7], poison, *records[7:]])
    assert [r.record.key for r in refused] == [poison.key]
    assert "out of range" in refused[0].reason or "unable to parse" in refused[0].reason
    assert await store.write(records) == []  # the outbox replayed after a crash
    query = rows_query(target.bucket, "batch", f"test:{run}", base - 1, base + 100)
    rows = await _flux(influx, query)
    assert sorted(r["batch_id"] for r in rows) == sorted(f"{run}-{i}" for i in range(20))


async def test_check_accepts_the_real_token_and_refuses_another(
    target: InfluxTarget, store: InfluxStore
) -> None:
    """What ``check-config --ping`` reports against the real server."""
    check = await store.check()
    assert check.reachable and check.credentials == "accepted", check
    wrong = InfluxStore(target.url, "not-the-token", target.org, target.bucket)
    try:
        refused = await wrong.check()
    finally:
        await wrong.close()
    assert refused.reachable and refused.credentials == "refused", refused


def test_integration_suite_flux_type_checks() -> None:
    """The Flux the integration suite reads back with compiles (checked without a server)."""
    query = rows_query("payments", "payment", 'test:"quoted"', BASE_MS, BASE_MS + 10_000)
    assert_flux_valid({"rows_query": query}, preamble="")
