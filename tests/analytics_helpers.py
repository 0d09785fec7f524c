"""Helpers for analytics tests: events taken through the real ledger and outbox into a store,
and the stores the analytics suites run against."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from influx_helpers import TARGET as INFLUX_TARGET
from influx_helpers import influxdb_source
from ledger_helpers import prepare

from exporter.analytics import Analytics, AnalyticsSource
from exporter.analytics.duckdb import DuckDBAnalyticsSource
from exporter.ledger import GroupCommitter, Ledger, Submission
from exporter.records import StoreRecord
from exporter.store.duckdb import DuckDBStore

Event = dict[str, Any]
StoreFactory = Callable[[Path, list[StoreRecord]], AbstractAsyncContextManager[AnalyticsSource]]


@asynccontextmanager
async def duckdb_source(
    directory: Path, records: list[StoreRecord]
) -> AsyncIterator[AnalyticsSource]:
    """``records`` written into a DuckDB store under ``directory``, and the source over it."""
    store = DuckDBStore.open(directory / "store.duckdb")
    try:
        for start in range(0, len(records), 5_000):  # the forwarder's batch size
            await store.write(records[start : start + 5_000])
        yield DuckDBAnalyticsSource(store)
    finally:
        await store.close()


STORES: dict[str, StoreFactory] = {"duckdb": duckdb_source}
"""Every store the analytics suites run against, by name."""
if INFLUX_TARGET is not None:  # a real InfluxDB 2.x: the Flux queries answer the same suite
    STORES["influxdb"] = influxdb_source


async def ledger_records(events: Sequence[Event], directory: Path) -> list[StoreRecord]:
    """Commit ``events`` through the ledger in delivery order; the outbox's records."""
    ledger = Ledger(directory / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    try:
        for start in range(0, len(events), 2_000):
            chunk = events[start : start + 2_000]
            await committer.submit(Submission([prepare(e) for e in chunk]))
        # past the join timeout: failures whose payment:received never came are counted
        await committer.call(lambda: ledger.release_unjoined(2**62))
        return [row.record for row in ledger.read_outbox(10**9)]
    finally:
        committer.close()
        ledger.close()


@asynccontextmanager
async def delivered(
    events: Sequence[Event], directory: Path, store: str
) -> AsyncIterator[Analytics]:
    """Analytics over ``store`` after ``events`` went through ledger and outbox."""
    records = await ledger_records(events, directory)
    async with STORES[store](directory, records) as source:
        yield Analytics(source)
