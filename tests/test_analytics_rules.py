"""The analytics' pure rules at their edges, each against a value worked out by hand: exact
half-to-even division, nearest ranks and median ranks, health levels at every threshold, the
buckets a window spans, the UTC date of an instant and the accepted top-list limits."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from exporter.analytics.derive import (
    bucket_starts,
    chain_name,
    health_level,
    median_ranks,
    nearest_rank,
    utc_date,
)
from exporter.analytics.models import (
    DAY_MS,
    HOUR_MS,
    MAX_LIMIT,
    AnalyticKey,
    AnalyticsRequestError,
    NetworkMetrics,
    Window,
    analytic_key,
    check_limit,
)
from exporter.events import round_half_even_div


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (7, 2, 4),  # 3.5 -> 4 (even)
        (5, 2, 2),  # 2.5 -> 2 (even)
        (9, 4, 2),  # 2.25 -> 2
        (11, 4, 3),  # 2.75 -> 3
        (1, 3, 0),
        (2, 3, 1),
        (6, 3, 2),
        (0, 5, 0),
        (1, 2, 0),  # 0.5 -> 0 (even)
        (3, 2, 2),  # 1.5 -> 2 (even)
    ],
)
def test_round_half_even_div(numerator: int, denominator: int, expected: int) -> None:
    assert round_half_even_div(numerator, denominator) == expected


@given(st.integers(0, 10**15), st.integers(1, 10**6))
def test_round_half_even_div_is_pythons_round_of_the_exact_quotient(n: int, d: int) -> None:
    assert round_half_even_div(n, d) == round(Fraction(n, d))


@pytest.mark.parametrize(
    ("percentile", "n", "rank"),
    [(95, 20, 19), (99, 100, 99), (95, 100, 95), (99, 20, 20), (95, 1, 1), (50, 3, 2), (0, 0, 0)],
)
def test_nearest_rank(percentile: int, n: int, rank: int) -> None:
    assert nearest_rank(percentile, n) == rank


@given(st.integers(1, 100), st.integers(0, 10_000))
def test_nearest_rank_is_the_ceiling_of_p_n_over_100(percentile: int, n: int) -> None:
    assert nearest_rank(percentile, n) == math.ceil(Fraction(percentile * n, 100))


@pytest.mark.parametrize(
    ("n", "ranks"), [(0, ()), (1, (1,)), (2, (1, 2)), (3, (2,)), (4, (2, 3)), (7, (4,))]
)
def test_median_ranks(n: int, ranks: tuple[int, ...]) -> None:
    assert median_ranks(n) == ranks


@pytest.mark.parametrize(
    ("error_rate", "settlement_ms", "level"),
    [
        (0.0, 0.0, "healthy"),
        (5.0, 30_000.0, "healthy"),  # both exactly at the degraded thresholds
        (5.000001, 0.0, "degraded"),
        (0.0, 30_000.5, "degraded"),
        (10.0, 60_000.0, "degraded"),  # both exactly at the critical thresholds
        (10.000001, 0.0, "critical"),
        (0.0, 60_000.5, "critical"),
        (100.0, 0.0, "critical"),
    ],
)
def test_health_level_at_every_threshold(
    error_rate: float, settlement_ms: float, level: str
) -> None:
    assert health_level(error_rate, settlement_ms) == level


def test_bucket_starts_cover_the_window_from_the_bucket_of_its_start() -> None:
    at = 5 * DAY_MS + 3 * HOUR_MS + 17
    assert list(bucket_starts(at, 2 * DAY_MS, DAY_MS)) == [3 * DAY_MS, 4 * DAY_MS, 5 * DAY_MS]
    # on a bucket edge the bucket starting there is included
    assert list(bucket_starts(2 * DAY_MS, DAY_MS, DAY_MS)) == [DAY_MS, 2 * DAY_MS]
    assert list(bucket_starts(HOUR_MS - 1, HOUR_MS, HOUR_MS)) == [-HOUR_MS, 0]


def test_utc_date() -> None:
    assert utc_date(1_767_225_600_000) == "2026-01-01"
    assert utc_date(1_767_225_599_999) == "2025-12-31"


@pytest.mark.parametrize("limit", [1, 10, MAX_LIMIT])
def test_limits_in_range_are_accepted(limit: int) -> None:
    assert check_limit(limit) == limit


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1, True, 2.0, "3"])
def test_limits_out_of_range_name_the_range(limit: object) -> None:
    with pytest.raises(AnalyticsRequestError, match=f"from 1 to {MAX_LIMIT}, got"):
        check_limit(limit)  # type: ignore[arg-type]


def test_chain_names() -> None:
    assert chain_name("eip155:8453") == "Base"
    assert chain_name("eip155:999999") == "eip155:999999"


def test_analytic_keys_of_valid_requests() -> None:
    assert analytic_key("realtime", Window.H1) == AnalyticKey("realtime", None)
    assert analytic_key("payments", Window.H6, "fees") == AnalyticKey("payments", Window.H6)
    assert analytic_key("timeseries", Window.D7, "fees") == AnalyticKey(
        "timeseries", Window.D7, "fees"
    )


@pytest.mark.parametrize(
    ("name", "window", "metric", "message"),
    [
        (
            "nope",
            Window.H1,
            None,
            "unknown analytic 'nope'; known: payments, networks, revenue, revenue/breakdown, "
            "top/payers, top/payees, top/routes, timeseries, realtime, health",
        ),
        ("payments", None, None, "analytic 'payments' needs a window"),
        (
            "timeseries",
            Window.H1,
            "gas",
            "unknown time-series metric 'gas'; allowed: volume, fees, payments",
        ),
    ],
)
def test_a_bad_analytics_request_names_the_problem_and_the_choices(
    name: str, window: Window | None, metric: str | None, message: str
) -> None:
    with pytest.raises(AnalyticsRequestError) as raised:
        analytic_key(name, window, metric)
    assert str(raised.value) == message


def _network(gas: object, fees: object = 0) -> NetworkMetrics:
    return NetworkMetrics(
        chainId="eip155:8453",
        chainName="Base",
        totalPayments=1,
        totalVolume=1_500_000,
        totalFees=fees,
        averageGasCost=0,
        totalGasSpent=gas,
        successRate=100.0,
        averageConfirmationTime=1.0,
    )


def test_result_integers_and_money_accept_exact_forms() -> None:
    network = _network("0021000", "12.5")
    assert (network.totalGasSpent, network.totalFees, network.totalVolume) == (
        "21000",
        "12.500000",
        "1.500000",
    )
    assert _network(2**70).totalGasSpent == str(2**70)


@pytest.mark.parametrize(
    ("gas", "fees", "message"),
    [
        (True, 0, "must be an integer or an integer string such as '21000', not a boolean"),
        ("２１", 0, "must be an integer or an integer string such as '21000', got '２１'"),
        ("-5", 0, "must be an integer or an integer string such as '21000', got '-5'"),
        (
            1,
            True,
            "must be micro-units (int) or a decimal string such as '12.500000', not a boolean",
        ),
        (1, "1e3", "must be micro-units (int) or a decimal string such as '12.500000', got '1e3'"),
    ],
)
def test_result_integers_and_money_refuse_other_forms_saying_why(
    gas: object, fees: object, message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        _network(gas, fees)
    [error] = raised.value.errors()
    assert error["msg"] == f"Value error, {message}"
