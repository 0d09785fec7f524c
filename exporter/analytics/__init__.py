"""Analytics: results of docs/architecture.md section 5 derived from a store's raw aggregates.

Other stages import from here. The scheduled service and its HTTP API
(:mod:`exporter.analytics.service`) are the application's alone: importing them loads
aiohttp and APScheduler, which a command computing one answer never needs.
"""

from .compute import Analytics
from .instant import InstantError, parse_instant
from .models import (
    ANALYTIC_NAMES,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    TIME_SERIES_METRICS,
    AnalyticKey,
    AnalyticsRequestError,
    AnalyticsResult,
    Window,
    WindowError,
    result_data,
    result_json,
)
from .source import AnalyticsSource, analytics_source

__all__ = [
    "ANALYTIC_NAMES",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "TIME_SERIES_METRICS",
    "AnalyticKey",
    "Analytics",
    "AnalyticsRequestError",
    "AnalyticsResult",
    "AnalyticsSource",
    "InstantError",
    "Window",
    "WindowError",
    "analytics_source",
    "parse_instant",
    "result_data",
    "result_json",
]
