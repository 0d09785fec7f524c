"""The analytics' derivation rules where mutation testing found them unpinned: what a source is
asked for (the ranks of the median amount and of the p95/p99 settlement times, counted over
the settlements that have a time), settlement figures taken over timed settlements only, and
the JSON-ready value of an answer holding plain JSON types only."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from analytics_helpers import delivered
from conftest import BASE_MS, batch_created, batch_settled, failed, received, settled

from exporter.analytics import result_data
from exporter.analytics.derive import rank_request, top_payees, top_payers, top_routes
from exporter.analytics.models import (
    HOUR_MS,
    PayeeTotals,
    PayerTotals,
    RankRequest,
    RouteTotals,
    TopLists,
    TopPayee,
    TopPayer,
    TopRoute,
    Window,
)

BASE = "eip155:8453"
OP = "eip155:10"
POLYGON = "eip155:137"
DAY = 86_400_000


def untimed_settlement(pid: str, ts: int) -> dict[str, Any]:
    """A ``payment:settled`` without its optional ``settlementTime``."""
    event = settled(pid, ts)
    del event["data"]["settlementTime"]
    return event


# ------------------------------------------------------------------ what a source is asked


@pytest.mark.parametrize(
    ("settled_count", "timed", "request_"),
    [
        (0, None, RankRequest(settled=0)),
        (0, 0, RankRequest(settled=0)),
        # every settled record has a time: the settlement ranks count all of them
        (10, None, RankRequest(settled=10, amount=(5, 6), settlement=(10, 10))),
        (10, 10, RankRequest(settled=10, amount=(5, 6), settlement=(10, 10))),
        (3, None, RankRequest(settled=3, amount=(2,), settlement=(3, 3))),
        # four of ten have a time: the ranks are into those four, and the count is sent
        (10, 4, RankRequest(settled=10, amount=(5, 6), settlement=(4, 4), timed=4)),
        (40, 20, RankRequest(settled=40, amount=(20, 21), settlement=(19, 20), timed=20)),
        # none has a time: no settlement rank is asked for
        (3, 0, RankRequest(settled=3, amount=(2,), settlement=(), timed=0)),
    ],
    ids=[
        "none",
        "none-timed-0",
        "all-timed",
        "all-timed-given",
        "odd",
        "four-of-ten",
        "twenty-of-forty",
        "untimed",
    ],
)
def test_the_ranks_asked_of_a_source(
    settled_count: int, timed: int | None, request_: RankRequest
) -> None:
    asked = rank_request(settled_count, timed)
    assert asked == request_
    assert asked.timed_count == (settled_count if timed is None else timed)


# ------------------------------------------------------------------ timed settlements only


async def test_settlement_figures_are_taken_over_the_settlements_with_a_time(
    tmp_path: Path,
) -> None:
    """Ten settled payments, four with a time (1 s, 2 s, 3 s, 10 s): the mean is 4 s over
    those four, p95 and p99 are the largest of them; counts and volume take all ten."""
    events: list[dict[str, Any]] = []
    times = {0: 1000.0, 3: 2000.0, 5: 3000.0, 8: 10_000.0}
    for i in range(10):
        events.append(received(f"p{i}", BASE_MS + i, amount=f"{i + 1}.00"))
        end = BASE_MS + 1000 + i
        events.append(
            settled(f"p{i}", end, settlement_ms=times[i])
            if i in times
            else untimed_settlement(f"p{i}", end)
        )
    at = BASE_MS + 60_000
    async with delivered(events, tmp_path, "duckdb") as analytics:
        payments = await analytics.payments(Window.H1, at)
        health = await analytics.health(Window.H1, at)
        [network] = await analytics.networks(Window.H1, at)
        snapshot = await analytics.compute_all(at, [Window.H1], realtime=False)
    assert (payments.successfulPayments, payments.totalVolume) == (10, "55.000000")
    assert payments.medianPaymentSize == "5.500000"
    assert payments.averageSettlementTime == 4000.0
    assert (payments.p95SettlementTime, payments.p99SettlementTime) == (10_000.0, 10_000.0)
    assert health.averageSettlementTime == 4000.0
    assert (network.chainId, network.averageConfirmationTime) == (BASE, 4000.0)
    assert result_data(snapshot[next(k for k in snapshot if k.name == "payments")]) == (
        result_data(payments)
    )


# ------------------------------------------------------------------ JSON-ready values


def _plain(value: object) -> bool:
    """Whether ``value`` is built of JSON's own Python types only (not subclasses)."""
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if type(value) is list:
        return all(_plain(v) for v in value)
    return type(value) in (str, int, float, bool) or value is None


async def test_an_answers_json_ready_value_holds_plain_json_types(tmp_path: Path) -> None:
    """A writer that knows only JSON's types (YAML's safe dumper, msgpack) can take the value
    of every analytic: the time series' window is the string ``"1h"``, not the enum."""
    events = [received("a", BASE_MS), settled("a", BASE_MS + 1000)]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        snapshot = await analytics.compute_all(BASE_MS + 60_000, [Window.H1])
    series = result_data(snapshot[next(k for k in snapshot if k.name == "timeseries")])
    assert isinstance(series, dict)
    assert type(series["window"]) is str and series["window"] == "1h"
    for key, answer in snapshot.items():
        assert _plain(result_data(answer)), key


# ------------------------------------------------------------------ networks


async def test_networks_list_payment_networks_only_and_no_gas_without_batches(
    tmp_path: Path,
) -> None:
    """A network with only a settled batch in the window is not listed (it has no payment);
    a network with payments and no batch has spent no gas, at no average cost."""
    events = [
        received("a", BASE_MS),
        settled("a", BASE_MS + 1000),
        batch_created("b1", BASE_MS, network=OP),
        batch_settled("b1", BASE_MS + 2000, gas="84000"),
        received("open", BASE_MS, network=POLYGON),  # neither settled nor failed yet
    ]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        networks = await analytics.networks(Window.H1, BASE_MS + 60_000)
    assert [(n.chainId, n.averageGasCost, n.totalGasSpent, n.successRate) for n in networks] == [
        (BASE, "0.000000", "0", 100.0),
        (POLYGON, "0.000000", "0", 100.0),  # no payment ended: nothing failed
    ]
    assert [n.totalPayments for n in networks] == [1, 1]


# ------------------------------------------------------------------ revenue


def _party(digit: str) -> str:
    return "0x" + digit * 40


async def test_revenue_days_networks_projection_and_growth(tmp_path: Path) -> None:
    """Seven days to 2026-01-05T00:00Z span eight UTC days, each listed (zero-filled); only
    networks with a settled payment have revenue (one settled payment is enough); the
    projection scales the window's fees to 30 days; growth compares the window's halves."""
    a, b, x, y = (_party(d) for d in "ab12")
    events = [
        received("a", BASE_MS, amount="2.00", payer=a, payee=x),
        settled("a", BASE_MS + 2000, fee="0.10"),
        received("b", BASE_MS, amount="1.00", payer=b, payee=x, network=OP),
        settled("b", BASE_MS + 2000, fee="0.05"),
        received("d", BASE_MS + DAY, network=POLYGON),
        failed("d", BASE_MS + DAY + 2000),
        received("c", BASE_MS + 2 * DAY, amount="4.00", payer=a, payee=y),
        settled("c", BASE_MS + 2 * DAY + 2000, fee="0.20"),
    ]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        revenue = await analytics.revenue(Window.D7, BASE_MS + 4 * DAY)
    assert revenue.totalRevenue == "0.350000"
    assert revenue.revenueByNetwork == {BASE: "0.300000", OP: "0.050000"}
    zero = (0, "0.000000", "0.000000", 0, 0)
    assert [
        (d.date, (d.payments, d.volume, d.fees, d.uniquePayers, d.uniquePayees))
        for d in revenue.revenueByDay
    ] == [
        ("2025-12-29", zero),
        ("2025-12-30", zero),
        ("2025-12-31", zero),
        ("2026-01-01", (2, "3.000000", "0.150000", 2, 1)),
        ("2026-01-02", zero),  # a failed payment is no revenue
        ("2026-01-03", (1, "4.000000", "0.200000", 1, 1)),
        ("2026-01-04", zero),
        ("2026-01-05", zero),
    ]
    assert revenue.projectedMonthlyRevenue == "1.500000"  # 0.35 * 30 / 7
    # first half (to 2026-01-01T12:00Z) 0.15, second half 0.20
    assert revenue.growthRate == pytest.approx(100 * (0.20 - 0.15) / 0.15)


def _revenue(kind: str, amount: str, ts: int) -> dict[str, Any]:
    """A ``revenue:recorded`` event."""
    return {
        "type": "revenue:recorded",
        "data": {"kind": kind, "amount": amount, "network": BASE, "timestamp": ts},
    }


async def test_the_breakdown_adds_each_kind_of_revenue_to_the_fees(tmp_path: Path) -> None:
    events = [
        received("a", BASE_MS),
        settled("a", BASE_MS + 2000, fee="0.10"),
        _revenue("gas_sponsorship", "0.020000", BASE_MS + 3000),
        _revenue("gas_sponsorship", "0.010000", BASE_MS + 4000),
        _revenue("premium", "5.00", BASE_MS + 5000),
    ]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        breakdown = await analytics.revenue_breakdown(Window.H1, BASE_MS + 60_000)
        fees_only = await analytics.revenue_breakdown(Window.H1, BASE_MS + 2500)
    assert (
        breakdown.facilitatorFees,
        breakdown.gasSponsorship,
        breakdown.premiumFeatures,
        breakdown.total,
    ) == ("0.100000", "0.030000", "5.000000", "5.130000")
    assert (fees_only.gasSponsorship, fees_only.premiumFeatures, fees_only.total) == (
        "0.000000",
        "0.000000",
        "0.100000",
    )


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set 12 hours behind UTC (and restored after): every UTC
    midnight is noon of the day before there."""
    tzset = getattr(time, "tzset", None)
    if tzset is None:
        pytest.skip("time.tzset is Unix only")
    monkeypatch.setenv("TZ", "WEST+12")  # POSIX form: needs no zone database
    tzset()
    yield
    monkeypatch.undo()
    tzset()


@pytest.mark.usefixtures("far_from_utc")
async def test_days_are_utc_days_whatever_the_hosts_time_zone(tmp_path: Path) -> None:
    events = [received("a", BASE_MS + 1000), settled("a", BASE_MS + 2000, fee="0.10")]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        revenue = await analytics.revenue(Window.D30, BASE_MS + DAY - 1)
    days = revenue.revenueByDay
    assert (days[0].date, days[-1].date) == ("2025-12-02", "2026-01-01")
    assert [(d.date, d.fees) for d in days if d.payments] == [("2026-01-01", "0.100000")]


# ------------------------------------------------------------------ empty and untimed windows


async def test_payments_of_untimed_settlements_and_of_an_empty_window(tmp_path: Path) -> None:
    """Settled payments none of which has a time: sizes are computed, every settlement figure
    is 0; a window with no payment at all has every figure 0."""
    events: list[dict[str, Any]] = []
    for i, amount in enumerate(["1.00", "2.00", "4.00"]):
        events.append(received(f"p{i}", BASE_MS + i, amount=amount))
        events.append(untimed_settlement(f"p{i}", BASE_MS + 1000 + i))
    async with delivered(events, tmp_path, "duckdb") as analytics:
        untimed = await analytics.payments(Window.H1, BASE_MS + 60_000)
        empty = await analytics.payments(Window.H1, BASE_MS - 1)
    assert (untimed.successfulPayments, untimed.averagePaymentSize) == (3, "2.333333")
    assert untimed.medianPaymentSize == "2.000000"
    assert (
        untimed.averageSettlementTime,
        untimed.p95SettlementTime,
        untimed.p99SettlementTime,
    ) == (0.0, 0.0, 0.0)
    assert empty.model_dump() == {
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


# ------------------------------------------------------------------ top lists


def test_top_lists_keep_the_first_limit_in_order_whatever_a_source_answers() -> None:
    """A source may answer more entries than the limit, in any order: the answer is the first
    ``limit`` by amount, ties by address (routes: payer, then payee)."""
    a, b, c = (_party(d) for d in "abc")
    lists = TopLists(
        payers=[
            PayerTotals(c, 1_000_000, 1, BASE_MS),
            PayerTotals(b, 3_000_000, 2, BASE_MS + 1),
            PayerTotals(a, 3_000_000, 3, BASE_MS + 2),
        ],
        payees=[
            PayeeTotals(c, 5_000_000, 1, 1),
            PayeeTotals(a, 1_000_000, 2, 2),
            PayeeTotals(b, 2_000_000, 3, 3),
        ],
        routes=[
            RouteTotals(a, c, 2_000_000, 1),
            RouteTotals(b, a, 2_000_000, 2),
            RouteTotals(a, b, 2_000_000, 3),
        ],
    )
    assert top_payers(lists, 2) == [
        TopPayer(address=a, totalPaid=3_000_000, paymentCount=3, lastPayment=BASE_MS + 2),
        TopPayer(address=b, totalPaid=3_000_000, paymentCount=2, lastPayment=BASE_MS + 1),
    ]
    assert top_payees(lists, 2) == [
        TopPayee(address=c, totalReceived=5_000_000, paymentCount=1, uniquePayers=1),
        TopPayee(address=b, totalReceived=2_000_000, paymentCount=3, uniquePayers=3),
    ]
    assert top_routes(lists, 2) == [
        TopRoute(payer=a, payee=b, volume=2_000_000, count=3),
        TopRoute(payer=a, payee=c, volume=2_000_000, count=1),
    ]
    assert len(top_payers(lists, 1)) == len(top_payees(lists, 1)) == len(top_routes(lists, 1)) == 1


async def test_an_hour_across_midnight_lists_both_utc_days(tmp_path: Path) -> None:
    """The revenue of a window shorter than a day lists every UTC day it touches."""
    events = [received("a", BASE_MS - 600_000), settled("a", BASE_MS - 500_000, fee="0.10")]
    async with delivered(events, tmp_path, "duckdb") as analytics:
        revenue = await analytics.revenue(Window.H1, BASE_MS + 1_800_000)
    assert [(d.date, d.payments, d.fees) for d in revenue.revenueByDay] == [
        ("2025-12-31", 1, "0.100000"),
        ("2026-01-01", 0, "0.000000"),
    ]


# ------------------------------------------------------------------ time-series buckets


@pytest.mark.parametrize(
    ("window", "bucket_ms", "points"),
    [
        (Window.H1, HOUR_MS, 2),
        (Window.H6, HOUR_MS, 7),
        (Window.H24, HOUR_MS, 25),  # a day is still hourly
        (Window.D7, DAY, 8),
        (Window.D30, DAY, 31),
        (Window.D90, DAY, 91),
    ],
)
async def test_time_series_are_hourly_up_to_a_day_and_daily_beyond(
    tmp_path: Path, window: Window, bucket_ms: int, points: int
) -> None:
    events = [received("a", BASE_MS - 600_000), settled("a", BASE_MS - 500_000)]
    at = BASE_MS + 1_800_000
    async with delivered(events, tmp_path, "duckdb") as analytics:
        series = await analytics.timeseries(window, at, "payments")
    starts = [p.timestamp for p in series.points]
    assert window.bucket_ms == bucket_ms
    assert len(starts) == points
    assert {b - a for a, b in itertools.pairwise(starts)} == {bucket_ms}
    assert starts[-1] == at - at % bucket_ms
    assert sum(p.value for p in series.points) == 1
