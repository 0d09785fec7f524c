"""The one retry rule: jittered exponential backoff and ``Retry-After`` parsing."""

from __future__ import annotations

import random

import pytest

from exporter.retry import MAX_RETRY_AFTER_SECONDS, backoff_seconds, parse_retry_after

NOW = 1_767_225_600.0  # Thu, 01 Jan 2026 00:00:00 GMT


def test_backoff_doubles_from_base_and_jitters_within_the_upper_half() -> None:
    """Attempt n draws from [d/2, d] with d = base * 2**n, and the draws differ."""
    rng = random.Random(18)
    for attempt in range(6):
        delay = 0.5 * 2**attempt
        draws = [backoff_seconds(attempt, 0.5, 1_000.0, rng) for _ in range(200)]
        assert all(delay / 2 <= draw <= delay for draw in draws), attempt
        assert len(set(draws)) == len(draws)  # jittered, not a constant
        assert min(draws) < delay * 0.55 and max(draws) > delay * 0.95  # the whole half


def test_backoff_never_exceeds_the_cap_however_many_attempts() -> None:
    """Past the cap the delay stays there, even for an attempt count that would overflow."""
    rng = random.Random(7)
    for attempt in (6, 7, 60, 5_000):
        draw = backoff_seconds(attempt, 0.5, 30.0, rng)
        assert 15.0 <= draw <= 30.0
    assert 0.005 <= backoff_seconds(0, 0.5, 0.01, rng) <= 0.01  # a cap below the base wins


def test_backoff_is_reproducible_with_a_seeded_generator() -> None:
    """The same seed gives the same pauses (what lets tests pin the forwarder's waits)."""
    first = [backoff_seconds(n, 0.25, 5.0, random.Random(3)) for n in range(5)]
    again = [backoff_seconds(n, 0.25, 5.0, random.Random(3)) for n in range(5)]
    assert first == again


@pytest.mark.parametrize(("attempt", "base", "cap"), [(-1, 0.5, 30.0), (0, 0.0, 30.0), (0, 1, -1)])
def test_backoff_refuses_nonsense(attempt: int, base: float, cap: float) -> None:
    """A negative attempt, or a base or cap that is not positive, is a programming error."""
    with pytest.raises(ValueError):
        backoff_seconds(attempt, base, cap)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0", 0.0), (" 0.5 ", 0.5), ("120", 120.0)],
)
def test_retry_after_delta_seconds(header: str, seconds: float) -> None:
    """Delta seconds are taken as they are (decimals too, which test servers send)."""
    assert parse_retry_after(header, NOW, default=5.0) == seconds


def test_retry_after_http_dates_count_from_now() -> None:
    """An HTTP date is the time left until it; a date already past means retry now."""
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", NOW, default=5.0) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:02:00 -0000", NOW, default=5.0) == 120.0
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", NOW, default=5.0) == 0.0


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "soon", "-5", "-0.5", "+3", "1e3", "inf", "nan", "0x10", "Thu, 99 Foo"],
)
def test_retry_after_absent_or_garbage_gives_the_default(header: str | None) -> None:
    """Neither delta seconds nor a date (negative numbers included): the caller's default."""
    assert parse_retry_after(header, NOW, default=4.25) == 4.25


def test_retry_after_is_capped_in_both_forms() -> None:
    """One cap for every Retry-After: a day's delay or a date next year is shortened."""
    assert parse_retry_after("86400000", NOW, default=5.0) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after("9" * 400, NOW, default=5.0) == MAX_RETRY_AFTER_SECONDS
    next_year = "Fri, 01 Jan 2027 00:00:00 GMT"
    assert parse_retry_after(next_year, NOW, default=5.0) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after("90", NOW, default=5.0, cap=60.0) == 60.0
    assert parse_retry_after(None, NOW, default=90.0, cap=60.0) == 60.0
