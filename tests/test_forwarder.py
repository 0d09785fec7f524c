"""The forwarder: outbox to store, at least once, through store failures.

Over the real DuckDB store with injected failures, and over the InfluxDB fault server
(``influx_fault_server``) through every kind of write fault; two tests stop an exporter
subprocess (SIGKILL, SIGTERM) in the middle of shipping.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import post_json, start_exporter
from conftest import BASE_MS, AppClient, async_wait_until, received, settled, wait_until
from influx_fault_server import InfluxFaultServer, PointKey, Reply, threaded_fault_server
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry
from store_helpers import (
    FailingFirst,
    commit_payments,
    fault_server,
    influx_env,
    influx_store,
    point_key,
    sample,
    until,
)

from exporter import Settings, create_app
from exporter.app import COMMITTER, FORWARDER, STORE
from exporter.ledger import GroupCommitter, Ledger, Submission
from exporter.metrics import Metrics
from exporter.records import StoreRecord, StoreRejection, unique_time_ns
from exporter.store import Forwarder
from exporter.store.duckdb import DuckDBStore
from exporter.store.influx.store import InfluxStore

DUCKDB = {"store": "duckdb"}
INFLUX = {"store": "influxdb"}


@pytest.fixture
async def committer(tmp_path: Path) -> AsyncIterator[GroupCommitter]:
    """A ledger on a fresh file behind its writer thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    group = GroupCommitter(ledger)
    yield group
    group.close()
    ledger.close()


@pytest.fixture
async def influx() -> AsyncIterator[InfluxFaultServer]:
    """A fault server on a free loopback port, accepting everything until told otherwise."""
    async with fault_server() as server:
        yield server


@pytest.fixture(params=["v2", "v1"])
async def store(
    influx: InfluxFaultServer, request: pytest.FixtureRequest
) -> AsyncIterator[InfluxStore]:
    """The InfluxDB store pointed at the fault server, with a short timeout, over each
    write API in turn: delivery through faults is the same on both."""
    async with influx_store(influx, api=request.param) as opened:
        yield opened


@pytest.fixture
def threaded_influx() -> Iterator[tuple[InfluxFaultServer, Callable[..., Any]]]:
    """A fault server on its own thread, for subprocess tests."""
    with threaded_fault_server() as (server, call):
        yield server, call


# --------------------------------------------------------------------------- over DuckDB


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
    assert registry.get_sample_value("exporter_store_write_errors_total", DUCKDB) == 2
    assert registry.get_sample_value("exporter_store_records_written_total", DUCKDB) == 5
    assert forwarder.consecutive_failures == 0


class _RecordingRandom(random.Random):
    """A seeded generator that remembers every jittered draw: (low, high, drawn)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[tuple[float, float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        """Draw as :class:`random.Random` does, and remember it."""
        drawn = super().uniform(a, b)
        self.draws.append((a, b, drawn))
        return drawn


async def test_the_pause_after_a_failure_is_jittered_within_the_backoff_bounds(
    parts: tuple[GroupCommitter, DuckDBStore], registry: CollectorRegistry
) -> None:
    """Failure n pauses a draw from [d/2, d], d = base * 2**(n-1) up to the cap, and waits it."""
    committer, store = parts
    flaky = FailingFirst(store, failures=5)
    rng = _RecordingRandom(18)
    forwarder = Forwarder(
        committer,
        flaky,
        Metrics(registry),
        max_backoff_seconds=0.16,
        backoff_base_seconds=0.02,
        rng=rng,
    )
    await committer.submit(Submission([prepare(received("p1"))]))
    forwarder.start()
    await until(lambda: committer.ledger.backlog == 0, "delivery after five failures")
    await forwarder.stop(drain_seconds=5)

    delays = [0.02, 0.04, 0.08, 0.16, 0.16]
    assert [(low, high) for low, high, _ in rng.draws] == [(d / 2, d) for d in delays]
    drawn = [value for _, _, value in rng.draws]
    assert all(d / 2 <= value <= d for value, d in zip(drawn, delays, strict=True))
    assert all(value not in (d / 2, d) for value, d in zip(drawn, delays, strict=True))
    gaps = [b - a for a, b in zip(flaky.attempts_at, flaky.attempts_at[1:], strict=False)]
    assert len(gaps) == 5
    assert all(gap >= value for gap, value in zip(gaps, drawn, strict=True)), (gaps, drawn)


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


# --------------------------------------------------------------------------- over InfluxDB


async def test_everything_committed_arrives_once_per_point_through_faults(
    committer: GroupCommitter,
    influx: InfluxFaultServer,
    store: InfluxStore,
    registry: CollectorRegistry,
) -> None:
    """5xx, 429, 503, a timeout, 413 splits and a poison line: every other record lands."""
    await commit_payments(committer, 1_500)
    await committer.submit(Submission([prepare(received("poison", BASE_MS))]))
    rows = committer.ledger.read_outbox(10**6)
    expected = {point_key(row.record) for row in rows}
    poison = {point_key(r.record) for r in rows if r.record.key == "payment:received:poison"}
    assert len(poison) == 1
    influx.max_lines = 700
    influx.bad_markers = ('payment_id="poison"',)
    influx.push(
        Reply(500, "internal error"),
        Reply(429, "slow down", retry_after="0.05"),
        Reply(204, delay=5.0),  # outlasts the 0.5 s timeout (and is applied anyway)
        Reply(503, "unavailable", retry_after="0"),
    )
    forwarder = Forwarder(committer, store, Metrics(registry), 1_000, max_backoff_seconds=0.05)
    forwarder.start()
    await until(lambda: committer.ledger.backlog == 0, "outbox drained through faults")
    await forwarder.stop(drain_seconds=5)

    assert influx.point_keys() == expected - poison
    assert all(count >= 1 for count in influx.deliveries.values())
    letters = committer.ledger.dead_letters(reason="store")
    assert [letter.key for letter in letters] == ["payment:received:poison"]
    assert "unable to parse" in letters[0].error
    for kind in ("server", "retry_after", "timeout"):
        assert sample(registry, "exporter_store_errors_total", **INFLUX, **{"class": kind}) >= 1
    assert sample(registry, "exporter_store_records_rejected_total", **INFLUX) == 1
    assert sample(registry, "exporter_store_batch_size_records_count", **INFLUX) == sample(
        registry, "exporter_store_writes_total", **INFLUX
    )
    assert forwarder.lag_seconds() == 0.0


async def test_retry_after_is_honoured_before_the_next_attempt(
    committer: GroupCommitter, influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """A 429 asking for 1 s gets 1 s even though the backoff alone would be 10 ms."""
    await commit_payments(committer, 3)
    influx.push(Reply(429, "slow down", retry_after="1"))
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()), max_backoff_seconds=0.01)
    forwarder.start()
    await until(lambda: committer.ledger.backlog == 0, "delivery after the 429")
    await forwarder.stop(drain_seconds=5)
    first, second = influx.request_log()[:2]
    assert first.status == 429 and second.status == 204
    assert second.at - first.at >= 1.0


@dataclass
class _Spy:
    """Records what the forwarder hands the store and reads from the ledger."""

    inner: InfluxStore
    name: str = "influxdb"
    writes: list[tuple[list[str], bool]] = field(default_factory=list)

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Delegate, then remember the batch's keys and whether the write succeeded."""
        keys = [r.key for r in records]
        try:
            refused = await self.inner.write(records)
        except Exception:
            self.writes.append((keys, False))
            raise
        self.writes.append((keys, True))
        return refused

    async def close(self) -> None:
        """Nothing to release (the fixture closes the inner store)."""


async def test_forwarder_holds_one_batch_and_rereads_it_during_an_outage(
    committer: GroupCommitter,
    influx: InfluxFaultServer,
    store: InfluxStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """During an outage the same oldest batch is read again; nothing accumulates in memory."""
    await commit_payments(committer, 600)  # 800 records
    ledger = committer.ledger
    reads: list[tuple[int, int]] = []
    read_outbox = ledger.read_outbox

    def spying_read(limit: int, sink: str | None = None, after: int | None = None) -> Any:
        rows = read_outbox(limit, sink, after)
        reads.append((limit, len(rows)))
        return rows

    monkeypatch.setattr(ledger, "read_outbox", spying_read)
    spy = _Spy(store)
    await influx.outage()
    forwarder = Forwarder(committer, spy, Metrics(CollectorRegistry()), 200, 0.02)
    forwarder.start()
    await until(lambda: len(spy.writes) >= 4, "several attempts during the outage")
    assert forwarder.lag_seconds() > 0
    state = forwarder.state()
    assert (state.reachable, state.error_class, state.backlog) == (False, "server", 800)
    await influx.resume()
    await until(lambda: ledger.backlog == 0, "delivery after the outage")
    await forwarder.stop(drain_seconds=5)

    assert all(limit == 200 and got <= 200 for limit, got in reads)
    assert all(len(keys) <= 200 for keys, _ in spy.writes)
    failed = [keys for keys, ok in spy.writes if not ok]
    assert len(failed) >= 4
    assert all(keys == failed[0] for keys in failed)  # the oldest batch, read again
    delivered = [key for keys, ok in spy.writes if ok for key in keys]
    assert delivered[: len(failed[0])] == failed[0]
    assert len(delivered) == len(set(delivered)) == 800


@dataclass
class _PreparingSpy:
    """An InfluxStore wrapper that logs when batches are prepared and written, in order."""

    inner: InfluxStore
    name: str = "influxdb"
    events: list[tuple[str, str]] = field(default_factory=list)
    """(``prepare`` | ``write`` | ``written`` | ``failed``, first key of the batch)."""

    def prepare(self, records: Sequence[StoreRecord]) -> object:
        """Delegate, remembering which batch was prepared."""
        self.events.append(("prepare", records[0].key))
        return self.inner.prepare(records)

    async def write_prepared(
        self, records: list[StoreRecord], prepared: object
    ) -> list[StoreRejection]:
        """Delegate, remembering when the batch's write started and how it ended."""
        self.events.append(("write", records[0].key))
        try:
            refused = await self.inner.write_prepared(records, prepared)
        except Exception:
            self.events.append(("failed", records[0].key))
            raise
        self.events.append(("written", records[0].key))
        return refused

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Unprepared writes are not expected from the forwarder here."""
        raise AssertionError("the forwarder wrote without preparing")

    async def close(self) -> None:
        """Nothing to release (the fixture closes the inner store)."""


async def test_next_batch_is_prepared_while_one_is_written_and_writes_stay_in_order(
    committer: GroupCommitter, influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Behind a full batch the next is read and prepared during its write; after a failed
    write the prepared one is dropped and the failed batch written again first."""
    await commit_payments(committer, 600)  # 800 records: four batches of 200
    firsts = [row.record.key for row in committer.ledger.read_outbox(800)[::200]]
    influx.push(Reply(204, delay=0.3), Reply(503, "unavailable", retry_after="0"))
    spy = _PreparingSpy(store)
    forwarder = Forwarder(committer, spy, Metrics(CollectorRegistry()), 200)
    forwarder.start()
    await until(lambda: committer.ledger.backlog == 0, "delivery")
    await forwarder.stop(drain_seconds=5)

    events = spy.events
    writes = [key for kind, key in events if kind == "write"]
    written = [key for kind, key in events if kind == "written"]
    failed = [key for kind, key in events if kind == "failed"]
    assert written == firsts  # every batch, in outbox order
    assert failed == [firsts[1]]  # the 503 hit the second batch
    assert writes == [firsts[0], firsts[1], firsts[1], firsts[2], firsts[3]]
    # The second batch was prepared during the first one's slow write.
    assert events.index(("prepare", written[1])) < events.index(("written", written[0]))
    # No write started before the one before it ended.
    for i, (kind, _) in enumerate(events):
        if kind == "write" and i:
            ended = [k for k, _ in events[:i] if k in ("written", "failed")]
            assert len(ended) == len([k for k, _ in events[:i] if k == "write"])
    lines = [line for request in influx.request_log() if request.status == 204
             for line in request.lines]
    assert len(lines) == len(set(lines)) == 800


async def test_shutdown_during_a_long_retry_after_is_bounded(
    committer: GroupCommitter, influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """stop() does not sit out a 60 s Retry-After: it returns and keeps the rows."""
    await commit_payments(committer, 5)
    influx.push(Reply(503, "unavailable", retry_after="60"))
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()))
    forwarder.start()
    await until(lambda: forwarder.consecutive_failures == 1, "the 503")
    started = time.monotonic()
    await forwarder.stop(drain_seconds=2)
    assert time.monotonic() - started < 2.5
    assert committer.ledger.backlog == 7


# --------------------------------------------------------------------------- in the app


@pytest.fixture
async def influx_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
    influx: InfluxFaultServer,
) -> AppClient:
    """The exporter app with EXPORTER_STORE=influxdb aimed at the fault server."""
    app_settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        store="influxdb",
        influx_url=influx.url,
        influx_token=influx.token,
        influx_org=influx.org,
        influx_timeout_seconds=2.0,
    )
    return await aiohttp_client(create_app(app_settings, registry))


async def test_refused_token_pauses_shipping_marks_not_ready_and_logs_once(
    influx_client: AppClient,
    influx: InfluxFaultServer,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """401: ingest goes on, /readyz answers 503, one ERROR line; a fixed token resumes."""
    client = influx_client
    ledger = client.app[COMMITTER].ledger
    assert (await client.post("/v1/events", json=[received("a1")])).status == 202
    await until(lambda: ledger.backlog == 0, "first delivery")

    influx.token = "rotated"  # the exporter's token is refused from now on
    assert (await client.post("/v1/events", json=[received("a2"), settled("a2")])).status == 202
    await until(
        lambda: sample(registry, "exporter_store_errors_total", **INFLUX, **{"class": "auth"}) >= 2,
        "repeated auth failures",
    )
    answer = await client.get("/readyz")
    assert answer.status == 503
    body = await answer.json()
    assert body["store"]["authFailed"] is True
    assert body["store"]["reachable"] is True  # it answers; it refuses the token
    assert body["store"]["errorClass"] == "auth"
    assert body["store"]["backlog"] == 2
    assert body["store"]["lagSeconds"] > 0
    assert sample(registry, "exporter_store_auth_failed", **INFLUX) == 1
    assert (await client.post("/v1/events", json=[received("a3")])).status == 202
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "refused the credentials" in errors[0].getMessage()

    influx.token = "test-token"
    await until(lambda: ledger.backlog == 0, "delivery with the fixed token")
    answer = await client.get("/readyz")
    assert answer.status == 200
    assert (await answer.json())["store"]["authFailed"] is False
    assert sample(registry, "exporter_store_auth_failed", **INFLUX) == 0
    assert client.app[FORWARDER].ready
    assert len(influx.point_keys()) == 4


async def test_readyz_reports_the_influx_store_state(
    influx_client: AppClient, influx: InfluxFaultServer
) -> None:
    """/readyz names the store, its reachability, backlog and last successful write."""
    client = influx_client
    before = await (await client.get("/readyz")).json()
    assert before["store"]["name"] == "influxdb"
    assert before["store"]["reachable"] is None  # nothing attempted yet
    await client.post("/v1/events", json=[received("r1")])
    await until(lambda: client.app[COMMITTER].ledger.backlog == 0, "delivery")
    after = await (await client.get("/readyz")).json()
    assert after["store"]["reachable"] is True
    assert after["store"]["lastSuccessfulWrite"] is not None
    assert after["store"]["backlog"] == 0
    assert after["store"]["lagSeconds"] == 0
    assert len(influx.point_keys()) == 1


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_during_shipping_then_restart_delivers_each_acknowledged_event_once(
    tmp_path: Path, threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]]
) -> None:
    """SIGKILL while batches are in flight: after a restart every acknowledged event is
    in InfluxDB, as exactly one point each, and delivered batches are not sent again."""
    server, _ = threaded_influx
    server.push(*[Reply(204, delay=0.25) for _ in range(40)])  # slow shipping
    batch = 300
    env = influx_env(server, EXPORTER_STORE="influxdb", EXPORTER_STORE_BATCH_SIZE=str(batch))
    data_dir = tmp_path / "data"
    expected: set[PointKey] = set()
    process = start_exporter(data_dir, tmp_path / "first.log", env=env)
    try:
        for chunk in range(12):
            events = []
            for i in range(chunk * 100, chunk * 100 + 100):
                events.append(received(f"k{i}", BASE_MS + i))
                events.append(settled(f"k{i}", BASE_MS + 5_000 + i))
            status, answer = post_json(process.events_url, events)
            assert status == 202 and answer["accepted"] == 200, answer
            expected |= _expected_points(events)
        wait_until(lambda: len(server.request_log()) >= 3, 20, 0.01, "shipping under way")
        assert len(server.point_keys()) < len(expected)
    finally:
        process.kill()
    assert len(expected) == 2_400

    restarted = start_exporter(data_dir, tmp_path / "second.log", env=env)
    try:
        restarted.wait_caught_up(timeout=60)
    finally:
        restarted.terminate()
    assert server.point_keys() == expected
    sent = sum(len(r.lines) for r in server.request_log() if r.status == 204)
    # At most the batch in flight at the kill is sent twice.
    assert len(expected) <= sent <= len(expected) + batch


def _expected_points(events: list[dict[str, Any]]) -> set[PointKey]:
    points = set()
    for event in events:
        data = event["data"]
        key = f"{event['type']}:{data['paymentId']}"
        series = f"payment,network=eip155:8453,status={event['type'].split(':')[1]}"
        points.add((series, unique_time_ns(data["timestamp"], key)))
    return points


@pytest.mark.slow
def test_sigterm_drains_within_bounds_and_loses_nothing_either_way(
    tmp_path: Path, threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]]
) -> None:
    """InfluxDB down: SIGTERM exits promptly, the backlog waits on disk. InfluxDB up but
    slow: SIGTERM first ships what is pending, old backlog included."""
    server, call = threaded_influx
    env = influx_env(server, EXPORTER_STORE="influxdb", EXPORTER_STORE_BATCH_SIZE="200")
    data_dir = tmp_path / "data"
    down = [received(f"d{i}", BASE_MS + i) for i in range(300)]
    up = [received(f"u{i}", BASE_MS + 10_000 + i) for i in range(300)]

    call(server.outage())
    process = start_exporter(data_dir, tmp_path / "down.log", env=env)
    try:
        assert post_json(process.events_url, down)[0] == 202
        started = time.monotonic()
        assert process.terminate() == 0
        assert time.monotonic() - started < 5.0, process.log()
    finally:
        process.kill()
    assert server.point_keys() == set()

    call(server.resume())
    server.push(*[Reply(204, delay=0.2) for _ in range(3)])
    process = start_exporter(data_dir, tmp_path / "up.log", env=env)
    try:
        assert post_json(process.events_url, up)[0] == 202
        assert process.terminate() == 0
    finally:
        process.kill()
    assert server.point_keys() == _expected_points(down + up)
