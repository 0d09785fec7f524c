"""Refreshes as of one instant share one computation; each job still gets, and loses, only
its own results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from analytics_helpers import delivered
from conftest import BASE_MS, async_wait_until, failed, received, settled, verified
from prometheus_client import CollectorRegistry

from exporter.analytics.compute import Analytics
from exporter.analytics.models import HOUR_MS, AnalyticKey, AnalyticsResult, Window, result_data
from exporter.analytics.service import AnalyticsService, SharedRefreshes
from exporter.errors import StoreError

AT = BASE_MS + 3 * HOUR_MS
EVENTS = [
    received("old", BASE_MS),  # three hours before AT: in 6h and 24h, not in 1h
    verified("old", BASE_MS + 100),
    settled("old", BASE_MS + 2_000),
    received("new", AT - 10 * 60_000, amount="4.00"),
    settled("new", AT - 9 * 60_000, fee="0.04"),
    received("lost", AT - 30_000),
    failed("lost", AT - 20_000),
]


class Recording(Analytics):
    """Real analytics that remember each ``compute_all`` asked of them, and can hold it
    until released (to see jobs wait for, or walk away from, a computation in flight)."""

    def __init__(self, inner: Analytics) -> None:
        super().__init__(inner.source, inner.network_table)
        self.calls: list[tuple[int, list[Window], bool]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.ended: list[str] = []
        self.failure: Exception | None = None

    async def compute_all(
        self, at_ms: int, windows: Sequence[Window] | None = None, realtime: bool = True
    ) -> dict[AnalyticKey, AnalyticsResult]:
        """Record the call, wait for ``release``, then compute (or fail with ``failure``)."""
        self.calls.append((at_ms, list(windows or []), realtime))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        if self.failure is not None:
            raise self.failure
        self.ended.append("computed")
        return await super().compute_all(at_ms, windows, realtime)


@pytest.fixture
async def analytics(tmp_path: Path) -> AsyncIterator[Recording]:
    """Recording analytics over a DuckDB store holding :data:`EVENTS`."""
    async with delivered(EVENTS, tmp_path, "duckdb") as inner:
        yield Recording(inner)


def _data(results: dict[AnalyticKey, AnalyticsResult]) -> dict[AnalyticKey, Any]:
    return {key: result_data(value) for key, value in results.items()}


async def test_refreshes_as_of_one_instant_share_one_computation(analytics: Recording) -> None:
    shared = SharedRefreshes(analytics)
    hour, realtime, longer = await asyncio.gather(
        shared.compute(AT, [Window.H1], realtime=False),
        shared.compute(AT, [], realtime=True),
        shared.compute(AT, [Window.H24, Window.H6], realtime=False),
    )
    assert analytics.calls == [(AT, [Window.H1, Window.H6, Window.H24], True)]
    # Each job gets exactly what it would have computed alone.
    alone = Analytics(analytics.source)
    assert _data(hour) == _data(await alone.compute_all(AT, [Window.H1], realtime=False))
    assert _data(realtime) == _data(await alone.compute_all(AT, [], realtime=True))
    assert _data(longer) == _data(
        await alone.compute_all(AT, [Window.H6, Window.H24], realtime=False)
    )
    assert {key.window for key in longer} == {Window.H6, Window.H24}
    payments = hour[AnalyticKey("payments", Window.H1)]
    assert result_data(payments)["totalPayments"] == 2  # type: ignore[index]
    six_hours = longer[AnalyticKey("payments", Window.H6)]
    assert result_data(six_hours)["totalPayments"] == 3  # type: ignore[index]


async def test_other_instants_and_later_refreshes_compute_on_their_own(
    analytics: Recording,
) -> None:
    shared = SharedRefreshes(analytics)
    await asyncio.gather(
        shared.compute(AT, [Window.H1], realtime=False),
        shared.compute(AT - 15_000, [], realtime=True),
    )
    await shared.compute(AT, [Window.H6], realtime=False)  # after the first one started
    assert analytics.calls == [
        (AT, [Window.H1], False),
        (AT - 15_000, [], True),
        (AT, [Window.H6], False),
    ]


async def test_a_job_walking_away_leaves_the_computation_to_the_others(
    analytics: Recording,
) -> None:
    shared = SharedRefreshes(analytics)
    analytics.release.clear()
    impatient = asyncio.create_task(shared.compute(AT, [Window.H1], realtime=False))
    patient = asyncio.create_task(shared.compute(AT, [Window.H24], realtime=False))

    async def started() -> bool:
        return bool(analytics.calls)

    await async_wait_until(started, what="the shared computation started")
    impatient.cancel()  # a job's timeout
    with pytest.raises(asyncio.CancelledError):
        await impatient
    analytics.release.set()
    results = await patient
    assert {key.window for key in results} == {Window.H24}
    assert analytics.ended == ["computed"]


async def test_the_computation_stops_once_no_job_waits_for_it(analytics: Recording) -> None:
    shared = SharedRefreshes(analytics)
    analytics.release.clear()
    jobs = [
        asyncio.create_task(shared.compute(AT, [window], realtime=False))
        for window in (Window.H1, Window.H6)
    ]

    async def started() -> bool:
        return bool(analytics.calls)

    await async_wait_until(started, what="the shared computation started")
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)

    async def cancelled() -> bool:
        return analytics.ended == ["cancelled"]

    await async_wait_until(cancelled, what="the computation cancelled")
    analytics.release.set()
    again = await shared.compute(AT, [Window.H1], realtime=False)  # a fresh computation
    assert AnalyticKey("payments", Window.H1) in again
    assert len(analytics.calls) == 2


async def test_a_failure_fails_every_job_of_the_computation(analytics: Recording) -> None:
    shared = SharedRefreshes(analytics)
    analytics.failure = StoreError("DuckDB store is closed")
    outcomes = await asyncio.gather(
        shared.compute(AT, [Window.H1], realtime=False),
        shared.compute(AT, [], realtime=True),
        return_exceptions=True,
    )
    assert [str(outcome) for outcome in outcomes] == ["DuckDB store is closed"] * 2
    assert len(analytics.calls) == 1


async def test_the_service_refreshes_windows_of_one_cadence_together(
    analytics: Recording,
) -> None:
    registry = CollectorRegistry()
    service = AnalyticsService(analytics, registry, None)  # 6h and 24h: both every 60 s
    try:
        refreshed = await asyncio.gather(
            service.scheduler.refresh("6h"), service.scheduler.refresh("24h")
        )
        assert list(refreshed) == [True, True]
        [(_, windows, realtime)] = analytics.calls
        assert (windows, realtime) == ([Window.H6, Window.H24], False)
        for window in (Window.H6, Window.H24):
            cached = service.cached(AnalyticKey("payments", window))
            assert cached is not None and not cached.stale
            labels = {"query": "all", "window": window.value}
            count = "exporter_analytics_query_duration_seconds_count"
            assert registry.get_sample_value(count, labels) == 1
        assert service.cached(AnalyticKey("payments", Window.H1)) is None
    finally:
        await service.stop()
