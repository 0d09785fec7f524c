"""The scheduler: first run at start, cadence, isolation of failures, staleness, timeouts."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
from collections.abc import Awaitable, Callable

import pytest
from conftest import async_wait_until
from prometheus_client import CollectorRegistry

from exporter.analytics.scheduler import AlignedInterval, Job, Scheduler


def _job(
    key: str,
    run: Callable[[], Awaitable[object]],
    interval: float = 3600,
    timeout: float = 5,
) -> Job[object]:
    query, window = key.split(":")
    return Job(key, query, window, interval, timeout, run)


async def test_every_job_runs_once_at_start(registry: CollectorRegistry) -> None:
    counter = itertools.count(1)

    async def payments() -> int:
        return next(counter)

    scheduler = Scheduler(registry, [_job("payments:24h", payments), _job("health:1h", payments)])
    scheduler.start()
    try:

        async def both_cached() -> bool:
            return scheduler.get("payments:24h") is not None and (
                scheduler.get("health:1h") is not None
            )

        await async_wait_until(both_cached, what="first runs")
    finally:
        await scheduler.stop()
    labels = {"query": "payments", "window": "24h"}
    assert registry.get_sample_value("exporter_analytics_query_duration_seconds_count", labels)
    assert registry.get_sample_value("exporter_analytics_last_success_timestamp_seconds", labels)


async def test_failure_keeps_last_result_marked_stale(registry: CollectorRegistry) -> None:
    outcomes: list[object] = [41, RuntimeError("store down"), 42]

    async def flaky() -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def healthy() -> str:
        return "ok"

    scheduler = Scheduler(registry, [_job("revenue:7d", flaky), _job("health:24h", healthy)])
    assert await scheduler.refresh("revenue:7d")
    assert not await scheduler.refresh("revenue:7d")
    assert await scheduler.refresh("health:24h")  # unaffected by the other's failure
    cached = scheduler.get("revenue:7d")
    assert cached is not None
    assert (cached.value, cached.stale, cached.error) == (41, True, "RuntimeError: store down")
    labels = {"query": "revenue", "window": "7d"}
    assert registry.get_sample_value("exporter_analytics_stale", labels) == 1
    assert registry.get_sample_value("exporter_analytics_failures_total", labels) == 1
    assert await scheduler.refresh("revenue:7d")
    cached = scheduler.get("revenue:7d")
    assert cached is not None and (cached.value, cached.stale) == (42, False)
    assert registry.get_sample_value("exporter_analytics_stale", labels) == 0


async def test_slow_job_times_out(registry: CollectorRegistry) -> None:
    never = asyncio.Event()

    async def hangs() -> None:
        await never.wait()

    scheduler = Scheduler(registry, [_job("networks:90d", hangs, timeout=0.05)])
    assert not await scheduler.refresh("networks:90d")
    assert scheduler.get("networks:90d") is None
    assert (
        registry.get_sample_value(
            "exporter_analytics_failures_total", {"query": "networks", "window": "90d"}
        )
        == 1
    )


async def test_a_job_never_overlaps_itself(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    running = 0
    most = 0
    release = asyncio.Event()
    calls = 0

    async def slow() -> int:
        nonlocal running, most, calls
        calls += 1
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return calls

    scheduler = Scheduler(registry, [_job("top:1h", slow, interval=0.02)])
    caplog.set_level(logging.INFO)
    scheduler.start()
    try:

        async def started() -> bool:
            return calls >= 1

        await async_wait_until(started, what="first run")
        await asyncio.sleep(0.2)  # ten intervals pass while the first run holds
        assert (calls, most) == (1, 1)
        release.set()

        async def ran_again() -> bool:
            return calls >= 2

        await async_wait_until(ran_again, what="next run after the first finished")
    finally:
        await scheduler.stop()
    assert most == 1
    # The ticks skipped while the first run held are the design, not news for the log.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("apscheduler")] == []


async def test_stop_cancels_a_running_refresh_quietly(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    scheduler = Scheduler(registry, [_job("payments:30d", hangs)])
    scheduler.start()
    await asyncio.wait_for(started.wait(), 5)
    with caplog.at_level(logging.INFO):
        await scheduler.stop()
        # The scheduler's executor reports a job's end on a later turn of the loop.
        await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert scheduler.get("payments:30d") is None
    labels = {"query": "payments", "window": "30d"}
    assert registry.get_sample_value("exporter_analytics_failures_total", labels) in (None, 0)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The records logged at INFO or above, as ``logger: message``."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO]


async def test_successful_refreshes_log_nothing_but_start_and_stop(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    async def fine() -> int:
        nonlocal runs
        runs += 1
        return runs

    scheduler = Scheduler(registry, [_job("payments:1h", fine, interval=0.01)])
    with caplog.at_level(logging.INFO):
        scheduler.start()
        try:

            async def ran_often() -> bool:
                return runs >= 10

            await async_wait_until(ran_often, what="ten refreshes")
        finally:
            await scheduler.stop()
            await asyncio.sleep(0)  # APScheduler reports a run's end on a later turn
    assert _lines(caplog) == [
        "exporter.analytics.scheduler: analytics scheduler started",
        "exporter.analytics.scheduler: analytics scheduler stopped",
    ]


async def test_a_failure_and_its_recovery_log_one_line_each(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[object] = [1, *[ConnectionRefusedError("store down")] * 5, 2, 3, 4]

    async def flaky() -> object:
        outcome = outcomes.pop(0) if outcomes else 5
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    scheduler = Scheduler(registry, [_job("revenue:24h", flaky, interval=0.01)])
    with caplog.at_level(logging.INFO):
        scheduler.start()
        try:

            async def recovered() -> bool:
                cached = scheduler.get("revenue:24h")
                return not outcomes and cached is not None and not cached.stale

            await async_wait_until(recovered, what="failures then recovery")
        finally:
            await scheduler.stop()
            await asyncio.sleep(0)
    lines = _lines(caplog)
    assert lines == [
        "exporter.analytics.scheduler: analytics scheduler started",
        "exporter.analytics.scheduler: analytics refresh failed",
        "exporter.analytics.scheduler: analytics refresh recovered",
        "exporter.analytics.scheduler: analytics scheduler stopped",
    ]
    failed, recovered_record = (
        r for r in caplog.records if r.getMessage().startswith("analytics refresh")
    )
    assert failed.levelno == logging.WARNING
    assert vars(failed)["error"] == "ConnectionRefusedError: store down"
    assert vars(failed)["job"] == "revenue:24h"
    assert vars(recovered_record)["failures"] == 5


async def test_debug_level_keeps_apscheduler_lines(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator who asks for debug logs still sees APScheduler's own lines."""
    logging.getLogger("apscheduler").setLevel(logging.NOTSET)
    ran = asyncio.Event()

    async def once() -> None:
        ran.set()

    scheduler = Scheduler(registry, [_job("health:1h", once)])
    with caplog.at_level(logging.DEBUG):
        scheduler.start()
        try:
            await asyncio.wait_for(ran.wait(), 5)
        finally:
            await scheduler.stop()
            await asyncio.sleep(0)
    assert any(r.name.startswith("apscheduler") for r in caplog.records)


def _utc(hour: int, minute: int, second: int, microsecond: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 12, 6, hour, minute, second, microsecond, datetime.UTC)


def test_a_job_fires_at_once_then_on_multiples_of_its_cadence() -> None:
    trigger = AlignedInterval(15)
    now = _utc(1, 2, 7, 500_000)
    first = trigger.get_next_fire_time(None, now)
    assert first == now
    second = trigger.get_next_fire_time(first, now)
    assert second == _utc(1, 2, 15)
    assert trigger.get_next_fire_time(second, now) == _utc(1, 2, 30)
    # Cadences that divide one another fall due together: every 60 s one is a 15 s one.
    minute = AlignedInterval(60).get_next_fire_time(first, now)
    assert minute == _utc(1, 3, 0)
    assert (minute - second).total_seconds() % 15 == 0


def test_a_phase_delays_every_fire_time_alike() -> None:
    now = _utc(1, 2, 7, 500_000)
    quarter, minute = AlignedInterval(15, phase=4.25), AlignedInterval(60, phase=4.25)
    first = quarter.get_next_fire_time(None, now)
    assert quarter.get_next_fire_time(first, now) == _utc(1, 2, 19, 250_000)
    assert quarter.get_next_fire_time(_utc(1, 2, 19, 250_000), now) == _utc(1, 2, 34, 250_000)
    assert minute.get_next_fire_time(first, now) == _utc(1, 3, 4, 250_000)
    # Just before its fire time, a job waits for it; just after, for the next one.
    assert minute.get_next_fire_time(_utc(1, 3, 4, 249_999), now) == _utc(1, 3, 4, 250_000)
    assert minute.get_next_fire_time(_utc(1, 3, 4, 250_000), now) == _utc(1, 4, 4, 250_000)


def test_each_scheduler_draws_its_phase_below_the_shortest_cadence() -> None:
    async def nothing() -> None:
        return None

    jobs = [_job("all:1h", nothing, interval=30), _job("realtime:-", nothing, interval=15)]
    phases = {Scheduler(CollectorRegistry(), jobs).phase for _ in range(50)}
    assert len(phases) > 1
    assert all(0 <= phase <= 15 for phase in phases)
    assert Scheduler(CollectorRegistry(), jobs, phase=2.5).phase == 2.5


def test_fractional_cadences_stay_aligned_and_always_move_forward() -> None:
    trigger = AlignedInterval(0.02)
    fire = _utc(0, 0, 0, 19_999)
    times = []
    for _ in range(1_000):
        fire = trigger.get_next_fire_time(fire, fire)
        times.append(fire)
    assert times[0] == _utc(0, 0, 0, 20_000)
    steps = {(later - earlier) for earlier, later in itertools.pairwise(times)}
    assert steps == {datetime.timedelta(milliseconds=20)}
