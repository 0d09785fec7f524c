"""The derivation rules of the analytics, each pinned at its boundaries."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.analytics.derive import growth_rate, health_level, median_ranks, nearest_rank
from exporter.events import round_half_even_div


@given(st.integers(-(10**30), 10**30), st.integers(1, 10**12))
def test_round_half_even_div_matches_exact_rational_rounding(
    numerator: int, denominator: int
) -> None:
    # round() of a Fraction rounds half to even, exactly.
    assert round_half_even_div(numerator, denominator) == round(Fraction(numerator, denominator))


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [(5, 2, 2), (7, 2, 4), (-5, 2, -2), (-7, 2, -4), (1, 3, 0), (2, 3, 1), (0, 7, 0)],
)
def test_round_half_even_div_ties_go_to_even(
    numerator: int, denominator: int, expected: int
) -> None:
    assert round_half_even_div(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("percentile", "n", "rank"),
    [(95, 20, 19), (99, 100, 99), (95, 21, 20), (99, 101, 100), (95, 1, 1), (50, 0, 0)],
)
def test_nearest_rank_is_exact_when_p_times_n_is_a_multiple_of_100(
    percentile: int, n: int, rank: int
) -> None:
    assert nearest_rank(percentile, n) == rank


def test_median_ranks_take_one_middle_for_odd_and_two_for_even() -> None:
    assert median_ranks(0) == ()
    assert median_ranks(5) == (3,)
    assert median_ranks(6) == (3, 4)


def test_health_boundaries_are_strictly_above() -> None:
    assert health_level(10.0, 0) == "degraded"  # 9 settled + 1 failed
    assert health_level(10.0001, 0) == "critical"
    assert health_level(5.0, 30_000) == "healthy"
    assert health_level(0, 30_001) == "degraded"
    assert health_level(0, 60_001) == "critical"


def test_growth_compares_second_half_with_first() -> None:
    assert growth_rate(total_fees=300, second_half=200) == 100.0
    assert growth_rate(total_fees=100, second_half=100) == 0.0  # nothing in the first half
