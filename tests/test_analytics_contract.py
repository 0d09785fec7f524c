"""Contract tests: every analytic for every window, the exporter against a brute-force oracle.

Events take the real path: validated and prepared as the receiver does, committed through
the ledger (dedup, joins in any order, failures released after the join timeout), the
outbox delivered into a real store, then :class:`Analytics` asked as of several instants
and compared, serialised, with :mod:`analytics_oracle` computed from the raw events.
The suite is parametrised over stores (``STORES``): DuckDB always; a store added there
(InfluxDB when ``EXPORTER_TEST_INFLUX_URL`` is set) runs the very same checks.

Hypothesis examples: ``EXPORTER_TEST_ANALYTICS_EXAMPLES`` (default 75) per property.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pytest
from analytics_helpers import STORES, delivered
from analytics_helpers import duckdb_source as _duckdb
from analytics_oracle import WINDOWS_MS, Oracle, OracleKey, facts_from_events
from conftest import (
    BASE_MS,
    batch_created,
    batch_settled,
    failed,
    received,
    settled,
    verified,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.analytics.compute import Analytics
from exporter.analytics.duckdb import DuckDBAnalyticsSource, DuckDBTuning
from exporter.analytics.models import (
    ANALYTIC_NAMES,
    DAY_MS,
    HOUR_MS,
    MAX_LIMIT,
    TIME_SERIES_METRICS,
    AnalyticKey,
    AnalyticsRequestError,
    AnalyticsResult,
    PaymentMetrics,
    RankRequest,
    Window,
    WindowError,
    result_data,
    result_json,
)
from exporter.cli.simulate import SimulationConfig, Simulator
from exporter.records import PaymentRecord, StoreRecord
from exporter.store.duckdb import DuckDBStore

EXAMPLES = int(os.environ.get("EXPORTER_TEST_ANALYTICS_EXAMPLES", "75"))

Event = dict[str, Any]


def _snapshot_data(snapshot: dict[AnalyticKey, AnalyticsResult]) -> dict[OracleKey, Any]:
    return {
        (key.name, key.window.value if key.window else None, key.metric): result_data(value)
        for key, value in snapshot.items()
    }


async def assert_everything_matches(analytics: Analytics, oracle: Oracle, at: int) -> None:
    """compute_all as of ``at`` equals the oracle, analytic by analytic, serialised."""
    got = _snapshot_data(await analytics.compute_all(at))
    expected = oracle.everything(at)
    assert sorted(got, key=str) == sorted(expected, key=str)
    for key, value in expected.items():
        assert got[key] == value, f"{key} as of {at}"


def _simulated(payments: int, days: float, end_ms: int, seed: int) -> list[Event]:
    config = SimulationConfig(
        seed=seed,
        payers=40,  # few parties: ties and repeat routes
        payees=12,
        failure_fraction=0.08,
        out_of_order_fraction=0.05,
        duplicate_fraction=0.03,
        premium_fraction=0.01,
        networks={"eip155:8453": 0.6, "eip155:10": 0.3, "eip155:999999": 0.1},
    )
    return list(Simulator(config).history(payments, days, end_ms))


SIM_END = BASE_MS + 3 * DAY_MS + 5 * HOUR_MS + 17_345
SIM_ATS = (
    SIM_END,
    SIM_END - DAY_MS - 1_234_567,
    BASE_MS + 2 * DAY_MS + 14 * HOUR_MS,  # exactly on an hour and day-aligned offsets
    BASE_MS + 2 * DAY_MS,  # exactly midnight UTC
    SIM_END + 40 * DAY_MS,  # long after: the short windows are empty
)


@pytest.fixture(scope="module")
def simulated_events() -> list[Event]:
    """A few thousand simulated payments over three days, with every delivery fault."""
    return _simulated(3_000, 3.2, SIM_END, seed=7)


@pytest.mark.parametrize("store", STORES)
async def test_simulated_traffic_matches_the_oracle_everywhere(
    store: str, simulated_events: list[Event], tmp_path: Path
) -> None:
    oracle = Oracle(facts_from_events(simulated_events))
    assert len(oracle.facts.payments) > 8_000  # the traffic really is there
    async with delivered(simulated_events, tmp_path, store) as analytics:
        for at in SIM_ATS:
            await assert_everything_matches(analytics, oracle, at)


@pytest.mark.parametrize("store", STORES)
async def test_on_demand_answers_match_the_oracle(
    store: str, simulated_events: list[Event], tmp_path: Path
) -> None:
    oracle = Oracle(facts_from_events(simulated_events))
    at = SIM_END - 7 * HOUR_MS - 999
    async with delivered(simulated_events, tmp_path, store) as analytics:
        for name, window in itertools.product(ANALYTIC_NAMES, Window):
            metrics = TIME_SERIES_METRICS if name == "timeseries" else ("volume",)
            for metric in metrics:
                got = await analytics.compute(name, window, at, limit=7, metric=metric)
                expected = oracle.answer(name, window.value, at, limit=7, metric=metric)
                assert result_data(got) == expected, (name, window, metric)


@pytest.mark.parametrize("store", STORES)
async def test_partial_refreshes_equal_the_full_snapshot(
    store: str, simulated_events: list[Event], tmp_path: Path
) -> None:
    async with delivered(simulated_events, tmp_path, store) as analytics:
        full = _snapshot_data(await analytics.compute_all(SIM_END))
        only_7d = _snapshot_data(
            await analytics.compute_all(SIM_END, windows=[Window.D7], realtime=False)
        )
        only_realtime = _snapshot_data(
            await analytics.compute_all(SIM_END, windows=[], realtime=True)
        )
    assert {key[1] for key in only_7d} == {"7d"}
    assert len(only_7d) == 11  # 8 analytics + 3 time series
    assert only_7d == {key: value for key, value in full.items() if key[1] == "7d"}
    assert only_realtime == {("realtime", None, None): full[("realtime", None, None)]}


@pytest.mark.parametrize("store", STORES)
async def test_top_lists_of_the_snapshot_are_prefixes_of_every_limit(
    store: str, simulated_events: list[Event], tmp_path: Path
) -> None:
    async with delivered(simulated_events, tmp_path, store) as analytics:
        snapshot = await analytics.compute_all(SIM_END)
        for limit in (1, 3, 10):
            for name in ("top/payers", "top/payees", "top/routes"):
                cached = snapshot[AnalyticKey(name, Window.D7)]
                assert isinstance(cached, list)
                direct = await analytics.compute(name, Window.D7, SIM_END, limit=limit)
                assert result_data(direct) == result_data(cached[:limit])


# ------------------------------------------------------------------ hand-picked edge cases

AT = BASE_MS + 100 * DAY_MS + 13 * HOUR_MS + 1_234
"""An instant off every hour and day boundary (2026-04-11T13:00:01.234Z)."""


async def _check(events: list[Event], ats: Sequence[int] = (AT,)) -> Oracle:
    """Every analytic of every window equals the oracle's, for every store."""
    oracle = Oracle(facts_from_events(events))
    for store in STORES:
        with tempfile.TemporaryDirectory() as directory:
            async with delivered(events, Path(directory), store) as analytics:
                for at in ats:
                    await assert_everything_matches(analytics, oracle, at)
    return oracle


async def test_an_empty_store_answers_zeros_and_zero_filled_buckets(tmp_path: Path) -> None:
    await _check([])
    async with delivered([], tmp_path, "duckdb") as analytics:
        snapshot = await analytics.compute_all(AT)
    payments = snapshot[AnalyticKey("payments", Window.H24)]
    assert isinstance(payments, PaymentMetrics)
    assert result_data(payments) == {
        "totalPayments": 0,
        "successfulPayments": 0,
        "failedPayments": 0,
        "totalVolume": "0.000000",
        "totalFees": "0.000000",
        "averagePaymentSize": "0.000000",
        "medianPaymentSize": "0.000000",
        "averageSettlementTime": 0.0,
        "p95SettlementTime": 0.0,
        "p99SettlementTime": 0.0,
    }
    series = result_data(snapshot[AnalyticKey("timeseries", Window.H24, "volume")])
    assert isinstance(series, dict)
    assert len(series["points"]) == 25  # 13:00 yesterday .. 13:00 today, hourly
    assert all(p["value"] == 0 for p in series["points"])
    revenue = result_data(snapshot[AnalyticKey("revenue", Window.D7)])
    assert isinstance(revenue, dict)
    assert [d["date"] for d in revenue["revenueByDay"]][::7] == ["2026-04-04", "2026-04-11"]
    assert revenue["growthRate"] == 0.0
    health = result_data(snapshot[AnalyticKey("health", Window.H24)])
    assert health == {
        "status": "healthy",
        "errorRate": 0.0,
        "averageSettlementTime": 0.0,
        "pendingPayments": 0,
    }


async def test_window_bounds_exclude_the_start_and_include_the_end(tmp_path: Path) -> None:
    events = [
        received("early", AT - HOUR_MS, amount="1"),
        settled("early", AT - HOUR_MS, fee="0.1"),
        received("late", AT, amount="2"),
        settled("late", AT, fee="0.2"),
    ]
    await _check(events, ats=(AT, AT - 1, AT + 1))
    async with delivered(events, tmp_path, "duckdb") as analytics:
        hour = await analytics.payments(Window.H1, AT)
        assert (hour.successfulPayments, hour.totalVolume) == (1, "2.000000")
        before = await analytics.payments(Window.H1, AT - 1)
        assert (before.successfulPayments, before.totalVolume) == (1, "1.000000")


async def test_settlement_on_another_utc_day_counts_on_the_settlement_day() -> None:
    midnight = AT - AT % DAY_MS
    oracle = await _check(
        [received("p1", midnight - 2_000, amount="3"), settled("p1", midnight + 500)]
    )
    days = oracle.revenue(AT, "7d")["revenueByDay"]
    assert [d["payments"] for d in days if d["payments"]] == [1]
    assert next(d for d in days if d["payments"])["date"] == "2026-04-11"


async def test_unknown_and_orphan_failures_count_on_their_own_network() -> None:
    oracle = await _check(
        [
            failed("unknown", AT - 10, network="eip155:10"),
            failed("unknown", AT - 20),
            failed("never-received", AT - 30, network="eip155:137"),
            received("p1", AT - 100, network="eip155:8453"),
            failed("p1", AT - 40, network="eip155:10"),  # joined: the payment's network
        ]
    )
    networks = {n["chainId"]: n for n in oracle.networks(AT, "1h")}
    assert sorted(networks) == ["eip155:10", "eip155:137", "eip155:8453", "unknown"]
    assert networks["eip155:8453"]["successRate"] == 0.0
    assert networks["unknown"]["chainName"] == "unknown"


async def test_batches_without_created_count_nowhere_and_gas_is_averaged() -> None:
    oracle = await _check(
        [
            batch_settled("orphan", AT - 50, gas="999999"),
            batch_created("b1", AT - 500, count=3, network="eip155:10"),
            batch_settled("b1", AT - 100, gas="100000"),
            received("p1", AT - 60, network="eip155:10"),
        ]
    )
    [network] = oracle.networks(AT, "1h")
    assert (network["totalGasSpent"], network["averageGasCost"]) == ("100000", "33333.333333")


async def test_duplicates_conflicts_and_out_of_order_deliveries() -> None:
    events = [
        settled("p1", AT - 1_000, fee="0.05"),  # before its payment
        received("p1", AT - 3_000, amount="1.5"),
        received("p1", AT - 3_000, amount="1.5"),  # duplicate
        received("p1", AT - 3_000, amount="9"),  # conflict: refused
        verified("p1", AT - 2_500),
        # the same natural key under another id and another body: a conflict
        {**settled("p1", AT - 900, fee="0.07"), "id": "second-settlement"},
        failed("p1", AT - 800),  # the payment has ended: a conflict
        settled("p2", AT - 800),  # its payment never arrives: released on network unknown
    ]
    oracle = await _check(events)
    assert oracle.payments(AT, "1h")["successfulPayments"] == 2
    assert oracle.payments(AT, "1h")["failedPayments"] == 0
    assert oracle.payments(AT, "1h")["totalVolume"] == "1.500000"


async def test_settlements_without_a_time_count_everywhere_but_in_settlement_times() -> None:
    untimed = settled("p2", AT - 500, fee="0.02")
    del untimed["data"]["settlementTime"], untimed["data"]["transaction"]
    events = [
        received("p1", AT - 3_000),
        settled("p1", AT - 1_000, settlement_ms=4000),
        received("p2", AT - 2_000),
        untimed,
        received("p3", AT - 2_000, network="eip155:10"),
        {**settled("p3", AT - 400), "data": {"paymentId": "p3", "fee": "0", "timestamp": AT - 400}},
    ]
    oracle = await _check(events)
    payments = oracle.payments(AT, "1h")
    assert payments["successfulPayments"] == 3
    assert (payments["averageSettlementTime"], payments["p95SettlementTime"]) == (4000.0, 4000.0)
    [optimism] = [n for n in oracle.networks(AT, "1h") if n["chainId"] == "eip155:10"]
    assert optimism["averageConfirmationTime"] == 0.0


@pytest.mark.parametrize(
    ("amounts", "fees", "median", "average", "projected_7d"),
    [
        (("0.000001", "0.000004"), ("0.000001", "0.000002"), "0.000002", "0.000002", "0.000013"),
        (("0.000001", "0.000002"), ("0.000002", "0.000002"), "0.000002", "0.000002", "0.000017"),
        (("0.000003", "0.000004", "9"), ("0.000007", "0"), "0.000004", "3.000002", "0.000030"),
    ],
)
async def test_quotients_round_half_to_even(
    amounts: tuple[str, ...],
    fees: tuple[str, ...],
    median: str,
    average: str,
    projected_7d: str,
    tmp_path: Path,
) -> None:
    events = []
    for i, amount in enumerate(amounts):
        events += [
            received(f"p{i}", AT - 100, amount=amount),
            settled(f"p{i}", AT - 50, fee=fees[min(i, len(fees) - 1)]),
        ]
    oracle = await _check(events)
    async with delivered(events, tmp_path, "duckdb") as analytics:
        payments = result_data(await analytics.payments(Window.H1, AT))
        revenue = result_data(await analytics.revenue(Window.D7, AT))
    assert isinstance(payments, dict) and isinstance(revenue, dict)
    assert (payments["medianPaymentSize"], payments["averagePaymentSize"]) == (median, average)
    assert revenue["projectedMonthlyRevenue"] == projected_7d
    assert oracle.revenue(AT, "7d")["projectedMonthlyRevenue"] == projected_7d


async def test_ties_in_top_lists_order_by_address() -> None:
    payers = ["0x" + c * 40 for c in "cab"]
    events = []
    for i, payer in enumerate(payers):
        events += [
            received(f"p{i}", AT - 100, payer=payer, payee="0x" + "f" * 40, amount="1"),
            settled(f"p{i}", AT - 50),
        ]
    oracle = await _check(events)
    assert [p["address"] for p in oracle.top_payers(AT, "1h", 10)] == sorted(payers)


async def test_pending_and_websocket_state_follow_event_time() -> None:
    events = [
        received("p1", AT - 5_000),
        settled("p1", AT + 5_000),  # settles after at: still pending at at
        received("p2", AT - 5_000),
        failed("p2", AT - 1_000),
        received("p3", AT + 1),  # received after at: not yet pending
        {"type": "websocket:clients", "data": {"count": 5, "timestamp": AT - 10}},
        {"type": "websocket:clients", "data": {"count": 9, "timestamp": AT - 10}},
        {"type": "websocket:clients", "data": {"count": 1, "timestamp": AT + 10}},
    ]
    oracle = await _check(events, ats=(AT, AT + 5_000))
    assert oracle.realtime(AT)["pendingSettlements"] == 1
    assert oracle.realtime(AT)["activeConnections"] == 9
    assert oracle.realtime(AT + 5_000)["pendingSettlements"] == 1  # p3


async def test_rank_values_are_nearest_rank_for_every_rank(tmp_path: Path) -> None:
    payer, payee = "0x" + "a" * 40, "0x" + "b" * 40
    for store in STORES:
        for n in (1, 2, 3, 7, 20, 99, 100, 101):
            values = [(i * 7919) % n // 2 * 3 for i in range(n)]  # shuffled, with repeats
            records: list[StoreRecord] = [
                PaymentRecord(
                    f"s{n}-{i}",
                    AT - i,
                    "eip155:8453",
                    "settled",
                    f"p{i}",
                    payer,
                    payee,
                    v,
                    0,
                    float(v) / 4,
                )
                for i, v in enumerate(values)
            ]
            ranks = tuple(range(1, n + 1))
            directory = tmp_path / f"{store}-{n}"
            directory.mkdir()
            async with STORES[store](directory, records) as source:
                answer = await source.settled_order_values(
                    AT, {HOUR_MS: RankRequest(settled=n, amount=ranks, settlement=ranks)}
                )
            ordered = sorted(values)
            assert answer[HOUR_MS].amount == {k: ordered[k - 1] for k in ranks}
            assert answer[HOUR_MS].settlement == {k: ordered[k - 1] / 4 for k in ranks}


@pytest.fixture(scope="module")
def rank_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBStore]:
    """One store for many examples, each in its own hour (see ``_rank_instants``)."""
    store = DuckDBStore.open(tmp_path_factory.mktemp("ranks") / "store.duckdb")
    yield store
    asyncio.run(store.close())


_rank_instants = itertools.count(AT, 2 * HOUR_MS)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    amounts=st.lists(
        st.integers(0, 10**15) | st.sampled_from([0, 7, 10**6]), min_size=1, max_size=60
    ),
    data=st.data(),
)
def test_duckdb_ranks_stay_exact_when_selected_in_many_passes(
    rank_store: DuckDBStore, amounts: list[int], data: st.DataObject
) -> None:
    # Two values read at most and three bins a pass: every range is narrowed several
    # times, through ties, huge integers and subnormal floats.
    n = len(amounts)
    times = data.draw(
        st.lists(st.floats(0, 1e7) | st.sampled_from([0.0, 1.5, 5e-324]), min_size=n, max_size=n)
    )
    ranks = tuple(data.draw(st.lists(st.integers(1, n), min_size=1, max_size=5, unique=True)))
    at = next(_rank_instants)
    payer, payee = "0x" + "a" * 40, "0x" + "b" * 40
    records: list[StoreRecord] = [
        PaymentRecord(
            f"r{at}-{i}", at - i, "eip155:8453", "settled", f"p{i}", payer, payee, amount, 0, time
        )
        for i, (amount, time) in enumerate(zip(amounts, times, strict=True))
    ]
    asyncio.run(rank_store.write(records))
    source = DuckDBAnalyticsSource(rank_store, DuckDBTuning(rank_bins=3, rank_read_at_most=2))
    answer = asyncio.run(source.settled_order_values(at, {HOUR_MS: RankRequest(n, ranks, ranks)}))
    assert answer[HOUR_MS].amount == {k: sorted(amounts)[k - 1] for k in ranks}
    assert answer[HOUR_MS].settlement == {k: sorted(times)[k - 1] for k in ranks}


async def test_duckdb_ranks_of_a_grown_window_pick_the_same_fraction(tmp_path: Path) -> None:
    # Records committed after the totals were counted: rank k of n selects what
    # quantile_disc((k - 0.5) / n) selects among the values the window holds now.
    payer, payee = "0x" + "a" * 40, "0x" + "b" * 40
    values = [(i * 7) % 23 for i in range(23)]
    records: list[StoreRecord] = [
        PaymentRecord(
            f"g{i}", AT - i, "eip155:8453", "settled", f"p{i}", payer, payee, v, 0, float(v)
        )
        for i, v in enumerate(values)
    ]
    async with _duckdb(tmp_path, records) as source:
        assert isinstance(source, DuckDBAnalyticsSource)
        for n in (1, 5, 22, 23):
            ranks = tuple(range(1, n + 1))
            answer = await source.settled_order_values(AT, {HOUR_MS: RankRequest(n, ranks, ranks)})
            [(expected,)] = source.store.query(
                "SELECT quantile_disc(amount_micro, $1::DOUBLE[]) FROM payment",
                [[(k - 0.5) / n for k in ranks]],
            )
            assert isinstance(expected, list)
            chosen = dict(zip(ranks, expected, strict=True))
            assert answer[HOUR_MS].amount == chosen
            assert answer[HOUR_MS].settlement == {k: float(v) for k, v in chosen.items()}


async def test_duckdb_ranks_of_a_million_values_fit_a_small_buffer_pool(tmp_path: Path) -> None:
    # Holding a million values at once (what quantile_disc does) does not fit in 8MB.
    n, path = 1_000_000, tmp_path / "store.duckdb"
    await DuckDBStore.open(path).close()
    with duckdb.connect(str(path)) as conn:
        conn.execute(
            "INSERT INTO payment (key, time_ms, network, status, payment_id, amount_micro, "
            "settlement_ms) SELECT 'k' || i, $1 - i % 3600000, 'eip155:8453', 'settled', "
            "'p' || i, (i * 7919) % $2, ((i * 104729) % $2) / 4 FROM range($2) AS t(i)",
            [AT, n],
        )  # both columns a permutation of 0..n-1 (7919 and 104729 are primes)
    store = DuckDBStore.open(path, memory_limit="8MB")
    try:
        ranks = (1, n // 2, n // 2 + 1, n * 95 // 100, n)
        answer = await DuckDBAnalyticsSource(store).settled_order_values(
            AT, {HOUR_MS: RankRequest(n, ranks, ranks)}
        )
    finally:
        await store.close()
    assert answer[HOUR_MS].amount == {k: k - 1 for k in ranks}
    assert answer[HOUR_MS].settlement == {k: (k - 1) / 4 for k in ranks}


async def test_duckdb_parties_sharing_a_key_are_told_apart(
    simulated_events: list[Event], tmp_path: Path
) -> None:
    # A party key that collides all the time: the answers come from the addresses.
    oracle = Oracle(facts_from_events(simulated_events))
    top_payers = ("top/payers", "7d", None)
    colliding = "hash({}) % 3"
    async with delivered(simulated_events, tmp_path, "duckdb") as analytics:
        assert isinstance(analytics.source, DuckDBAnalyticsSource)
        store = analytics.source.store
        source = DuckDBAnalyticsSource(store, DuckDBTuning(party_key=colliding))
        await assert_everything_matches(Analytics(source), oracle, SIM_END)
        # ... which the check decided: these keys do merge parties of the window.
        [(payers, keys)] = store.query(
            f"SELECT count(DISTINCT payer), count(DISTINCT {colliding.format('payer')}) "
            "FROM payment WHERE status = 'settled'"
        )
    assert isinstance(payers, int) and isinstance(keys, int) and keys < payers
    assert oracle.everything(SIM_END)[top_payers]


@pytest.mark.parametrize("tied_at_most", [0, 1, DuckDBTuning().tied_at_most])
async def test_duckdb_top_lists_cut_ties_by_address(tied_at_most: int, tmp_path: Path) -> None:
    # Twenty payers, payees and routes tie: a top 3 takes the first by address, whether
    # every tied row was fetched by key or too many tied and the addresses decided.
    parties = [f"0x{(i * 7) % 20:040x}" for i in range(20)]
    events: list[Event] = []
    for i, party in enumerate(parties):
        payee = "0xf" + party[3:]
        events += [
            received(f"t{i}", AT - 100, payer=party, payee=payee, amount="2"),
            settled(f"t{i}", AT - 50),
        ]
    first = sorted(parties)[:3]
    async with delivered(events, tmp_path, "duckdb") as default:
        assert isinstance(default.source, DuckDBAnalyticsSource)
        tuning = DuckDBTuning(tied_at_most=tied_at_most)
        analytics = Analytics(DuckDBAnalyticsSource(default.source.store, tuning))
        payers = await analytics.top_payers(Window.H1, AT, limit=3)
        payees = await analytics.top_payees(Window.H1, AT, limit=3)
        routes = await analytics.top_routes(Window.H1, AT, limit=3)
    assert [p.address for p in payers] == first
    assert [p.address for p in payees] == ["0xf" + p[3:] for p in first]
    assert [(r.payer, r.payee) for r in routes] == [(p, "0xf" + p[3:]) for p in first]


_MANY_PARTIES = 200_000


@pytest.fixture(scope="module")
def many_parties(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store file: 200,000 settled payments in an hour, each from its own payer, to 997
    payees; payment ``i`` from payer ``i`` pays ``(i * 7919) % 1000003``."""
    path = tmp_path_factory.mktemp("parties") / "store.duckdb"
    asyncio.run(DuckDBStore.open(path).close())
    with duckdb.connect(str(path)) as conn:
        conn.execute(
            "INSERT INTO payment (key, time_ms, network, status, payment_id, payer, payee, "
            "amount_micro, fee_micro, settlement_ms) SELECT 'k' || i, $1 - i % 3600000, "
            "'eip155:8453', 'settled', 'p' || i, printf('0x%040x', i), "
            "printf('0xe%039x', i % 997), (i * 7919) % 1000003, 0, 1.0 FROM range($2) AS t(i)",
            [AT, _MANY_PARTIES],
        )
    return path


async def test_duckdb_top_lists_and_buckets_of_many_parties_fit_a_small_buffer_pool(
    many_parties: Path,
) -> None:
    # Aggregated by address, 200,000 payers and pairs do not fit in 32MB.
    amounts = [(i * 7919) % 1000003 for i in range(_MANY_PARTIES)]
    payees: dict[int, list[int]] = {}
    for i, amount in enumerate(amounts):
        payees.setdefault(i % 997, []).append(amount)
    store = DuckDBStore.open(many_parties, memory_limit="32MB")
    try:
        source = DuckDBAnalyticsSource(store)
        [lists] = (await source.top_lists(AT, [HOUR_MS], 3)).values()
        [buckets] = (await source.settled_buckets(AT, [HOUR_MS], HOUR_MS)).values()
    finally:
        await store.close()
    top = sorted(range(_MANY_PARTIES), key=lambda i: (-amounts[i], i))[:3]
    assert [(p.address, p.amount_micro) for p in lists.payers] == [
        (f"0x{i:040x}", amounts[i]) for i in top
    ]
    assert [(r.payer, r.amount_micro) for r in lists.routes] == [
        (f"0x{i:040x}", amounts[i]) for i in top
    ]
    top_payees = sorted(payees, key=lambda q: (-sum(payees[q]), q))[:3]
    assert [(p.address, p.amount_micro, p.unique_payers) for p in lists.payees] == [
        (f"0xe{q:039x}", sum(payees[q]), len(payees[q])) for q in top_payees
    ]
    by_hour: dict[int, list[int]] = {}
    for i in range(_MANY_PARTIES):
        by_hour.setdefault((AT - i) - (AT - i) % HOUR_MS, []).append(i)
    assert sorted((b.start_ms, b.settled, b.unique_payers, b.unique_payees) for b in buckets) == [
        (hour, len(ids), len(ids), len({i % 997 for i in ids}))
        for hour, ids in sorted(by_hour.items())
    ]


def test_windows_parse_and_refuse_with_the_allowed_list() -> None:
    assert Window.parse("7d").ms == 7 * DAY_MS
    assert [w.bucket_ms for w in Window] == [HOUR_MS] * 3 + [DAY_MS] * 3
    with pytest.raises(WindowError) as caught:
        Window.parse("2h")
    assert str(caught.value) == "unknown window '2h'; allowed windows: 1h, 6h, 24h, 7d, 30d, 90d"


async def test_requests_outside_the_contract_are_refused(tmp_path: Path) -> None:
    async with delivered([], tmp_path, "duckdb") as analytics:
        for limit in (0, MAX_LIMIT + 1):
            with pytest.raises(AnalyticsRequestError, match="limit must be an integer from 1"):
                await analytics.compute("top/payers", Window.H1, AT, limit=limit)
        with pytest.raises(AnalyticsRequestError, match="allowed: volume, fees, payments"):
            await analytics.compute("timeseries", Window.H1, AT, metric="gas")
        with pytest.raises(AnalyticsRequestError, match="unknown analytic 'top'"):
            await analytics.compute("top", Window.H1, AT)


def test_money_is_a_six_place_string_from_micro_units_or_decimals() -> None:
    metrics = PaymentMetrics(
        totalPayments=1,
        successfulPayments=1,
        failedPayments=0,
        totalVolume=12_500_000,
        totalFees="0.000001",
        averagePaymentSize="1.5",
        medianPaymentSize=7,
        averageSettlementTime=1.5,
        p95SettlementTime=2.0,
        p99SettlementTime=2.0,
    )
    assert (metrics.totalVolume, metrics.totalFees) == ("12.500000", "0.000001")
    assert result_json(metrics).startswith(
        b'{"totalPayments":1,"successfulPayments":1,"failedPayments":0,'
        b'"totalVolume":"12.500000","totalFees":"0.000001","averagePaymentSize":"1.500000",'
        b'"medianPaymentSize":"0.000007"'
    )
    assert PaymentMetrics.model_validate_json(result_json(metrics)) == metrics


# ------------------------------------------------------------------ property-based cases

_PIDS = [f"p{i}" for i in range(10)]
_BIDS = ["b0", "b1", "b2"]
_PAYERS = ["0x" + "a" * 40, "0x" + "B" * 40, "0x" + "ab" * 20]
_PAYEES = ["0x" + "c" * 40, "0x" + "d" * 40, "addr-non-evm"]
_NETWORKS = ["eip155:8453", "eip155:10", "eip155:999"]
_AMOUNTS = ["0.000001", "0.000002", "0.000005", "1.5", "2.50", "0.0000015", "0.0000025", "1000000"]
_FEES = ["0", "0.01", "0.000001", "0.0000005"]
_SETTLEMENT_MS = [0, 0.25, 1_500, 30_000.5, 60_001, 2_000]


def _interesting_times(at: int) -> list[int]:
    hour = at - at % HOUR_MS
    day = at - at % DAY_MS
    times = [at, at - 1, at + 1, at - 60_000, at - 59_999, hour, hour - 1, day, day - 1]
    for span in WINDOWS_MS.values():
        times += [at - span, at - span + 1, at - span // 2, at - span // 2 + 1]
        start = at - span
        times += [start - start % DAY_MS, start - start % DAY_MS - 1]
    return times


_TIMES = st.one_of(
    st.sampled_from(_interesting_times(AT)),
    st.integers(AT - 2 * HOUR_MS, AT + 1),  # dense: ties, shared hours
    st.integers(AT - 91 * DAY_MS, AT + 1),
)
_MOSTLY = st.sampled_from([True, True, True, False])
"""A coin that usually says yes: most payments are received and settled."""


@st.composite
def _events(draw: st.DrawFn) -> list[Event]:
    events: list[Event] = []
    for pid in draw(st.lists(st.sampled_from(_PIDS), unique=True, max_size=8)):
        if draw(_MOSTLY):
            events.append(
                received(
                    pid,
                    draw(_TIMES),
                    amount=draw(st.sampled_from(_AMOUNTS)),
                    network=draw(st.sampled_from(_NETWORKS)),
                    payer=draw(st.sampled_from(_PAYERS)),
                    payee=draw(st.sampled_from(_PAYEES)),
                )
            )
        if draw(st.booleans()):
            events.append(verified(pid, draw(_TIMES)))
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            event = settled(
                pid,
                draw(_TIMES),
                fee=draw(st.sampled_from(_FEES)),
                settlement_ms=draw(st.sampled_from(_SETTLEMENT_MS)),
            )
            if draw(st.booleans()):
                event["id"] = f"settled-{len(events)}"
            if draw(st.booleans()):
                event["data"]["network"] = draw(st.sampled_from(_NETWORKS))
            events.append(event)
        if draw(st.booleans()):
            events.append(
                failed(pid, draw(_TIMES), network=draw(st.sampled_from([None, *_NETWORKS])))
            )
    for _ in range(draw(st.integers(0, 2))):
        events.append(
            failed("unknown", draw(_TIMES), network=draw(st.sampled_from([None, *_NETWORKS])))
        )
    for bid in draw(st.lists(st.sampled_from(_BIDS), unique=True, max_size=3)):
        if draw(st.booleans()):
            events.append(
                batch_created(
                    bid,
                    draw(_TIMES),
                    count=draw(st.integers(1, 7)),
                    network=draw(st.sampled_from(_NETWORKS)),
                )
            )
        if draw(st.booleans()):
            events.append(batch_settled(bid, draw(_TIMES), gas=str(draw(st.integers(0, 10**20)))))
    for _ in range(draw(st.integers(0, 3))):
        events.append(
            {
                "type": "revenue:recorded",
                "data": {
                    "kind": draw(st.sampled_from(["gas_sponsorship", "premium"])),
                    "amount": draw(st.sampled_from(_AMOUNTS)),
                    "network": draw(st.sampled_from(_NETWORKS)),
                    "timestamp": draw(_TIMES),
                },
            }
        )
    for _ in range(draw(st.integers(0, 3))):
        events.append(
            {
                "type": "websocket:clients",
                "data": {"count": draw(st.integers(0, 50)), "timestamp": draw(_TIMES)},
            }
        )
    if events:
        events += draw(st.lists(st.sampled_from(events), max_size=3))  # re-deliveries
    return draw(st.permutations(events))


def _run(coroutine_factory: Callable[[], Any]) -> None:
    asyncio.run(coroutine_factory())


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(events=_events(), shift=st.sampled_from([0, -1, 1, -59_999]))
def test_property_every_analytic_matches_the_oracle(events: list[Event], shift: int) -> None:
    _run(lambda: _check(events, ats=(AT + shift,)))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    events=_events(),
    name=st.sampled_from(ANALYTIC_NAMES),
    window=st.sampled_from(list(Window)),
    limit=st.integers(1, 4),
    metric=st.sampled_from(TIME_SERIES_METRICS),
)
def test_property_on_demand_answers_match_the_oracle(
    events: list[Event], name: str, window: Window, limit: int, metric: str
) -> None:
    async def check() -> None:
        expected = Oracle(facts_from_events(events)).answer(name, window.value, AT, limit, metric)
        for store in STORES:
            with tempfile.TemporaryDirectory() as directory:
                async with delivered(events, Path(directory), store) as analytics:
                    got = await analytics.compute(name, window, AT, limit=limit, metric=metric)
            assert result_data(got) == expected, store

    _run(check)
