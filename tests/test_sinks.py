"""Several sinks at once (EXPORTER_STORES): a cursor per sink on the ledger outbox, a
forwarder per sink, metrics per ``store`` label, retention behind the slowest sink, and
analytics from DuckDB while InfluxDB is down."""

from __future__ import annotations

import asyncio
import functools
import io
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import post_json, run_cli, start_exporter
from conftest import BASE_MS, AppClient, failed, received, settled, wait_until
from influx_fault_server import InfluxFaultServer, Reply, threaded_fault_server
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry
from store_helpers import fault_server, influx_env, sample, until

from exporter import Settings, create_app
from exporter.app import ANALYTICS, COMMITTER, STORE, STORES
from exporter.config import AnalyticsSourceKind, StoreKind, load_settings
from exporter.errors import ConfigError
from exporter.ledger import GroupCommitter, Ledger, LedgerTuning, Submission
from exporter.records import StoreRejection
from exporter.store.duckdb import DuckDBStore

SINKS = ("duckdb", "influxdb")
HOUR_MS = 3_600_000


async def _submit(committer: GroupCommitter, *events: dict[str, Any]) -> None:
    await committer.submit(Submission([prepare(event) for event in events]))


def _keys(ledger: Ledger, sink: str, limit: int = 1000) -> list[str]:
    return [row.record.key for row in ledger.read_outbox(limit, sink)]


async def _drain(committer: GroupCommitter, sink: str, batch: int) -> list[str]:
    """Deliver everything ``sink`` lacks in batches of ``batch``; the keys, in order."""
    ledger = committer.ledger
    delivered: list[str] = []
    while rows := ledger.read_outbox(batch, sink):
        delivered.extend(row.record.key for row in rows)
        await committer.call(
            functools.partial(ledger.mark_delivered, rows[-1].seq, (), sink)
        )
    return delivered


def _outbox_records(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        sql = "SELECT coalesce(sum(last_seq - seq + 1), 0) FROM outbox"
        (count,) = conn.execute(sql).fetchone()
    return int(count)


def _meta(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT key, value FROM meta WHERE key GLOB 'outbox_*'").fetchall()
    return {str(key): str(value) for key, value in rows}


# --------------------------------------------------------------------------- ledger


async def test_each_sink_reads_and_moves_its_own_cursor(tmp_path: Path) -> None:
    """One sink delivering holds nothing back for the other, which later gets every record
    once, in order, from the table and from memory; rows go once both have them."""
    path = tmp_path / "ledger.sqlite3"
    tuning = LedgerTuning(handoff_max_records=4, outbox_row_records=3)
    ledger = Ledger(path, tuning=tuning, sinks=SINKS)
    committer = GroupCommitter(ledger)
    try:
        for i in range(5):
            await _submit(committer, received(f"p{i}", BASE_MS + i), settled(f"p{i}"))
        everything = _keys(ledger, "influxdb")
        assert len(everything) == 10 and _keys(ledger, "duckdb") == everything

        assert await _drain(committer, "duckdb", 3) == everything
        assert (ledger.backlog_of("duckdb"), ledger.backlog_of("influxdb")) == (0, 10)
        assert ledger.backlog == 10 and ledger.stats().backlog == 10
        assert _outbox_records(path) == 10  # the slower sink still needs every row

        await _submit(committer, received("late", BASE_MS + 99))
        assert _keys(ledger, "duckdb") == ["payment:received:late"]
        assert await _drain(committer, "duckdb", 3) == ["payment:received:late"]

        assert await _drain(committer, "influxdb", 4) == [*everything, "payment:received:late"]
        assert ledger.backlog == 0 and _outbox_records(path) == 0
        with pytest.raises(ValueError, match="name the sink"):
            ledger.read_outbox(10)
    finally:
        committer.close()
        ledger.close()


async def test_cursors_survive_a_restart_each_at_its_own_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, sinks=SINKS)
    committer = GroupCommitter(ledger)
    try:
        for i in range(4):
            await _submit(committer, received(f"p{i}", BASE_MS + i))
        rows = ledger.read_outbox(3, "influxdb")
        await committer.call(functools.partial(ledger.mark_delivered, rows[-1].seq, (), "influxdb"))
        await _drain(committer, "duckdb", 10)
    finally:
        committer.close()
        ledger.close()

    reopened = Ledger(path, sinks=SINKS)
    try:
        assert _keys(reopened, "duckdb") == []
        assert _keys(reopened, "influxdb") == ["payment:received:p3"]
        assert (reopened.backlog_of("duckdb"), reopened.backlog_of("influxdb")) == (0, 1)
    finally:
        reopened.close()


async def test_a_ledger_of_one_cursor_resumes_there_for_every_sink(tmp_path: Path) -> None:
    """A ledger written before sinks had cursors of their own (one meta key) resumes at
    that key, and carries a cursor per sink from the first delivery on."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    committer = GroupCommitter(ledger)
    try:  # one outbox row: the cursor stops in the middle of it
        await _submit(committer, *(received(f"p{i}", BASE_MS + i) for i in range(5)))
        rows = ledger.read_outbox(3)
        await committer.call(functools.partial(ledger.mark_delivered, rows[-1].seq))
    finally:
        committer.close()
        ledger.close()
    with sqlite3.connect(path) as conn:  # the layout of a ledger of one cursor
        conn.execute(
            "UPDATE meta SET key = 'outbox_delivered_upto' "
            "WHERE key = 'outbox_delivered_upto:store'"
        )

    reopened = Ledger(path, sinks=SINKS)
    committer = GroupCommitter(reopened)
    left = ["payment:received:p3", "payment:received:p4"]
    try:
        assert _keys(reopened, "duckdb") == left and _keys(reopened, "influxdb") == left
        assert await _drain(committer, "duckdb", 10) == left
    finally:
        committer.close()
        reopened.close()
    assert _meta(path) == {  # InfluxDB keeps its place once the old key is gone
        "outbox_delivered_upto:duckdb": "5",
        "outbox_delivered_upto:influxdb": "3",
    }

    reopened = Ledger(path, sinks=SINKS)
    committer = GroupCommitter(reopened)
    try:
        assert _keys(reopened, "duckdb") == []
        assert await _drain(committer, "influxdb", 10) == left
        await _submit(committer, received("p5", BASE_MS + 5))
        assert reopened.read_outbox(10, "duckdb")[0].seq == 6  # numbering goes on
    finally:
        committer.close()
        reopened.close()
    assert _meta(path) == {
        "outbox_delivered_upto:duckdb": "5",
        "outbox_delivered_upto:influxdb": "5",
    }


async def test_retention_waits_for_the_slowest_sink(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", sinks=SINKS)
    committer = GroupCommitter(ledger)
    future_ms = int(time.time() * 1000) + HOUR_MS
    try:
        for i in range(3):
            await _submit(committer, received(f"p{i}", BASE_MS + i), settled(f"p{i}"))
        await _drain(committer, "duckdb", 100)
        assert await committer.call(functools.partial(ledger.apply_retention, future_ms)) == 0
        assert ledger.stats().events == 6
        await _drain(committer, "influxdb", 100)
        assert await committer.call(functools.partial(ledger.apply_retention, future_ms)) == 6
        assert ledger.stats().events == 0
    finally:
        committer.close()
        ledger.close()


async def test_dead_letters_of_a_sink_name_the_sink(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", sinks=SINKS)
    committer = GroupCommitter(ledger)
    try:
        await _submit(committer, received("poison", BASE_MS), received("fine", BASE_MS + 1))
        rows = ledger.read_outbox(10, "influxdb")
        refused = (StoreRejection(rows[0].record, "400 unable to parse"),)
        await committer.call(
            functools.partial(ledger.mark_delivered, rows[-1].seq, refused, "influxdb")
        )
        letters = ledger.dead_letters(reason="store")
        assert [(letter.key, letter.error) for letter in letters] == [
            ("payment:received:poison", "influxdb: 400 unable to parse")
        ]
        assert len(_keys(ledger, "duckdb")) == 2  # the other sink still gets both
    finally:
        committer.close()
        ledger.close()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EXPORTER_STORES": "duckdb,influx"}, "EXPORTER_STORES: unknown store 'influx'"),
        ({"EXPORTER_STORES": "duckdb,,influxdb"}, "EXPORTER_STORES: an empty name"),
        ({"EXPORTER_STORES": "duckdb, DuckDB"}, "EXPORTER_STORES: duckdb is listed twice"),
        (
            {"EXPORTER_STORES": "duckdb,influxdb"},
            "the InfluxDB store needs EXPORTER_INFLUX_URL, EXPORTER_INFLUX_TOKEN, "
            "EXPORTER_INFLUX_ORG (EXPORTER_STORES lists influxdb",
        ),
        (
            {"EXPORTER_STORES": "duckdb", "EXPORTER_STORE": "duckdb"},
            "EXPORTER_STORE=duckdb and EXPORTER_STORES=duckdb are both set",
        ),
        (
            {"EXPORTER_ANALYTICS_SOURCE": "flux"},
            "EXPORTER_ANALYTICS_SOURCE=flux needs the influxdb store, and the stores are duckdb",
        ),
        (
            {
                "EXPORTER_ANALYTICS_SOURCE": "duckdb",
                "EXPORTER_INFLUX_URL": "http://influxdb:8086",
                "EXPORTER_INFLUX_TOKEN": "t",
                "EXPORTER_INFLUX_ORG": "o",
            },
            "EXPORTER_ANALYTICS_SOURCE=duckdb needs the duckdb store, and the stores are influxdb",
        ),
        ({"EXPORTER_ANALYTICS_SOURCE": "sql"}, "EXPORTER_ANALYTICS_SOURCE: Input should be"),
    ],
)
def test_store_mistakes_are_one_line_each(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message and expected in message, message


def test_default_stores_and_analytics_source(tmp_path: Path) -> None:
    influx: dict[str, Any] = {
        "influx_url": "http://influxdb:8086",
        "influx_token": "t",
        "influx_org": "o",
    }
    alone = Settings(data_dir=tmp_path)
    assert alone.resolved_stores == (StoreKind.DUCKDB,)
    assert alone.resolved_analytics_source is AnalyticsSourceKind.DUCKDB
    influx_alone = Settings(data_dir=tmp_path, **influx)
    assert influx_alone.resolved_stores == (StoreKind.INFLUXDB,)
    assert influx_alone.resolved_analytics_source is AnalyticsSourceKind.FLUX
    both = Settings(data_dir=tmp_path, stores=" InfluxDB , duckdb", **influx)
    assert both.resolved_stores == (StoreKind.INFLUXDB, StoreKind.DUCKDB)
    assert both.sink_names == ("influxdb", "duckdb")
    assert both.resolved_analytics_source is AnalyticsSourceKind.DUCKDB
    flux = Settings(data_dir=tmp_path, stores="duckdb,influxdb", analytics_source="flux", **influx)
    assert flux.resolved_analytics_source is AnalyticsSourceKind.FLUX
    assert Settings(data_dir=tmp_path, stores="").resolved_stores == (StoreKind.DUCKDB,)


def test_check_config_shows_every_sink(tmp_path: Path) -> None:
    result = run_cli(
        "check-config",
        "--data-dir",
        str(tmp_path),
        EXPORTER_STORES="duckdb,influxdb",
        EXPORTER_INFLUX_URL="http://user:hunter2@influxdb:8086",
        EXPORTER_INFLUX_TOKEN="t",
        EXPORTER_INFLUX_ORG="o",
    )
    assert result.returncode == 0, result.stderr
    assert '"resolved_stores": [\n    "duckdb",\n    "influxdb"\n  ]' in result.stdout
    assert '"resolved_analytics_source": "duckdb"' in result.stdout
    assert f'"duckdb_path": "{tmp_path / "store.duckdb"}"' in result.stdout
    assert "influxdb at http://***@influxdb:8086 (org o, bucket payments)" in result.stdout
    assert "hunter2" not in result.stdout


# --------------------------------------------------------------------------- the app


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


@pytest.fixture
async def influx() -> AsyncIterator[InfluxFaultServer]:
    """A fault server on a free loopback port."""
    async with fault_server() as server:
        yield server


@pytest.fixture
async def two_sinks(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
    influx: InfluxFaultServer,
) -> AppClient:
    """The app feeding DuckDB and the fault server, analytics from DuckDB by default."""
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        stores="duckdb,influxdb",
        influx_url=influx.url,
        influx_token=influx.token,
        influx_org=influx.org,
        influx_timeout_seconds=1.0,
        store_flush_interval_seconds=0.0,
    )
    return await aiohttp_client(create_app(settings, registry))


async def test_analytics_answer_from_duckdb_while_influxdb_is_down(
    two_sinks: AppClient, influx: InfluxFaultServer, registry: CollectorRegistry
) -> None:
    """InfluxDB down: events are acknowledged and reach DuckDB, the API and gauges answer
    exactly from it, InfluxDB's backlog grows alone; once back, it drains."""
    client = two_sinks
    ledger = client.app[COMMITTER].ledger
    assert [store.name for store in client.app[STORES]] == list(SINKS)
    assert isinstance(client.app[STORE], DuckDBStore)

    def backlog(store: str) -> float:
        return sample(registry, "exporter_ledger_backlog_events", store=store)

    await influx.outage()
    now = int(time.time() * 1000)
    response = await client.post("/v1/events", json=_scenario(now))
    assert response.status == 202
    def written(store: str) -> float:
        return sample(registry, "exporter_store_records_written_total", store=store)

    await until(lambda: written("duckdb") == 6, "DuckDB caught up")
    pending = ledger.backlog_of("influxdb")
    assert pending == 6 and backlog("influxdb") == pending and backlog("duckdb") == 0

    answer = await client.get(f"/v1/analytics/payments?window=1h&at={now}")
    assert answer.status == 200
    body = await answer.json()
    assert (body["totalPayments"], body["successfulPayments"], body["failedPayments"]) == (3, 2, 1)
    assert (body["totalVolume"], body["totalFees"]) == ("3.000000", "0.030000")
    assert body["p95SettlementTime"] == 3400
    assert await client.app[ANALYTICS].scheduler.refresh("1h")
    assert registry.get_sample_value(
        "facilitator_error_ratio", {"window": "1h"}
    ) == pytest.approx(1 / 3)

    def server_errors(store: str) -> float:
        return sample(registry, "exporter_store_errors_total", store=store, **{"class": "server"})

    await until(lambda: server_errors("influxdb") >= 1, "a failed InfluxDB write")
    assert server_errors("duckdb") == 0
    ready = await client.get("/readyz")
    assert ready.status == 200  # an unreachable store needs no operator: it is retried
    state = await ready.json()
    stores = {entry["name"]: entry for entry in state["stores"]}
    assert list(stores) == list(SINKS) and state["store"] == stores["duckdb"]
    assert (stores["duckdb"]["backlog"], stores["duckdb"]["reachable"]) == (0, True)
    assert (stores["influxdb"]["backlog"], stores["influxdb"]["reachable"]) == (pending, False)
    assert stores["influxdb"]["lagSeconds"] > 0
    assert state["ledger"]["backlog"] == pending

    later = [received("d", now - 60_000, amount="4.00"), settled("d", now - 30_000)]
    assert (await client.post("/v1/events", json=later)).status == 202
    await until(lambda: written("duckdb") == 8, "DuckDB caught up again")
    pending = ledger.backlog_of("influxdb")
    assert pending == 8 and backlog("influxdb") == 8 and backlog("duckdb") == 0
    body = await (await client.get(f"/v1/analytics/payments?window=1h&at={now}")).json()
    assert (body["totalPayments"], body["totalVolume"]) == (4, "7.000000")

    await influx.resume()
    await until(lambda: written("influxdb") == pending, "InfluxDB caught up after the outage")
    assert len(influx.point_keys()) == pending
    assert backlog("influxdb") == 0 and ledger.backlog == 0
    assert written("duckdb") == pending


async def test_the_cli_answers_from_duckdb_while_influxdb_is_down(
    data_dir: Path, influx: InfluxFaultServer
) -> None:
    """``query`` reads the analytics source (DuckDB), never the InfluxDB beside it."""
    from exporter.cli.query import QueryRequest, query_store

    settings = Settings(
        data_dir=data_dir,
        stores="duckdb,influxdb",
        influx_url=influx.url,
        influx_token=influx.token,
        influx_org=influx.org,
    )
    now = int(time.time() * 1000)
    store = DuckDBStore.open(settings.duckdb_path)
    ledger = Ledger(settings.ledger_path, sinks=settings.sink_names)
    committer = GroupCommitter(ledger)
    try:
        await committer.submit(Submission([prepare(event) for event in _scenario(now)]))
        rows = ledger.read_outbox(100, "duckdb")
        assert not await store.write([row.record for row in rows])
    finally:
        committer.close()
        ledger.close()
        await store.close()
    await influx.outage()
    data = await query_store(settings, QueryRequest("payments", "1h", now, 10, "volume"))
    assert isinstance(data, dict)
    assert (data["totalPayments"], data["totalVolume"]) == (3, "3.000000")
    assert influx.request_log() == []


async def test_both_stores_receive_every_record(
    two_sinks: AppClient, influx: InfluxFaultServer, registry: CollectorRegistry
) -> None:
    """Both sinks up: each gets every record the ledger emitted, counted per label."""
    client = two_sinks
    now = int(time.time() * 1000)
    assert (await client.post("/v1/events", json=_scenario(now))).status == 202
    def written(store: str) -> float:
        return sample(registry, "exporter_store_records_written_total", store=store)

    await until(lambda: written("duckdb") == written("influxdb") == 6, "both stores caught up")
    store = client.app[STORE]
    assert isinstance(store, DuckDBStore)
    assert len(influx.point_keys()) == store.counts()["payment"] == 6


async def test_backfill_fills_the_store_it_is_told_among_several(
    data_dir: Path, influx: InfluxFaultServer
) -> None:
    """``backfill --to duckdb`` writes to DuckDB even when InfluxDB is listed first."""
    from exporter.cli.backfill import backfill

    settings = Settings(
        data_dir=data_dir,
        stores="influxdb,duckdb",
        influx_url=influx.url,
        influx_token=influx.token,
        influx_org=influx.org,
    )
    ledger = Ledger(settings.ledger_path, sinks=settings.sink_names)
    committer = GroupCommitter(ledger)
    try:
        await _submit(committer, *_scenario(int(time.time() * 1000)))
    finally:
        committer.close()
        ledger.close()
    summary = await backfill(settings, StoreKind.DUCKDB, err=io.StringIO())
    assert summary.records_written == 6 and summary.left_in_scratch == 0
    assert influx.request_log() == []
    store = DuckDBStore.open(settings.duckdb_path)
    try:
        assert store.counts()["payment"] == 6
    finally:
        await store.close()


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_during_shipping_with_two_sinks_then_each_has_every_record(tmp_path: Path) -> None:
    """SIGKILL while InfluxDB is slow and DuckDB fast: after a restart each sink holds
    every acknowledged record once, and neither was sent more than one batch twice."""
    with threaded_fault_server() as (server, _):
        server.push(*[Reply(204, delay=0.25) for _ in range(40)])  # slow shipping
        batch = 300
        env = influx_env(
            server, EXPORTER_STORES="duckdb,influxdb", EXPORTER_STORE_BATCH_SIZE=str(batch)
        )
        data_dir = tmp_path / "data"
        payments = 1_200
        process = start_exporter(data_dir, tmp_path / "first.log", env=env)
        try:
            for chunk in range(payments // 100):
                events = []
                for i in range(chunk * 100, chunk * 100 + 100):
                    events.append(received(f"k{i}", BASE_MS + i))
                    events.append(settled(f"k{i}", BASE_MS + 5_000 + i))
                status, answer = post_json(process.events_url, events)
                assert status == 202 and answer["accepted"] == 200, answer
            wait_until(lambda: len(server.request_log()) >= 3, 20, 0.01, "shipping under way")
            assert len(server.point_keys()) < 2 * payments
        finally:
            process.kill()

        restarted = start_exporter(data_dir, tmp_path / "second.log", env=env)
        try:
            restarted.wait_caught_up(timeout=60)
            status, ready = restarted.readyz()
            assert status == 200 and [s["backlog"] for s in ready["stores"]] == [0, 0]
        finally:
            restarted.terminate()
        assert len(server.point_keys()) == 2 * payments
        sent = sum(len(r.lines) for r in server.request_log() if r.status == 204)
        assert 2 * payments <= sent <= 2 * payments + batch

    store = DuckDBStore.open(data_dir / "store.duckdb")
    try:
        assert store.counts()["payment"] == 2 * payments
    finally:
        asyncio.run(store.close())


def test_flux_analytics_refused_on_the_v1_write_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux runs only behind the v2 API: asking for it with EXPORTER_INFLUX_API=v1 is a
    configuration error that names both settings and the way out."""
    for name, value in {
        "EXPORTER_STORES": "duckdb,influxdb",
        "EXPORTER_INFLUX_URL": "http://127.0.0.1:8086",
        "EXPORTER_INFLUX_API": "v1",
        "EXPORTER_ANALYTICS_SOURCE": "flux",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "EXPORTER_ANALYTICS_SOURCE=flux" in message
    assert "EXPORTER_INFLUX_API" in message
    assert "\n" not in message
