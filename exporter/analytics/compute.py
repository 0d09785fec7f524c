"""The analytics of docs/architecture.md section 5 over one source: which raw aggregates each result
needs, asked for in as few store queries as possible, then derived in Python."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ..networks import BUILTIN_TABLE, NetworkTable
from . import derive
from .models import (
    DAY_MS,
    DEFAULT_LIMIT,
    HOUR_MS,
    MAX_LIMIT,
    REALTIME_SPAN_MS,
    TIME_SERIES_METRICS,
    AnalyticKey,
    AnalyticsResult,
    HealthStatus,
    NetworkMetrics,
    PaymentMetrics,
    PointInTime,
    RankValues,
    RealtimeStats,
    RevenueBreakdown,
    RevenueMetrics,
    TimeSeries,
    TimeSeriesMetric,
    TopLists,
    TopPayee,
    TopPayer,
    TopRoute,
    Window,
    WindowTotals,
    analytic_key,
    check_limit,
    time_series_metric,
)
from .source import AnalyticsSource


class Analytics:
    """Every analytic of docs/architecture.md section 5 over one :class:`AnalyticsSource`."""

    def __init__(self, source: AnalyticsSource, networks: NetworkTable = BUILTIN_TABLE) -> None:
        """Derive results from ``source``'s raw aggregates; ``networks`` names the chains
        (the built-ins and the operator's aliases)."""
        self.source = source
        self.network_table = networks

    async def close(self) -> None:
        """Close the source: release its connections once its queries in flight end."""
        await self.source.close()

    async def _totals(self, at_ms: int, span_ms: int) -> WindowTotals:
        return (await self.source.window_totals(at_ms, [span_ms]))[span_ms]

    async def _order_values(self, at_ms: int, span_ms: int, sums: derive.Sums) -> RankValues:
        if sums.settled == 0:
            return RankValues()
        request = {span_ms: derive.rank_request(sums.settled, sums.timed)}
        answer = await self.source.settled_order_values(at_ms, request)
        return answer[span_ms]

    async def payments(self, window: Window, at_ms: int) -> PaymentMetrics:
        """PaymentMetrics over ``(at - window, at]``."""
        totals = await self._totals(at_ms, window.ms)
        values = await self._order_values(at_ms, window.ms, derive.window_sums(totals))
        return derive.payment_metrics(totals, values)

    async def networks(self, window: Window, at_ms: int) -> list[NetworkMetrics]:
        """NetworkMetrics of every network with a payment event in the window."""
        return derive.network_metrics(
            await self._totals(at_ms, window.ms), self.network_table.chain_name
        )

    async def revenue(self, window: Window, at_ms: int) -> RevenueMetrics:
        """RevenueMetrics (fees of settled payments) with days, projection and growth."""
        totals, days = await asyncio.gather(
            self._totals(at_ms, window.ms),
            self.source.settled_buckets(at_ms, [window.ms], DAY_MS),
        )
        return derive.revenue_metrics(window, at_ms, totals, days.get(window.ms, []))

    async def revenue_breakdown(self, window: Window, at_ms: int) -> RevenueBreakdown:
        """Facilitator fees, gas sponsorship and premium revenue, and their total."""
        return derive.revenue_breakdown(await self._totals(at_ms, window.ms))

    async def _top(self, window: Window, at_ms: int, limit: int) -> TopLists:
        lists = await self.source.top_lists(at_ms, [window.ms], check_limit(limit))
        return lists[window.ms]

    async def top_payers(
        self, window: Window, at_ms: int, limit: int = DEFAULT_LIMIT
    ) -> list[TopPayer]:
        """The ``limit`` payers who paid most (settled), ties by address."""
        return derive.top_payers(await self._top(window, at_ms, limit), limit)

    async def top_payees(
        self, window: Window, at_ms: int, limit: int = DEFAULT_LIMIT
    ) -> list[TopPayee]:
        """The ``limit`` payees who received most (settled), ties by address."""
        return derive.top_payees(await self._top(window, at_ms, limit), limit)

    async def top_routes(
        self, window: Window, at_ms: int, limit: int = DEFAULT_LIMIT
    ) -> list[TopRoute]:
        """The ``limit`` payer-payee routes with most settled volume, ties by payer, payee."""
        return derive.top_routes(await self._top(window, at_ms, limit), limit)

    async def timeseries(
        self, window: Window, at_ms: int, metric: TimeSeriesMetric = "volume"
    ) -> TimeSeries:
        """Settled volume, fees or count per hour (windows up to 24 h) or per day."""
        buckets = await self.source.settled_buckets(at_ms, [window.ms], window.bucket_ms)
        chosen = time_series_metric(metric)
        return derive.time_series(window, at_ms, chosen, buckets.get(window.ms, []))

    async def realtime(self, at_ms: int) -> RealtimeStats:
        """Payments in the last minute, this UTC hour's fees, pending, WebSocket clients."""
        minute, hours, state = await asyncio.gather(
            self._totals(at_ms, REALTIME_SPAN_MS),
            self.source.settled_buckets(at_ms, [HOUR_MS], HOUR_MS),
            self.source.point_in_time(at_ms),
        )
        return derive.realtime_stats(at_ms, minute, hours.get(HOUR_MS, []), state)

    async def health(self, window: Window, at_ms: int) -> HealthStatus:
        """healthy / degraded / critical from the window's error rate and settlement time."""
        totals, state = await asyncio.gather(
            self._totals(at_ms, window.ms), self.source.point_in_time(at_ms)
        )
        return derive.health_status(totals, state)

    async def compute(
        self,
        name: str,
        window: Window | None,
        at_ms: int,
        *,
        limit: int = DEFAULT_LIMIT,
        metric: str | None = None,
    ) -> AnalyticsResult:
        """One analytic by its API name (``top/payers``...), computed now from the store.

        ``window`` is ignored by ``realtime``; ``metric`` is for ``timeseries`` only
        (default ``volume``); ``limit`` (1..1000) for the top lists only. Unknown names,
        metrics and limits raise :class:`AnalyticsRequestError`.
        """
        key = analytic_key(name, window, metric or "volume")
        if key.name == "realtime":
            return await self.realtime(at_ms)
        assert key.window is not None
        w = key.window
        match key.name:
            case "payments":
                return await self.payments(w, at_ms)
            case "networks":
                return await self.networks(w, at_ms)
            case "revenue":
                return await self.revenue(w, at_ms)
            case "revenue/breakdown":
                return await self.revenue_breakdown(w, at_ms)
            case "top/payers":
                return await self.top_payers(w, at_ms, limit)
            case "top/payees":
                return await self.top_payees(w, at_ms, limit)
            case "top/routes":
                return await self.top_routes(w, at_ms, limit)
            case "timeseries":
                assert key.metric is not None
                return await self.timeseries(w, at_ms, key.metric)
            case _:
                return await self.health(w, at_ms)

    async def compute_all(
        self, at_ms: int, windows: Sequence[Window] | None = None, realtime: bool = True
    ) -> dict[AnalyticKey, AnalyticsResult]:
        """Every analytic of ``windows`` (default: all) and, with ``realtime``, the realtime
        figures, as of ``at_ms``, in at most six store queries whatever the number of windows.

        The queries cover the windows at once: window totals (plus the realtime minute),
        hourly buckets (windows up to 24 h, and the realtime hour), daily buckets, top lists
        at :data:`MAX_LIMIT`, the point-in-time state, then the rank values that need the
        totals' counts. Top lists are kept at MAX_LIMIT: serve smaller limits by prefix.
        """
        chosen = list(Window) if windows is None else list(dict.fromkeys(windows))
        spans = [w.ms for w in chosen]
        hourly = [w.ms for w in chosen if w.bucket_ms == HOUR_MS]
        if realtime and HOUR_MS not in hourly:
            hourly.append(HOUR_MS)
        totals_spans = [*spans, REALTIME_SPAN_MS] if realtime else spans
        source = self.source
        none: dict[int, Any] = {}

        async def nothing() -> dict[int, Any]:
            return none

        async def no_state() -> PointInTime:
            return PointInTime(0, 0)

        totals, hours, days, tops, state = await asyncio.gather(
            source.window_totals(at_ms, totals_spans) if totals_spans else nothing(),
            source.settled_buckets(at_ms, hourly, HOUR_MS) if hourly else nothing(),
            source.settled_buckets(at_ms, spans, DAY_MS) if spans else nothing(),
            source.top_lists(at_ms, spans, MAX_LIMIT) if spans else nothing(),
            source.point_in_time(at_ms) if totals_spans else no_state(),
        )
        sums = {s: derive.window_sums(totals[s]) for s in spans}
        requests = {
            s: derive.rank_request(sums[s].settled, sums[s].timed) for s in spans if sums[s].settled
        }
        values = await source.settled_order_values(at_ms, requests) if requests else {}
        out: dict[AnalyticKey, AnalyticsResult] = {}
        if realtime:
            out[AnalyticKey("realtime", None)] = derive.realtime_stats(
                at_ms, totals[REALTIME_SPAN_MS], hours.get(HOUR_MS, []), state
            )
        for w in chosen:
            t = totals[w.ms]
            series_buckets = (hours if w.bucket_ms == HOUR_MS else days).get(w.ms, [])
            rank_values = values.get(w.ms, RankValues())
            out[AnalyticKey("payments", w)] = derive.payment_metrics(t, rank_values)
            names = self.network_table.chain_name
            out[AnalyticKey("networks", w)] = derive.network_metrics(t, names)
            out[AnalyticKey("revenue", w)] = derive.revenue_metrics(w, at_ms, t, days.get(w.ms, []))
            out[AnalyticKey("revenue/breakdown", w)] = derive.revenue_breakdown(t)
            out[AnalyticKey("top/payers", w)] = derive.top_payers(tops[w.ms], MAX_LIMIT)
            out[AnalyticKey("top/payees", w)] = derive.top_payees(tops[w.ms], MAX_LIMIT)
            out[AnalyticKey("top/routes", w)] = derive.top_routes(tops[w.ms], MAX_LIMIT)
            for metric in TIME_SERIES_METRICS:
                out[AnalyticKey("timeseries", w, metric)] = derive.time_series(
                    w, at_ms, metric, series_buckets
                )
            out[AnalyticKey("health", w)] = derive.health_status(t, state)
        return out
