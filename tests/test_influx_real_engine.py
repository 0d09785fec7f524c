"""The exporter against real InfluxDB engines: Debian's ``influxd`` 1.6 over the v1 API, and
an InfluxDB 2.x over the v2 API.

Every case that can apply to both runs once per target (:mod:`influx_targets`): the local
``influxd`` 1.6, read back with InfluxQL, and, when ``EXPORTER_TEST_INFLUX_URL`` (+ ``_TOKEN``,
``_ORG``, ``_BUCKET``) names one, an InfluxDB 2.x, read back with Flux (the compose ``test``
profile runs those: ``-m needs_influxdb``). Without the variables the 2.x cases skip with
that reason, which CI allows (they carry ``needs_influxdb``). What needs the engine as a
child process (killing ``influxd``, its users and grants) stays on 1.6.

A simulated day (over 100,000 events: out of order, duplicates, late events, batches,
revenue, WebSocket counts, unknown failures) is committed to a ledger and shipped by the
exporter's own forwarder to InfluxDB and to DuckDB at once, with ``influxd`` 1.6 killed
(SIGKILL) mid-shipment and restarted on the same directories (2.x ships unkilled). Then
counts and sums per measurement, network and status, and hourly counts, must equal the
records the ledger emitted and DuckDB's answers exactly; the field types must be the
documented ones. Beside
it: the exporter process killed mid-shipment, one poison event among thousands, and 10,000
events in one millisecond.

Where ``influxd`` is missing the tests skip with the way to install it; in CI they must run.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import clean_env, post_json, running_exporter
from conftest import BASE_MS, failed, in_ci, received
from fluxcheck import assert_flux_valid
from influx_helpers import SKIP_REASON as NO_V2_REASON
from influx_helpers import TARGET as V2_TARGET
from influx_targets import (
    EngineTarget,
    V1Target,
    V2Target,
    flux_count,
    flux_counts_and_sums,
    flux_first_values,
    flux_hourly,
)
from influxdb_engine import SKIP_REASON, InfluxEngine, influxd_path
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter.cli.simulate import SimulationConfig, Simulator
from exporter.events import canonical_json, dedup_key, parse_event
from exporter.ledger import GroupCommitter, Ledger, PreparedEvent, Submission
from exporter.metrics import Metrics
from exporter.records import PaymentRecord, StoreRecord, StoreRejection
from exporter.store import Forwarder
from exporter.store.duckdb import DuckDBStore
from exporter.store.influx.store import InfluxStore

pytestmark = pytest.mark.slow

DB = "payments"
HOUR_MS = 3_600_000
DAY_END_MS = BASE_MS + 86_400_000

# measurement -> (tag that is not network, a field every point has, the integer sums)
SCHEMA: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "payment": ("status", "payment_id", ("amount_micro", "fee_micro")),
    "batch": ("status", "batch_id", ("gas_used", "total_amount_micro", "total_fees_micro")),
    "revenue": ("kind", "amount_micro", ("amount_micro",)),
    "websocket": (None, "count", ("count",)),
}
FIELD_TYPES = {
    "payment": {
        "amount_micro": "integer", "error": "string", "fee_micro": "integer",
        "payee": "string", "payer": "string", "payment_id": "string",
        "settlement_ms": "float", "tx": "string", "verification_ms": "float",
    },
    "batch": {
        "batch_id": "string", "gas_used": "integer", "payment_count": "integer",
        "total_amount_micro": "integer", "total_fees_micro": "integer", "tx": "string",
    },
    "revenue": {"amount_micro": "integer", "payment_id": "string"},
    "websocket": {"count": "integer"},
}
"""The field types of docs/architecture.md section 6."""

Figures = dict[tuple[str, str, str], tuple[int, ...]]
"""(measurement, network, status or kind) -> (count, then each integer sum of SCHEMA)."""


def _skip_without_influxd() -> None:
    if influxd_path() is None:
        if in_ci():
            pytest.fail(f"{SKIP_REASON}; CI must run the real-engine suite")
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxEngine]:
    """One ``influxd`` for the module; each test writes to a database of its own."""
    _skip_without_influxd()
    started = InfluxEngine(tmp_path_factory.mktemp("influxdb"))
    started.start()
    yield started
    started.stop()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("v1", id="influxd-1.6-v1"),
        pytest.param("v2", id="influxdb-2.x-v2", marks=pytest.mark.needs_influxdb),
    ],
)
def target(request: pytest.FixtureRequest) -> Iterator[EngineTarget]:
    """Each InfluxDB generation in turn: the local ``influxd`` 1.6 (v1 API), then the
    InfluxDB 2.x of ``EXPORTER_TEST_INFLUX_URL`` (v2 API) or a skip naming the variables."""
    if request.param == "v1":
        yield V1Target(request.getfixturevalue("engine"))
        return
    if V2_TARGET is None:
        pytest.skip(NO_V2_REASON)
    v2 = V2Target(V2_TARGET)
    try:
        yield v2
    finally:
        v2.close()


# --------------------------------------------------------------------------- figures


def figures_of(records: list[StoreRecord]) -> Figures:
    """Count and integer sums per measurement, network and status, from store records."""
    totals: dict[tuple[str, str, str], list[int]] = {}
    for record in records:
        tag, _, sums = SCHEMA[record.measurement]
        key = (
            record.measurement,
            getattr(record, "network", ""),
            getattr(record, tag, "") if tag else "",
        )
        row = totals.setdefault(key, [0] * (1 + len(sums)))
        row[0] += 1
        for index, name in enumerate(sums, start=1):
            row[index] += getattr(record, name) or 0
    return {key: tuple(row) for key, row in totals.items()}


def influx_figures(target: EngineTarget, db: str) -> Figures:
    """The same figures as the engine answers them (InfluxQL or Flux ``count``/``sum``)."""
    found: Figures = {}
    for measurement, (tag, counted, sums) in SCHEMA.items():
        answered = target.counts_and_sums(db, measurement, tag, counted, sums)
        for (network, other), values in answered.items():
            found[(measurement, network, other)] = values
    return found


def influx_hourly(target: EngineTarget, db: str, start_ms: int, stop_ms: int) -> Counter[Any]:
    """Points per measurement and UTC hour of event time, as the engine counts them."""
    hourly: Counter[Any] = Counter()
    for measurement, (_, counted, _) in SCHEMA.items():
        counts = target.hourly_counts(db, measurement, counted, start_ms, stop_ms)
        for hour, count in counts.items():
            hourly[(measurement, hour)] += count
    return hourly


def hourly_of(records: list[StoreRecord]) -> Counter[Any]:
    """Records per measurement and UTC hour of event time."""
    return Counter((r.measurement, r.time_ms // HOUR_MS) for r in records)


def duckdb_figures(store: DuckDBStore) -> Figures:
    """The same figures as SQL on the DuckDB store answers them."""
    found: Figures = {}
    for measurement, (tag, _, sums) in SCHEMA.items():
        network = "network" if tag else "''"
        other = f'"{tag}"' if tag else "''"
        columns = ", ".join(["count(*)", *(f'coalesce(sum("{s}"), 0)' for s in sums)])
        rows = store.query(
            f'SELECT {network}, {other}, {columns} FROM "{measurement}" GROUP BY ALL'
        )
        for net, status, *values in rows:
            found[(measurement, str(net), str(status))] = tuple(int(str(v)) for v in values)
    return found


# --------------------------------------------------------------------------- shipping


@dataclass
class Tee:
    """Both stores from one forwarder: InfluxDB and DuckDB, fed the same batches.

    Remembers the last record of each key it was given: the records the ledger emitted.
    """

    influx: InfluxStore
    duckdb: DuckDBStore
    name: str = "influxdb"
    emitted: dict[str, StoreRecord] = field(default_factory=dict)

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Write to InfluxDB, then DuckDB (a failure retries both; both are idempotent)."""
        refused = await self.influx.write(records)
        await self.duckdb.write(records)
        for record in records:
            self.emitted[record.key] = record
        return refused

    async def close(self) -> None:
        """Close both stores."""
        await self.influx.close()
        await self.duckdb.close()


def simulated_day(payments: int) -> list[dict[str, Any]]:
    """A day of simulated traffic in delivery order, and 1 % of it delivered again at the
    end: events arriving late, long after their own timestamps."""
    config = SimulationConfig(seed=20, websocket_interval_ms=60_000, premium_fraction=0.002)
    events: list[dict[str, Any]] = list(Simulator(config).history(payments, 1.0, DAY_END_MS))
    rng = random.Random(3)
    late = sorted(rng.sample(range(len(events)), len(events) // 100))
    held = [events[i] for i in late]
    kept = [event for i, event in enumerate(events) if i not in set(late)]
    return kept + held


@dataclass
class Shipped:
    """What the day's shipment left behind."""

    db: str
    emitted: list[StoreRecord]
    duckdb: Figures
    dead_letters: int
    events: int


async def ship_day(target: EngineTarget, tmp_path: Path) -> Shipped:
    """Commit the day to a ledger while the forwarder ships it to InfluxDB and DuckDB;
    where the engine is ours (1.6), kill it mid-shipment and restart it on the same
    directories."""
    db = await asyncio.to_thread(target.fresh_database, DB)
    events = simulated_day(36_000)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    influx = target.store(db)
    duck = await asyncio.to_thread(DuckDBStore.open, tmp_path / "store.duckdb")
    tee = Tee(influx, duck)
    forwarder = Forwarder(
        committer, tee, Metrics(CollectorRegistry()), 5_000, backoff_base_seconds=0.2,
        max_backoff_seconds=1.0,
    )
    committer.on_commit_hooks.append(forwarder.wake)
    forwarder.start()
    try:
        prepared = [prepare(event) for event in events]
        for start in range(0, len(prepared), 2_000):
            await committer.submit(Submission(prepared[start : start + 2_000]))
        total = ledger.backlog + len(tee.emitted)

        async def some_shipped() -> bool:
            return len(tee.emitted) >= total // 4

        await _until(some_shipped, "a quarter of the day to reach InfluxDB")
        if target.killable:
            assert ledger.backlog > 0, "the shipment ended before influxd could be killed"
            await asyncio.to_thread(target.kill)
            await asyncio.sleep(0.5)  # writes fail meanwhile; the outbox keeps them
            await asyncio.to_thread(target.start)

        async def drained() -> bool:
            return ledger.backlog == 0

        await _until(drained, "the forwarder to ship the whole day", within=90)
        dead = len(ledger.dead_letters())
        figures = await asyncio.to_thread(duckdb_figures, duck)
    finally:
        await forwarder.stop(5)
        await tee.close()
        await asyncio.to_thread(committer.close)
        await asyncio.to_thread(ledger.close)
    return Shipped(db, list(tee.emitted.values()), figures, dead, len(events))


async def _until(condition: Any, what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def day(target: EngineTarget, tmp_path_factory: pytest.TempPathFactory) -> Shipped:
    """The simulated day, shipped once per target for the module's assertions."""
    return asyncio.run(ship_day(target, tmp_path_factory.mktemp("day")))


# --------------------------------------------------------------------------- the day


def test_the_day_is_over_100000_events_of_every_kind(day: Shipped) -> None:
    """The day holds every kind of event the contract has, unknown failures included."""
    kinds = Counter((r.measurement, getattr(r, "status", "")) for r in day.emitted)
    assert day.events >= 100_000
    assert day.dead_letters == 0
    for kind in (("payment", "received"), ("payment", "settled"), ("payment", "failed"),
                 ("payment", "verified"), ("batch", "created"), ("batch", "settled"),
                 ("revenue", ""), ("websocket", "")):
        assert kinds[kind] > 0, kind
    assert any(r.measurement == "payment" and getattr(r, "payment_id", "") == "unknown"
               for r in day.emitted)


def test_counts_and_sums_in_influxdb_equal_the_ledgers_and_duckdbs(
    target: EngineTarget, day: Shipped
) -> None:
    """Per measurement, network and status: count and sums of amount_micro, fee_micro,
    gas_used (and the batch totals), exactly (on 1.6 after an influxd SIGKILL mid-shipment)."""
    expected = figures_of(day.emitted)
    assert influx_figures(target, day.db) == expected
    assert day.duckdb == expected


def test_hourly_counts_in_influxdb_equal_the_ledgers(target: EngineTarget, day: Shipped) -> None:
    """Points per measurement and UTC hour (InfluxQL GROUP BY time(1h), Flux
    aggregateWindow(every: 1h)) match exactly."""
    start = min(r.time_ms for r in day.emitted) // HOUR_MS * HOUR_MS
    stop = (max(r.time_ms for r in day.emitted) // HOUR_MS + 1) * HOUR_MS
    hourly = influx_hourly(target, day.db, start, stop)
    assert hourly == hourly_of(day.emitted)
    assert len({hour for _, hour in hourly}) >= 24


def test_field_types_are_the_documented_schema(target: EngineTarget, day: Shipped) -> None:
    """Integers stay integers and floats stay floats, even when every value is whole
    (``SHOW FIELD KEYS`` on 1.6; the type of each field's values in Flux on 2.x)."""
    assert target.field_types(day.db) == FIELD_TYPES
    settled = [r for r in day.emitted if getattr(r, "status", "") == "settled"]
    assert any(float(getattr(r, "settlement_ms", 0.5)).is_integer() for r in settled)


# --------------------------------------------------------------------------- faults


def expected_points(events: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """Points per (measurement, status or kind) that distinct events make."""
    kinds = {
        "payment:received": ("payment", "received"), "payment:verified": ("payment", "verified"),
        "payment:settled": ("payment", "settled"), "payment:failed": ("payment", "failed"),
        "batch:created": ("batch", "created"), "batch:settled": ("batch", "settled"),
        "revenue:recorded": ("revenue", ""), "websocket:clients": ("websocket", ""),
    }
    keys: dict[str, tuple[str, str]] = {}
    for event in events:
        parsed = parse_event(event)
        kind = kinds[parsed["type"]]
        if parsed["type"] == "revenue:recorded":
            kind = ("revenue", parsed["data"]["kind"])
        keys[dedup_key(parsed, canonical_json(parsed))] = kind
    return Counter(keys.values())


def engine_points(target: EngineTarget, db: str) -> Counter[tuple[str, str]]:
    """Points per (measurement, status or kind) that InfluxDB holds."""
    found: Counter[tuple[str, str]] = Counter()
    for measurement, (tag, counted, _) in SCHEMA.items():
        for (_, status), (count,) in target.counts_and_sums(
            db, measurement, tag, counted, ()
        ).items():
            found[(measurement, status)] += count
    return found


def test_a_kill_9_of_the_exporter_mid_shipment_loses_and_doubles_nothing(
    target: EngineTarget, tmp_path: Path
) -> None:
    """Every batch acknowledged with 202 reaches InfluxDB exactly once per event, across a
    SIGKILL of the exporter while its outbox still held records."""
    db = target.fresh_database("killed")
    events = list(Simulator(SimulationConfig(seed=9)).events(BASE_MS, 6_000, 200.0))
    env = clean_env(**target.exporter_env(db), EXPORTER_STORE_BATCH_SIZE="500")
    data = tmp_path / "data"
    with running_exporter(data, tmp_path / "first.log", env=env) as first:
        for start in range(0, len(events), 1_000):
            status, _ = post_json(first.events_url, events[start : start + 1_000])
            assert status == 202
        backlog = first.readyz()[1]["ledger"]["backlog"]
        first.kill()
    assert backlog > 0, "the shipment ended before the kill"
    with running_exporter(data, tmp_path / "second.log", env=env) as second:
        second.wait_caught_up(timeout=60)
        second.terminate()
    assert engine_points(target, db) == expected_points(events)


def test_one_poison_event_among_thousands_is_the_only_dead_letter(
    target: EngineTarget, tmp_path: Path
) -> None:
    """InfluxDB refuses a field of another type than the shard holds (1.6: 400 partial
    write; 2.x: 422): the batch is bisected to that line; it alone is dead-lettered."""
    db = target.fresh_database("poison")
    # The shard already holds "error" as an integer: a failure's string error conflicts.
    seed = f"payment,network=x,status=seed error=1i {BASE_MS}000000"
    assert target.write(db, seed.encode()) == 204
    events = [received(f"ok{i}", BASE_MS + i) for i in range(5_000)]
    events.insert(3_210, failed("ok17", BASE_MS + 20_000, error="settlement_failed"))
    rejected = asyncio.run(_ship_plain(target, db, tmp_path, events))
    assert [key for key, _ in rejected] == ["payment:failed:ok17"]
    assert "field type conflict" in rejected[0][1]
    assert target.count(db, "payment", "payment_id", "received") == 5_000


async def _ship_plain(
    target: EngineTarget, db: str, tmp_path: Path, events: list[dict[str, Any]]
) -> list[tuple[str | None, str]]:
    """Ship ``events`` through a ledger and the forwarder to the target's InfluxDB; returns
    the store's dead letters (key, reason)."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    store = target.store(db)
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()), 5_000)
    committer.on_commit_hooks.append(forwarder.wake)
    forwarder.start()
    try:
        prepared: list[PreparedEvent] = [prepare(event) for event in events]
        await committer.submit(Submission(prepared))

        async def drained() -> bool:
            return ledger.backlog == 0

        await _until(drained, "the forwarder to ship everything")
        return [(row.key, row.error) for row in ledger.dead_letters("store")]
    finally:
        await forwarder.stop(5)
        await store.close()
        await asyncio.to_thread(committer.close)
        await asyncio.to_thread(ledger.close)


def test_ten_thousand_events_in_one_millisecond_are_ten_thousand_points(
    target: EngineTarget, tmp_path: Path
) -> None:
    """One network, one status, one millisecond: InfluxDB keeps every point (the hash of
    the keys alone would have merged some; the ledger's offsets do not)."""
    db = target.fresh_database("one_ms")
    events = [received(f"ms{i}", BASE_MS) for i in range(10_000)]
    assert asyncio.run(_ship_plain(target, db, tmp_path, events)) == []
    assert target.count(db, "payment", "payment_id") == 10_000


def test_v1_basic_auth_is_what_influxdb_1x_checks(tmp_path: Path) -> None:
    """With ``auth-enabled``: the user name and password (HTTP Basic) write; a wrong
    password or a user without write access is refused as credentials, never printed;
    ``check`` tells the cases apart without writing anything. 1.6 only: users and grants
    are 1.x's own, and the test restarts the engine with auth on."""
    _skip_without_influxd()
    engine = InfluxEngine(tmp_path / "influxdb", auth=True)
    engine.start()
    try:
        engine.query("CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES")
        admin = {"u": "admin", "p": "admin-pw"}
        engine.query(f'CREATE DATABASE "{DB}"', **admin)
        engine.query("CREATE USER writer WITH PASSWORD 'writer-pw'", **admin)
        engine.query(f'GRANT WRITE ON "{DB}" TO writer', **admin)
        engine.query("CREATE USER reader WITH PASSWORD 'reader-pw'", **admin)
        checks = asyncio.run(_checks(engine))
        (series,) = engine.query('SELECT count("payment_id") FROM "payment"', DB, **admin)
    finally:
        engine.stop()
    assert checks["writer"] == ("accepted", None)
    assert checks["wrong"][0] == "refused" and "writer-pw" not in str(checks["wrong"])
    assert checks["reader"][0] == "refused"
    assert "EXPORTER_INFLUX_USERNAME and EXPORTER_INFLUX_PASSWORD" in str(checks["reader"][1])
    assert checks["no database"][0] == "not found"
    assert int(series[0]["values"][0][1]) == 3


async def _checks(engine: InfluxEngine) -> dict[str, tuple[str, str | None]]:
    """What ``check`` says and what a write raises, per set of credentials."""
    found: dict[str, tuple[str, str | None]] = {}
    for name, user, password, db in (
        ("writer", "writer", "writer-pw", DB),
        ("wrong", "writer", "not-it", DB),
        ("reader", "reader", "reader-pw", DB),
        ("no database", "writer", "writer-pw", "nope"),
    ):
        store = InfluxStore(
            engine.url, None, None, db, timeout_seconds=10, api="v1", username=user,
            password=password,
        )
        try:
            check = await store.check()
            error = None
            try:
                await store.write([_payment(f"{name}-{i}") for i in range(3)])
            except Exception as raised:  # noqa: BLE001 - the message is what is asserted
                error = str(raised)
            found[name] = (check.credentials, error)
        finally:
            await store.close()
    return found


def _payment(pid: str) -> StoreRecord:
    """A received payment's store record."""
    return PaymentRecord(
        f"payment:received:{pid}", BASE_MS, "eip155:8453", "received", pid, amount_micro=1
    )


def test_the_2x_read_back_queries_are_valid_flux() -> None:
    """The Flux the 2.x target reads back with type-checks, so a run against 2.x fails
    only on what the server answers (checked without a server)."""
    queries = {
        "count": flux_counts_and_sums("b", "payment", "status", "payment_id", "count"),
        "sum without tag": flux_counts_and_sums("b", "websocket", None, "count", "sum"),
        "hourly": flux_hourly("b", "payment", "payment_id", BASE_MS, BASE_MS + HOUR_MS),
        "first values": flux_first_values("b"),
        "count of a status": flux_count("b", "payment", "payment_id", "received"),
        "count of all": flux_count("b", "payment", "payment_id", None),
    }
    assert_flux_valid(queries)
