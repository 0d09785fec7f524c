"""A payment ends once: a second settled or failed event is a conflict, whatever its id."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from conftest import AppClient, async_wait_until, failed, received, settled
from facilitator_helpers import (
    NETWORK,
    ScriptedFacilitator,
    payment_id,
    start_proxy,
    through,
)
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER, STORE
from exporter.store.duckdb import DuckDBStore

BASE = "eip155:8453"


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def _payment_records(client: AppClient) -> list[tuple[str, str]]:
    """(status, payment id) of every payment record the store holds, once the ledger has
    delivered all it committed (the forwarder runs meanwhile: the outbox may be empty)."""
    ledger = client.app[COMMITTER].ledger

    async def drained() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(drained, what="outbox drained")
    store = client.app[STORE]
    assert isinstance(store, DuckDBStore)
    rows = store.query("SELECT status, payment_id FROM payment ORDER BY time_ms")
    return [(str(status), str(payment)) for status, payment in rows]


async def test_a_failure_after_a_settlement_is_a_conflict(
    client: AppClient, registry: CollectorRegistry
) -> None:
    await client.post("/v1/events", json=[received("p1"), settled("p1")])
    response = await client.post("/v1/events", json={**failed("p1"), "id": "late-failure"})
    assert response.status == 409
    [letter] = client.app[COMMITTER].ledger.dead_letters("conflict")
    assert "already ended" in letter.error
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="success") == 1
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="failed") == 0
    assert _sample(registry, "exporter_events_rejected_total", reason="conflict") == 1
    assert await _payment_records(client) == [("received", "p1"), ("settled", "p1")]


async def test_a_settlement_after_a_failure_is_a_conflict(
    client: AppClient, registry: CollectorRegistry
) -> None:
    await client.post("/v1/events", json=[received("p1"), failed("p1")])
    response = await client.post("/v1/events", json=settled("p1"))
    assert response.status == 409
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="success") == 0
    assert _sample(registry, "facilitator_volume_usd_total", network=BASE) == 0


async def test_two_endings_waiting_for_their_payment_count_once(
    client: AppClient, registry: CollectorRegistry
) -> None:
    first = await client.post("/v1/events", json=settled("p1"))
    second = await client.post("/v1/events", json=failed("p1"))
    assert (first.status, second.status) == (202, 409)
    await client.post("/v1/events", json=received("p1"))
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="success") == 1
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="failed") == 0
    assert _sample(registry, "facilitator_pending_payments", network=BASE) == 0


async def test_a_payment_ends_once_across_a_restart(
    aiohttp_client: Callable[..., Awaitable[AppClient]], settings: Settings
) -> None:
    before = await aiohttp_client(create_app(settings, CollectorRegistry()))
    await before.post("/v1/events", json=[received("p1"), settled("p1")])
    await before.close()
    registry = CollectorRegistry()
    after = await aiohttp_client(create_app(settings, registry))
    for event in ({**settled("p1", fee="5"), "id": "x"}, failed("p1")):
        response = await after.post("/v1/events", json=event)
        assert response.status == 409
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="failed") == 0
    assert _sample(registry, "exporter_events_rejected_total", reason="conflict") == 2


async def test_a_replayed_settle_after_a_restart_is_forwarded_and_records_nothing(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    data_dir: Path,
) -> None:
    facilitator = ScriptedFacilitator()
    server = await aiohttp_server(facilitator.app(), port=0)
    url = str(server.make_url("")).rstrip("/")
    before = await start_proxy(aiohttp_client, data_dir, url, CollectorRegistry())
    assert await through(before, "/verify", 1) == 200
    assert await through(before, "/settle", 1) == 200
    stored = list(before.app[COMMITTER].ledger.iter_events())
    await before.close()

    registry = CollectorRegistry()
    after = await start_proxy(aiohttp_client, data_dir, url, registry)
    facilitator.settle = "failed"  # the replay is refused upstream: the nonce is used
    assert await through(after, "/settle", 1) == 200
    facilitator.settle = "settled"
    assert await through(after, "/settle", 1) == 200
    assert facilitator.calls == ["verify", "settle", "settle", "settle"]
    ledger = after.app[COMMITTER].ledger
    assert list(ledger.iter_events()) == stored
    assert ledger.dead_letters("conflict") == []
    for status in ("success", "failed"):
        labels: dict[str, Any] = {"network": NETWORK, "status": status}
        assert registry.get_sample_value("facilitator_payments_total", labels) in (None, 0)
    assert payment_id(1) in {row[1].split(":", 2)[-1] for row in stored}
