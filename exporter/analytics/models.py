"""Analytics (docs/architecture.md section 5): windows, the result models, and the raw aggregates.

Every analytic is evaluated as of an instant ``at`` (epoch ms) over a window
``(at - window, at]`` with event-time semantics: a figure counts the store records of its
kind whose own ``time_ms`` (the event's ``timestamp``) lies in the window. Records are
already joined by the ledger (a settled or failed record carries its payment's network,
payer, payee and amount), so a store only filters and aggregates.

The work is split so that each store is queried for little and every rule is applied once:

* an :class:`exporter.analytics.source.AnalyticsSource` (one per store: DuckDB SQL in
  :mod:`exporter.analytics.duckdb`, Flux in :mod:`exporter.analytics.flux`) answers a
  handful of *raw* aggregate queries, the dataclasses at the end of this module: integer
  micro-unit sums, counts, per-bucket and per-party totals, and the values at given ranks
  of the settled amounts and settlement times;
* :mod:`exporter.analytics.derive` derives every result model from those, in Python, and
  :class:`exporter.analytics.compute.Analytics` asks a source for what each needs.

Money in the result models is a decimal string with exactly six places, as in the
brief's TypeScript types and the JSON contract; the derivation works in exact integer
micro-units and formats once (``exporter.events.to_micro`` converts back exactly).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter

from ..events import format_micro, to_micro

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000

DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 1000
"""Top lists answer ``limit`` entries, 1..MAX_LIMIT; ``Analytics.compute_all`` keeps
MAX_LIMIT, and any smaller limit's answer is a prefix of that list (the order is total)."""

REALTIME_SPAN_MS: Final = MINUTE_MS
"""``paymentsPerMinute`` counts settled events in ``(at - 60 s, at]``."""

class Window(StrEnum):
    """An analytics window, named as in the API (``?window=24h``)."""

    H1 = "1h"
    H6 = "6h"
    H24 = "24h"
    D7 = "7d"
    D30 = "30d"
    D90 = "90d"

    @property
    def ms(self) -> int:
        """The window's length in milliseconds."""
        return _WINDOW_MS[self]

    @property
    def bucket_ms(self) -> int:
        """Time-series bucket width: hourly for windows up to 24 h, daily otherwise."""
        return HOUR_MS if self.ms <= DAY_MS else DAY_MS

    @classmethod
    def parse(cls, text: str) -> Window:
        """The window named ``text``, or :class:`WindowError` listing the allowed ones."""
        try:
            return cls(text)
        except ValueError:
            raise WindowError(
                f"unknown window {text!r}; allowed windows: {', '.join(w.value for w in cls)}"
            ) from None


_WINDOW_MS: Final[dict[Window, int]] = {
    Window.H1: HOUR_MS,
    Window.H6: 6 * HOUR_MS,
    Window.H24: DAY_MS,
    Window.D7: 7 * DAY_MS,
    Window.D30: 30 * DAY_MS,
    Window.D90: 90 * DAY_MS,
}


class WindowError(ValueError):
    """A window name that is not one of ``1h 6h 24h 7d 30d 90d`` (the API answers 400)."""


class AnalyticsRequestError(ValueError):
    """An analytic name, metric or limit that the API does not serve (answered with 400)."""


# --------------------------------------------------------------------------- result models

_MONEY_TEXT = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,18})?")
_INTEGER_TEXT = re.compile(r"[0-9]{1,40}")  # ASCII: str.isdigit() also admits "²"


def _exact(
    value: object,
    what: str,
    text: re.Pattern[str],
    read: Callable[[str], int],
    render: Callable[[int], str],
) -> object:
    """An exact value given as an ``int`` or as text matching ``text``, rendered; pydantic
    reports anything else (``what`` says what is expected)."""
    if isinstance(value, bool):
        raise ValueError(f"must be {what}, not a boolean")
    if isinstance(value, int):
        return render(value)
    if isinstance(value, str):
        if not text.fullmatch(value):
            raise ValueError(f"must be {what}, got {value!r}")
        return render(read(value))
    return value


def _money_in(value: object) -> object:
    what = "micro-units (int) or a decimal string such as '12.500000'"
    return _exact(value, what, _MONEY_TEXT, to_micro, format_micro)


def _integer_in(value: object) -> object:
    what = "an integer or an integer string such as '21000'"
    return _exact(value, what, _INTEGER_TEXT, int, str)


Money = Annotated[str, BeforeValidator(_money_in)]
"""Money: a decimal string with exactly six places (``"12.500000"``), as in the brief's
types. Built from exact integer micro-units (or any decimal string, rounded half to even);
``exporter.events.to_micro(value)`` gives the micro-units back exactly."""

IntegerString = Annotated[str, BeforeValidator(_integer_in)]
"""An exact integer as a decimal string (gas can exceed JSON's safe integers)."""

Number = int | float
"""A JSON number: counts stay integers, durations and token amounts are floats."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PaymentMetrics(_Model):
    """Payment counts, settled volume and fees, payment size and settlement latency."""

    totalPayments: int
    successfulPayments: int
    failedPayments: int
    totalVolume: Money
    totalFees: Money
    averagePaymentSize: Money
    medianPaymentSize: Money
    averageSettlementTime: float
    p95SettlementTime: float
    p99SettlementTime: float


class NetworkMetrics(_Model):
    """One network's payments, volume, fees, gas, success rate and confirmation time."""

    chainId: str
    chainName: str
    totalPayments: int
    totalVolume: Money
    totalFees: Money
    averageGasCost: Money
    totalGasSpent: IntegerString
    successRate: float
    averageConfirmationTime: float


class DailyStats(_Model):
    """One UTC day's settled payments within the window."""

    date: str
    payments: int
    volume: Money
    fees: Money
    uniquePayers: int
    uniquePayees: int


class RevenueMetrics(_Model):
    """Facilitator fees: total, by network, by day, monthly projection and growth."""

    totalRevenue: Money
    revenueByNetwork: dict[str, Money]
    revenueByDay: list[DailyStats]
    projectedMonthlyRevenue: Money
    growthRate: float


class RevenueBreakdown(_Model):
    """Revenue by source: facilitator fees, gas sponsorship, premium features."""

    facilitatorFees: Money
    gasSponsorship: Money
    premiumFeatures: Money
    total: Money


class TopPayer(_Model):
    """A payer ranked by settled amount paid."""

    address: str
    totalPaid: Money
    paymentCount: int
    lastPayment: int


class TopPayee(_Model):
    """A payee ranked by settled amount received."""

    address: str
    totalReceived: Money
    paymentCount: int
    uniquePayers: int


class TopRoute(_Model):
    """A payer-to-payee route ranked by settled volume."""

    payer: str
    payee: str
    volume: Money
    count: int


class TimeSeriesPoint(_Model):
    """One bucket: its start (epoch ms) and value (token units, or a count)."""

    timestamp: int
    value: Number


TimeSeriesMetric = Literal["volume", "fees", "payments"]
TIME_SERIES_METRICS: Final[tuple[TimeSeriesMetric, ...]] = ("volume", "fees", "payments")


class TimeSeries(_Model):
    """Settled volume, fees or count per UTC hour (windows up to 24 h) or day."""

    name: TimeSeriesMetric
    window: Window
    points: list[TimeSeriesPoint]
    aggregation: Literal["sum", "count"]


class RealtimeStats(_Model):
    """Live figures as of ``at``: last minute, current hour, pending, WebSocket clients."""

    paymentsPerMinute: int
    revenuePerHour: Money
    pendingSettlements: int
    activeConnections: int


HealthLevel = Literal["healthy", "degraded", "critical"]


class HealthStatus(_Model):
    """Health over the window from error rate and settlement time, with pending payments."""

    status: HealthLevel
    errorRate: float
    averageSettlementTime: float
    pendingPayments: int


AnalyticsResult = (
    PaymentMetrics
    | list[NetworkMetrics]
    | RevenueMetrics
    | RevenueBreakdown
    | list[TopPayer]
    | list[TopPayee]
    | list[TopRoute]
    | TimeSeries
    | RealtimeStats
    | HealthStatus
)
"""What :meth:`Analytics.compute` answers; serialise with :func:`result_json`."""

_RESULT_ADAPTER: TypeAdapter[AnalyticsResult] = TypeAdapter(AnalyticsResult)


def result_json(result: AnalyticsResult) -> bytes:
    """The JSON body of an analytics answer (money as six-place strings)."""
    return _RESULT_ADAPTER.dump_json(result)


def result_data(result: AnalyticsResult) -> object:
    """The JSON-ready Python value of an analytics answer (dicts, lists, str, numbers)."""
    return _RESULT_ADAPTER.dump_python(result, mode="json")


# --------------------------------------------------------------------------- raw aggregates


@dataclass(frozen=True, slots=True)
class NetworkTotals:
    """One network's raw totals over a window (every sum exact: Python ``int``)."""

    network: str
    payment_events: int
    """Payment records of any status (received, verified, settled, failed)."""
    received: int
    settled: int
    failed: int
    volume_micro: int
    """Sum of ``amount_micro`` of the settled records."""
    fees_micro: int
    """Sum of ``fee_micro`` of the settled records."""
    settlement_ms_sum: float
    """Sum of ``settlement_ms`` of the settled records."""
    gas_used: int
    """Sum of ``gas_used`` of the batch records with status ``settled`` on this network."""
    batch_payments: int
    """Sum of ``payment_count`` of those same settled batch records."""
    timed_settled: int
    """Settled records with a ``settlement_ms`` (``settlementTime`` is optional): what
    settlement averages and percentiles are taken over."""


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """Everything a window's counters and sums need, from one query per store."""

    networks: list[NetworkTotals]
    """Every network with a payment record or a settled batch record in the window."""
    fees_second_half_micro: int
    """Sum of ``fee_micro`` of settled records in ``(at - span // 2, at]`` (growth)."""
    revenue_by_kind: dict[str, int]
    """Sum of ``amount_micro`` of revenue records by ``kind``; kinds without records absent."""


@dataclass(frozen=True, slots=True)
class BucketTotals:
    """Settled records of one time bucket inside a window."""

    start_ms: int
    """Bucket start: ``time_ms - time_ms % bucket_ms`` (UTC hours and days)."""
    settled: int
    volume_micro: int
    fees_micro: int
    unique_payers: int
    unique_payees: int


@dataclass(frozen=True, slots=True)
class RankRequest:
    """1-based ranks wanted in the ascending order of a window's settled records."""

    settled: int
    """The count ``n`` the ranks refer to (:meth:`AnalyticsSource.window_totals`' settled
    count); a store selecting by position can ignore it, one selecting by quantile needs it."""
    amount: tuple[int, ...] = ()
    """Ranks into the sorted ``amount_micro`` values."""
    settlement: tuple[int, ...] = ()
    """Ranks into the sorted ``settlement_ms`` values."""
    timed: int | None = None
    """The count the settlement ranks refer to: settled records with a settlement time;
    None when it is ``settled`` (every settled record has one)."""

    @property
    def timed_count(self) -> int:
        """The count the settlement ranks refer to."""
        return self.settled if self.timed is None else self.timed


@dataclass(frozen=True, slots=True)
class RankValues:
    """The values at the requested ranks, keyed by rank."""

    amount: dict[int, int] = field(default_factory=dict)
    settlement: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PayerTotals:
    """A payer's settled records in a window."""

    address: str
    amount_micro: int
    count: int
    last_ms: int
    """The latest ``time_ms`` among them."""


@dataclass(frozen=True, slots=True)
class PayeeTotals:
    """A payee's settled records in a window."""

    address: str
    amount_micro: int
    count: int
    unique_payers: int


@dataclass(frozen=True, slots=True)
class RouteTotals:
    """A (payer, payee) pair's settled records in a window."""

    payer: str
    payee: str
    amount_micro: int
    count: int


@dataclass(frozen=True, slots=True)
class TopLists:
    """The first ``limit`` payers, payees and routes of a window, in the contract's order."""

    payers: list[PayerTotals]
    payees: list[PayeeTotals]
    routes: list[RouteTotals]

    def first(self, limit: int) -> TopLists:
        """The first ``limit`` of each list in the contract's order, whatever order these
        are in: amount descending, ties by address (routes: by payer, then payee); strings
        compare by code point."""
        return TopLists(
            payers=sorted(self.payers, key=lambda p: (-p.amount_micro, p.address))[:limit],
            payees=sorted(self.payees, key=lambda p: (-p.amount_micro, p.address))[:limit],
            routes=sorted(self.routes, key=lambda r: (-r.amount_micro, r.payer, r.payee))[
                :limit
            ],
        )


@dataclass(frozen=True, slots=True)
class PointInTime:
    """State as of ``at`` rather than over a window."""

    pending_payments: int
    websocket_clients: int


# --------------------------------------------------------------------------- requests

ANALYTIC_NAMES: Final[tuple[str, ...]] = (
    "payments",
    "networks",
    "revenue",
    "revenue/breakdown",
    "top/payers",
    "top/payees",
    "top/routes",
    "timeseries",
    "realtime",
    "health",
)
"""The analytics the API serves, by the path under ``/v1/analytics/``."""


@dataclass(frozen=True, slots=True)
class AnalyticKey:
    """Names one cached result: the analytic, its window, and the time-series metric.

    ``window`` is None for ``realtime`` (it has none); ``metric`` is set for
    ``timeseries`` only. Top lists are cached at :data:`MAX_LIMIT` entries.
    """

    name: str
    window: Window | None
    metric: TimeSeriesMetric | None = None


def analytic_key(
    name: str, window: Window | None, metric: str | None = None
) -> AnalyticKey:
    """The cache key of a request, validated (:class:`AnalyticsRequestError` otherwise)."""
    if name not in ANALYTIC_NAMES:
        raise AnalyticsRequestError(
            f"unknown analytic {name!r}; known: {', '.join(ANALYTIC_NAMES)}"
        )
    if name == "realtime":
        return AnalyticKey(name, None)
    if window is None:
        raise AnalyticsRequestError(f"analytic {name!r} needs a window")
    if name != "timeseries":
        return AnalyticKey(name, window)
    return AnalyticKey(name, window, time_series_metric(metric))


def time_series_metric(metric: str | None) -> TimeSeriesMetric:
    """``metric`` as a time-series metric, or :class:`AnalyticsRequestError`."""
    for known in TIME_SERIES_METRICS:
        if metric == known:
            return known
    raise AnalyticsRequestError(
        f"unknown time-series metric {metric!r}; allowed: {', '.join(TIME_SERIES_METRICS)}"
    )


def check_limit(limit: int) -> int:
    """``limit`` when it is an integer in 1..MAX_LIMIT, else :class:`AnalyticsRequestError`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise AnalyticsRequestError(
            f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}"
        )
    return limit
