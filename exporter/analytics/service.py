"""Analytics kept fresh: scheduled refreshes into a cache, gauges read from it at scrape
time, write-back of projections, growth and health to the store, and the JSON API.

Windows refresh on cadences suited to their length (short windows every 30-60 s, long
ones every 5-15 min, realtime every 15 s). Each refresh computes as of an instant aligned
to its cadence, so several exporters on the same schedule compute and write back the
same values at the same timestamps: their write-backs overwrite instead of duplicating.
Refreshes due at the same instant share one computation (:class:`SharedRefreshes`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..auth import bearer_token_matches
from ..errors import StoreError, StoreRetryAfterError
from ..metrics import Metrics
from .compute import Analytics
from .instant import InstantError, parse_instant
from .models import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    AnalyticKey,
    AnalyticsRequestError,
    AnalyticsResult,
    HealthStatus,
    PaymentMetrics,
    RevenueMetrics,
    Window,
    WindowError,
    analytic_key,
    result_json,
)
from .scheduler import FailureStreak, Job, Scheduler

log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS: Mapping[str, float] = {
    "realtime": 15,
    "1h": 30,
    "6h": 60,
    "24h": 60,
    "7d": 300,
    "30d": 600,
    "90d": 900,
}
"""How often each window (and the realtime figures) is recomputed."""

HEALTH_WINDOW = Window.H24
"""The window of ``facilitator_health_status`` and of ``/health`` without ``?window``."""

_REALTIME = "realtime"
_HEALTH_CODES = {"healthy": 0, "degraded": 1, "critical": 2}


@runtime_checkable
class AnalyticsSink(Protocol):
    """Where computed analytics are written back (the store's ``analytics`` table)."""

    async def write_analytics(self, rows: list[tuple[str, str, int, str, float]]) -> None:
        """Upsert (name, window, time_ms, field, value) rows."""
        ...


@dataclass(frozen=True, slots=True)
class CachedResult:
    """A cached analytic: its value, the instant it is as of, and whether it is stale."""

    result: AnalyticsResult
    at_ms: int
    stale: bool


@dataclass(frozen=True, slots=True)
class _Refreshed:
    at_ms: int
    results: dict[AnalyticKey, AnalyticsResult]


@dataclass(slots=True)
class _Round:
    """The windows asked for as of one instant, and the computation answering them."""

    task: asyncio.Task[dict[AnalyticKey, AnalyticsResult]] | None = None
    windows: set[Window] = field(default_factory=set)
    realtime: bool = False
    waiting: int = 0


class SharedRefreshes:
    """Refreshes as of the same instant share one :meth:`Analytics.compute_all`.

    The jobs of windows whose cadences divide one another fall due together (each minute:
    realtime, 1h, 6h and 24h), and all windows cost the store about what one does: its
    queries cover any number of windows in one pass, and nested windows holding the same
    records share their top lists. Each job still gets only its own results, and fails,
    times out or is cancelled on its own; the computation stops once no job waits for it.
    """

    def __init__(self, analytics: Analytics) -> None:
        """Compute with ``analytics``."""
        self.analytics = analytics
        self._open: dict[int, _Round] = {}
        self._running: set[asyncio.Task[dict[AnalyticKey, AnalyticsResult]]] = set()

    async def compute(
        self, at_ms: int, windows: Sequence[Window], realtime: bool
    ) -> dict[AnalyticKey, AnalyticsResult]:
        """The results of ``windows`` (and the realtime figures, with ``realtime``) as of
        ``at_ms``, computed with those of every other refresh asking for the same instant
        before the computation starts."""
        round_ = self._open.get(at_ms)
        if round_ is None:
            round_ = self._open[at_ms] = _Round()
            task = round_.task = asyncio.create_task(self._compute(at_ms, round_))
            self._running.add(task)
            task.add_done_callback(lambda done: self._finished(done, at_ms, round_))
        assert round_.task is not None
        round_.windows.update(windows)
        round_.realtime |= realtime
        round_.waiting += 1
        try:
            results = await asyncio.shield(round_.task)
        except asyncio.CancelledError:
            round_.waiting -= 1
            if not round_.waiting:
                round_.task.cancel()
            raise
        round_.waiting -= 1
        return {
            key: result
            for key, result in results.items()
            if (realtime if key.window is None else key.window in windows)
        }

    async def _compute(self, at_ms: int, round_: _Round) -> dict[AnalyticKey, AnalyticsResult]:
        # One turn of the event loop lets the jobs that fell due with the first one join.
        await asyncio.sleep(0)
        self._close(at_ms, round_)
        chosen = [window for window in Window if window in round_.windows]
        return await self.analytics.compute_all(at_ms, windows=chosen, realtime=round_.realtime)

    def _close(self, at_ms: int, round_: _Round) -> None:
        """No more jobs join ``round_``: a later one as of ``at_ms`` starts its own."""
        if self._open.get(at_ms) is round_:
            del self._open[at_ms]

    def _finished(
        self, task: asyncio.Task[dict[AnalyticKey, AnalyticsResult]], at_ms: int, round_: _Round
    ) -> None:
        self._running.discard(task)
        self._close(at_ms, round_)  # when cancelled before it started
        if not task.cancelled():
            task.exception()  # seen: every job waiting for it may have gone

    async def cancel(self) -> None:
        """Stop every computation still running (at shutdown)."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _aligned_now_ms(interval_seconds: float) -> int:
    step = max(1, int(interval_seconds * 1000))
    return int(time.time() * 1000) // step * step


def write_back_rows(
    results: Mapping[AnalyticKey, AnalyticsResult], at_ms: int
) -> list[tuple[str, str, int, str, float]]:
    """The projections, growth and health among ``results``, as analytics rows."""
    rows: list[tuple[str, str, int, str, float]] = []
    for key, result in results.items():
        if key.window is None:
            continue
        window = key.window.value
        if isinstance(result, RevenueMetrics):
            projected = float(result.projectedMonthlyRevenue)
            rows.append(("revenue", window, at_ms, "projectedMonthlyRevenue", projected))
            rows.append(("revenue", window, at_ms, "growthRate", result.growthRate))
        elif isinstance(result, HealthStatus):
            rows.append(("health", window, at_ms, "status", _HEALTH_CODES[result.status]))
            rows.append(("health", window, at_ms, "errorRate", result.errorRate))
            rows.append(
                ("health", window, at_ms, "averageSettlementTime", result.averageSettlementTime)
            )
    return rows


class AnalyticsService:
    """Schedules analytics refreshes, serves cached results and writes them back."""

    def __init__(
        self,
        analytics: Analytics,
        registry: CollectorRegistry,
        sink: AnalyticsSink | None,
        refresh_seconds: Mapping[str, float] = DEFAULT_REFRESH_SECONDS,
        timeout_seconds: float = 30.0,
    ) -> None:
        """Prepare jobs for every window; nothing runs before :meth:`start`."""
        self.analytics = analytics
        self.sink = sink
        self._shared = SharedRefreshes(analytics)
        cadence = {**DEFAULT_REFRESH_SECONDS, **refresh_seconds}
        jobs: list[Job[object]] = [
            Job(
                w.value,
                "all",
                w.value,
                cadence[w.value],
                timeout_seconds,
                self._refresher([w], cadence[w.value]),
            )
            for w in Window
        ]
        jobs.append(
            Job(
                _REALTIME,
                "realtime",
                "-",
                cadence[_REALTIME],
                timeout_seconds,
                self._refresher([], cadence[_REALTIME]),
            )
        )
        self.scheduler = Scheduler(registry, jobs)
        self.retry_after_seconds = min(cadence.values())
        """How soon a refresh asks the store again: a client's ``Retry-After`` on a 503."""
        registry.register(AnalyticsCollector(self))

    def _refresher(self, windows: Sequence[Window], interval: float) -> Any:
        job = windows[0].value if windows else _REALTIME
        write_back = FailureStreak(log, "analytics write-back", job=job)

        async def refresh() -> _Refreshed:
            at_ms = _aligned_now_ms(interval)
            results = await self._shared.compute(at_ms, windows, realtime=not windows)
            if self.sink is not None and windows:
                rows = write_back_rows(results, at_ms)
                try:
                    await self.sink.write_analytics(rows)
                except Exception as error:  # the cache stays good; the next refresh retries
                    write_back.failed(f"{type(error).__name__}: {error}")
                else:
                    write_back.succeeded()
            return _Refreshed(at_ms, results)

        return refresh

    def start(self) -> None:
        """Run every refresh now and then on its cadence."""
        self.scheduler.start()

    async def stop(self) -> None:
        """Stop refreshing, then close the analytics source (the cache stays readable)."""
        await self.scheduler.stop()
        await self._shared.cancel()
        await self.analytics.close()

    def cached(self, key: AnalyticKey) -> CachedResult | None:
        """The cached result for ``key``, when a refresh has computed it."""
        entry = self.scheduler.get(key.window.value if key.window else _REALTIME)
        if entry is None:
            return None
        refreshed = entry.value
        assert isinstance(refreshed, _Refreshed)
        result = refreshed.results.get(key)
        if result is None:
            return None
        return CachedResult(result, refreshed.at_ms, entry.stale)

    def cached_results(self, name: str) -> Iterator[tuple[Window, AnalyticsResult]]:
        """Every window's cached result of analytic ``name`` (for the gauges)."""
        for window in Window:
            found = self.cached(AnalyticKey(name, window))
            if found is not None:
                yield window, found.result


class AnalyticsCollector(Collector):
    """Analytics gauges computed at scrape time from the cache (never from the store)."""

    def __init__(self, service: AnalyticsService) -> None:
        """Read ``service``'s cache on every scrape."""
        self.service = service

    def describe(self) -> list[GaugeMetricFamily]:
        """No up-front description: families depend on what has been computed."""
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The analytics gauges, one sample per window with a cached result."""
        projected = GaugeMetricFamily(
            "facilitator_revenue_projected_monthly_usd",
            "Facilitator fees projected over 30 days from the window (cached analytics).",
            labels=["window"],
        )
        growth = GaugeMetricFamily(
            "facilitator_revenue_growth_ratio",
            "Fees of the window's second half against its first, as a ratio: 0.1 = +10% "
            "(cached analytics).",
            labels=["window"],
        )
        for window, result in self.service.cached_results("revenue"):
            assert isinstance(result, RevenueMetrics)
            projected.add_metric([window.value], float(result.projectedMonthlyRevenue))
            growth.add_metric([window.value], result.growthRate / 100)
        errors = GaugeMetricFamily(
            "facilitator_error_ratio",
            "Failed / (settled + failed) payments in the window (cached analytics).",
            labels=["window"],
        )
        for window, result in self.service.cached_results("health"):
            assert isinstance(result, HealthStatus)
            errors.add_metric([window.value], result.errorRate / 100)
        p95 = GaugeMetricFamily(
            "facilitator_settlement_p95_seconds",
            "95th percentile settlement time of the window's settled payments (cached analytics).",
            labels=["window"],
        )
        for window, result in self.service.cached_results("payments"):
            assert isinstance(result, PaymentMetrics)
            p95.add_metric([window.value], result.p95SettlementTime / 1000)
        yield from (projected, growth, errors, p95)
        cached = self.service.cached(AnalyticKey("health", HEALTH_WINDOW))
        if cached is not None:
            status = GaugeMetricFamily(
                "facilitator_health_status",
                f"1 for the current health status over {HEALTH_WINDOW.value} "
                "(cached analytics), 0 for the others.",
                labels=["status"],
            )
            current = cached.result
            assert isinstance(current, HealthStatus)
            for level in _HEALTH_CODES:
                status.add_metric([level], 1.0 if current.status == level else 0.0)
            yield status


_INTEGER = re.compile(r"-?[0-9]+")
"""ASCII digits only: str.isdigit() also admits characters such as "²" that int() refuses."""


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not _INTEGER.fullmatch(text) or len(text) > 12 or not 1 <= int(text) <= MAX_LIMIT:
        raise AnalyticsRequestError(f"limit: must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class AnalyticsAPI:
    """``GET /v1/analytics/{name}``: cached results, or computed on demand for ``?at=``."""

    def __init__(
        self, service: AnalyticsService, token: str | None, metrics: Metrics | None = None
    ) -> None:
        """Serve ``service``'s results; require ``token`` when one is configured (refusals
        counted on ``metrics``)."""
        self.service = service
        self.token = token
        self.metrics = metrics

    def _unavailable(self, name: str, error: StoreError) -> web.Response:
        """503 naming why the store cannot answer, and when a refresh tries again."""
        if isinstance(error, StoreRetryAfterError):
            retry_after = error.retry_after
        else:
            retry_after = self.service.retry_after_seconds
        log.debug("analytics unavailable", extra={"analytic": name, "error": str(error)})
        return _error(
            503,
            f"analytics unavailable: {error}",
            {"Retry-After": str(max(1, math.ceil(retry_after)))},
        )

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one analytics request."""
        if self.token is not None and not bearer_token_matches(
            request.headers.get("Authorization"), self.token
        ):
            if self.metrics is not None:
                self.metrics.auth_failed("analytics", request.remote)
            return _error(401, "missing or wrong bearer token")
        name = request.match_info["name"]
        query = request.query
        try:
            default = HEALTH_WINDOW.value
            window = None if name == _REALTIME else Window.parse(query.get("window", default))
            key = analytic_key(name, window, query.get("metric", "volume"))
            limit = _parse_limit(query.get("limit"))
            at_text = query.get("at")
            at_ms = None if at_text is None else parse_instant(at_text, "at")
        except (WindowError, InstantError) as error:
            return _error(400, str(error))
        except AnalyticsRequestError as error:
            unknown = str(error).startswith("unknown analytic")
            return _error(404 if unknown else 400, str(error))
        headers = {"Cache-Control": "no-store"}
        cached = None if at_ms is not None else self.service.cached(key)
        if cached is not None:
            result = cached.result
            headers["X-Analytics-At"] = str(cached.at_ms)
            headers["X-Analytics-Stale"] = "true" if cached.stale else "false"
        else:
            at = at_ms if at_ms is not None else int(time.time() * 1000)
            try:
                result = await self.service.analytics.compute(
                    name,
                    window,
                    at,
                    limit=MAX_LIMIT if at_ms is None else limit,
                    metric=key.metric,
                )
            except StoreError as error:
                return self._unavailable(name, error)
            except Exception as error:  # a failure nobody named: one line, never a traceback
                log.error(
                    "analytics query failed",
                    extra={"analytic": name, "error": f"{type(error).__name__}: {error}"},
                )
                log.debug("analytics query failure", exc_info=True)
                return _error(500, f"analytics query failed: {type(error).__name__}: {error}")
            headers["X-Analytics-At"] = str(at)
        if isinstance(result, list) and name.startswith("top/"):
            result = result[:limit]  # only the top lists take a limit; networks lists them all
        return web.Response(
            body=result_json(result), content_type="application/json", headers=headers
        )
