"""The forwarder: outbox to store, at least once, through store failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import AppClient, async_wait_until, received, settled
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER, STORE
from exporter.ledger import GroupCommitter, Ledger, Submission
from exporter.metrics import Metrics
from exporter.records import StoreRecord, StoreRejection
from exporter.store import Forwarder
from exporter.store.duckdb import DuckDBStore


@dataclass
class FailingFirst:
    """Fault injection around the real DuckDB store: the first ``failures`` writes raise."""

    inner: DuckDBStore
    failures: int
    name: str = "duckdb"
    attempts: int = 0

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Fail, then delegate."""
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError("store unreachable")
        return await self.inner.write(records)

    async def close(self) -> None:
        """Close the real store."""
        await self.inner.close()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[GroupCommitter, DuckDBStore]]:
    """A ledger and a DuckDB store, closed afterwards."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    yield committer, store
    await store.close()
    committer.close()
    ledger.close()


async def test_app_delivers_committed_events_to_the_store(client: AppClient) -> None:
    await client.post("/v1/events", json=[received("p1"), settled("p1"), settled("p2")])
    ledger = client.app[COMMITTER].ledger

    async def drained() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(drained, what="outbox drained")
    store = client.app[STORE]
    assert isinstance(store, DuckDBStore)
    rows = store.query(
        "SELECT status, network, amount_micro, fee_micro FROM payment ORDER BY time_ms"
    )
    assert rows == [
        ("received", "eip155:8453", 1_500_000, None),
        ("settled", "eip155:8453", 1_500_000, 10_000),
    ]
    ready = await (await client.get("/readyz")).json()
    assert ready["store"]["reachable"] is True
    assert ready["store"]["lastSuccessfulWrite"] is not None


async def test_store_failures_back_off_and_nothing_is_lost(
    parts: tuple[GroupCommitter, DuckDBStore], registry: CollectorRegistry
) -> None:
    committer, store = parts
    metrics = Metrics(registry)
    flaky = FailingFirst(store, failures=2)
    forwarder = Forwarder(committer, flaky, metrics, batch_size=2, max_backoff_seconds=0.05)
    committer.on_commit_hooks.append(forwarder.wake)
    forwarder.start()
    await committer.submit(Submission([prepare(received(f"p{i}")) for i in range(5)]))

    async def delivered() -> bool:
        return committer.ledger.backlog == 0

    await async_wait_until(delivered, what="delivery after failures")
    await forwarder.stop(drain_seconds=5)
    assert store.counts()["payment"] == 5
    assert registry.get_sample_value("exporter_store_write_errors_total") == 2
    assert registry.get_sample_value("exporter_store_records_written_total") == 5
    assert forwarder.consecutive_failures == 0


async def test_stop_leaves_undelivered_rows_in_the_ledger(
    parts: tuple[GroupCommitter, DuckDBStore], registry: CollectorRegistry
) -> None:
    committer, store = parts
    down = FailingFirst(store, failures=10**9)
    forwarder = Forwarder(committer, down, Metrics(registry), max_backoff_seconds=0.01)
    forwarder.start()
    await committer.submit(Submission([prepare(received("p1"))]))
    await asyncio.wait_for(forwarder.stop(drain_seconds=0.5), 5)
    assert committer.ledger.backlog == 1
    assert [r.record.key for r in committer.ledger.read_outbox(10)] == ["payment:received:p1"]
