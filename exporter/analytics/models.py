"""Analytics (docs/architecture.md section 5): result models, the store protocol, and the
derivation.

Every analytic is evaluated as of an instant ``at`` (epoch ms) over a window
``(at - window, at]`` with event-time semantics: a figure counts the store records of its
kind whose own ``time_ms`` (the event's ``timestamp``) lies in the window. Records are
already joined by the ledger (a settled or failed record carries its payment's network,
payer, payee and amount), so a store only filters and aggregates.

The work is split in two so that each store is queried for little and every rule is
applied once:

* an :class:`AnalyticsSource` (one per store: DuckDB SQL in
  :mod:`exporter.analytics.duckdb`, Flux for InfluxDB) answers a handful of *raw*
  aggregate queries: integer micro-unit sums, counts, per-bucket and per-party totals,
  and the values at given ranks of the settled amounts and settlement times;
* :class:`Analytics` derives every result model from those, in Python: averages and
  medians rounded half to even to a micro-unit, nearest-rank percentiles, success and
  error rates, growth, projection, health, chain names, zero-filled day and hour
  buckets, and the ordering of every list with its tie rules.

Money in the result models is a decimal string with exactly six places, as in the
brief's TypeScript types and the JSON contract; the derivation works in exact integer
micro-units and formats once (``exporter.events.to_micro`` converts back exactly).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter

from ..events import MICRO, format_micro, to_micro

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000

DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 1000
"""Top lists answer ``limit`` entries, 1..MAX_LIMIT; :meth:`Analytics.compute_all` keeps
MAX_LIMIT, and any smaller limit's answer is a prefix of that list (the order is total)."""

REALTIME_SPAN_MS: Final = MINUTE_MS
"""``paymentsPerMinute`` counts settled events in ``(at - 60 s, at]``."""

CHAIN_NAMES: Final[Mapping[str, str]] = {
    "eip155:8453": "Base",
    "eip155:84532": "Base Sepolia",
    "eip155:42161": "Arbitrum",
    "eip155:10": "Optimism",
    "eip155:137": "Polygon",
    "eip155:1": "Ethereum",
    "eip155:43114": "Avalanche",
}
"""Display names of known CAIP-2 chains; any other network shows its id."""


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


def _money_in(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be micro-units (int) or a decimal string, not a boolean")
    if isinstance(value, int):
        return format_micro(value)
    if isinstance(value, str):
        if not _MONEY_TEXT.fullmatch(value):
            raise ValueError(f"must be a decimal string such as '12.500000', got {value!r}")
        return format_micro(to_micro(value))
    return value


def _integer_in(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be an integer or an integer string, not a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError(f"must be an integer string such as '21000', got {value!r}")
        return str(int(value))
    return value


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


# --------------------------------------------------------------------------- store protocol


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


@dataclass(frozen=True, slots=True)
class PointInTime:
    """State as of ``at`` rather than over a window."""

    pending_payments: int
    websocket_clients: int


class AnalyticsSource(Protocol):
    """The raw aggregates a store answers; :class:`Analytics` derives every result from them.

    Common rules for every method:

    * ``spans_ms`` are window lengths in ms; a span ``s`` selects the records with
      ``at_ms - s < time_ms <= at_ms`` (``time_ms`` is the event's own timestamp).
      Results are keyed by span. Spans are positive and may include any length
      (the realtime figures ask for 60,000); each is answered independently.
    * "settled records" are payment records with status ``settled``; they always carry
      payer, payee, ``amount_micro``, ``fee_micro`` and ``settlement_ms``.
    * Money and gas are exact Python ``int`` (convert DuckDB HUGEINT / Flux int64 sums);
      ``settlement_ms`` values and sums are ``float``.
    * Every method is one query (or one statement) where the store allows it.
    """

    async def window_totals(self, at_ms: int, spans_ms: Sequence[int]) -> dict[int, WindowTotals]:
        """Per span: per-network counters and sums, the second-half fees, revenue by kind.

        Networks come from the ``payment`` records (``network`` column) and from the
        ``batch`` records with status ``settled`` (their ``batch:created`` network);
        revenue from the ``revenue`` records. Any order.
        """
        ...

    async def settled_buckets(
        self, at_ms: int, spans_ms: Sequence[int], bucket_ms: int
    ) -> dict[int, list[BucketTotals]]:
        """Per span: settled records grouped by ``time_ms - time_ms % bucket_ms``.

        Only buckets holding at least one settled record of the window; distinct payers
        and payees count among that bucket's settled records in the window. Any order.
        ``bucket_ms`` is ``HOUR_MS`` or ``DAY_MS`` (UTC: epoch ms has no leap seconds).
        """
        ...

    async def settled_order_values(
        self, at_ms: int, ranks: Mapping[int, RankRequest]
    ) -> dict[int, RankValues]:
        """Per span: the values at 1-based ranks of the ascending settled amounts/times.

        Rank ``k`` of ``n`` settled records is ``sorted(values)[k - 1]``; callers ask only
        for ``1 <= k <= n``, with ``n`` the ``settled`` count of :meth:`window_totals`.
        """
        ...

    async def top_lists(
        self, at_ms: int, spans_ms: Sequence[int], limit: int
    ) -> dict[int, TopLists]:
        """Per span: the first ``limit`` payers, payees and routes over settled records.

        Payers: by ``payer``, amount = sum of ``amount_micro``, count, latest ``time_ms``;
        ordered amount desc, then address asc. Payees: by ``payee``, amount, count, distinct
        payers; same order. Routes: by (payer, payee), amount, count; amount desc, then
        payer asc, payee asc. Strings compare by code point (byte order of UTF-8).
        """
        ...

    async def point_in_time(self, at_ms: int) -> PointInTime:
        """Pending payments and the WebSocket client count as of ``at_ms``.

        Pending: distinct ``payment_id`` of payment records with status ``received`` and
        ``time_ms <= at_ms`` having no record with ``time_ms <= at_ms`` and status
        ``settled``, or status ``failed`` with a ``payment_id`` other than ``"unknown"``
        (an unknown failure never joins a payment). WebSocket clients: ``count`` of the
        ``websocket`` record with the greatest ``time_ms <= at_ms`` (equal times: the
        greatest count); 0 when there is none.
        """
        ...


# --------------------------------------------------------------------------- pure rules


def round_half_even_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half to even, exactly (``denominator > 0``)."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def nearest_rank(percentile: int, n: int) -> int:
    """The 1-based nearest rank ``ceil(p/100 * n)`` in integers (0 when ``n`` is 0)."""
    return (percentile * n + 99) // 100


def median_ranks(n: int) -> tuple[int, ...]:
    """The 1-based ranks whose values make the median: one for odd ``n``, two for even."""
    if n == 0:
        return ()
    if n % 2:
        return ((n + 1) // 2,)
    return (n // 2, n // 2 + 1)


def chain_name(chain_id: str) -> str:
    """The display name of a CAIP-2 chain id, or the id itself."""
    return CHAIN_NAMES.get(chain_id, chain_id)


def health_level(error_rate: float, average_settlement_ms: float) -> HealthLevel:
    """``critical`` above 10 % errors or 60 s settlement, ``degraded`` above 5 % or 30 s."""
    if error_rate > 10 or average_settlement_ms > 60_000:
        return "critical"
    if error_rate > 5 or average_settlement_ms > 30_000:
        return "degraded"
    return "healthy"


def bucket_starts(at_ms: int, span_ms: int, bucket_ms: int) -> range:
    """Bucket starts from the bucket holding ``at - span`` to the one holding ``at``."""
    first = (at_ms - span_ms) - (at_ms - span_ms) % bucket_ms
    last = at_ms - at_ms % bucket_ms
    return range(first, last + 1, bucket_ms)


def utc_date(ms: int) -> str:
    """The UTC date (``YYYY-MM-DD``) of an epoch-ms instant."""
    return datetime.fromtimestamp(ms // 1000, tz=UTC).date().isoformat()


def check_limit(limit: int) -> int:
    """``limit`` when it is an integer in 1..MAX_LIMIT, else :class:`AnalyticsRequestError`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise AnalyticsRequestError(
            f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}"
        )
    return limit


# --------------------------------------------------------------------------- derivation


@dataclass(frozen=True, slots=True)
class _Sums:
    received: int
    settled: int
    failed: int
    volume: int
    fees: int
    settlement_ms: float


def _sums(totals: WindowTotals) -> _Sums:
    networks = totals.networks
    return _Sums(
        received=sum(n.received for n in networks),
        settled=sum(n.settled for n in networks),
        failed=sum(n.failed for n in networks),
        volume=sum(n.volume_micro for n in networks),
        fees=sum(n.fees_micro for n in networks),
        settlement_ms=sum(n.settlement_ms_sum for n in networks),
    )


def _mean(total: float, n: int) -> float:
    return total / n if n else 0.0


def _rank_request(settled: int) -> RankRequest:
    if settled == 0:
        return RankRequest(settled=0)
    return RankRequest(
        settled=settled,
        amount=median_ranks(settled),
        settlement=(nearest_rank(95, settled), nearest_rank(99, settled)),
    )


def _payment_metrics(totals: WindowTotals, values: RankValues) -> PaymentMetrics:
    s = _sums(totals)
    median = 0
    if s.settled:
        middle = [values.amount[k] for k in median_ranks(s.settled)]
        median = round_half_even_div(sum(middle), len(middle))
    p95 = values.settlement[nearest_rank(95, s.settled)] if s.settled else 0.0
    p99 = values.settlement[nearest_rank(99, s.settled)] if s.settled else 0.0
    return PaymentMetrics(
        totalPayments=s.received,
        successfulPayments=s.settled,
        failedPayments=s.failed,
        totalVolume=s.volume,
        totalFees=s.fees,
        averagePaymentSize=round_half_even_div(s.volume, s.settled) if s.settled else 0,
        medianPaymentSize=median,
        averageSettlementTime=_mean(s.settlement_ms, s.settled),
        p95SettlementTime=float(p95),
        p99SettlementTime=float(p99),
    )


def _network_metrics(totals: WindowTotals) -> list[NetworkMetrics]:
    rows = [n for n in totals.networks if n.payment_events > 0]
    rows.sort(key=lambda n: (-n.volume_micro, n.network))
    return [
        NetworkMetrics(
            chainId=n.network,
            chainName=chain_name(n.network),
            totalPayments=n.received,
            totalVolume=n.volume_micro,
            totalFees=n.fees_micro,
            averageGasCost=(
                round_half_even_div(n.gas_used * MICRO, n.batch_payments)
                if n.batch_payments
                else 0
            ),
            totalGasSpent=n.gas_used,
            successRate=(
                n.settled / (n.settled + n.failed) * 100 if n.settled + n.failed else 100.0
            ),
            averageConfirmationTime=_mean(n.settlement_ms_sum, n.settled),
        )
        for n in rows
    ]


def _growth_rate(total_fees: int, second_half: int) -> float:
    first_half = total_fees - second_half
    return (second_half - first_half) / first_half * 100 if first_half else 0.0


def _revenue_metrics(
    window: Window, at_ms: int, totals: WindowTotals, days: list[BucketTotals]
) -> RevenueMetrics:
    s = _sums(totals)
    by_day = {b.start_ms: b for b in days}
    revenue_by_day = []
    for start in bucket_starts(at_ms, window.ms, DAY_MS):
        b = by_day.get(start)
        revenue_by_day.append(
            DailyStats(
                date=utc_date(start),
                payments=b.settled if b else 0,
                volume=b.volume_micro if b else 0,
                fees=b.fees_micro if b else 0,
                uniquePayers=b.unique_payers if b else 0,
                uniquePayees=b.unique_payees if b else 0,
            )
        )
    return RevenueMetrics(
        totalRevenue=s.fees,
        revenueByNetwork={
            n.network: n.fees_micro
            for n in sorted(totals.networks, key=lambda n: n.network)
            if n.settled > 0
        },
        revenueByDay=revenue_by_day,
        projectedMonthlyRevenue=round_half_even_div(s.fees * 30 * DAY_MS, window.ms),
        growthRate=_growth_rate(s.fees, totals.fees_second_half_micro),
    )


def _revenue_breakdown(totals: WindowTotals) -> RevenueBreakdown:
    fees = _sums(totals).fees
    gas = totals.revenue_by_kind.get("gas_sponsorship", 0)
    premium = totals.revenue_by_kind.get("premium", 0)
    return RevenueBreakdown(
        facilitatorFees=fees, gasSponsorship=gas, premiumFeatures=premium,
        total=fees + gas + premium,
    )


def _top_payers(lists: TopLists, limit: int) -> list[TopPayer]:
    rows = sorted(lists.payers, key=lambda p: (-p.amount_micro, p.address))[:limit]
    return [
        TopPayer(address=p.address, totalPaid=p.amount_micro, paymentCount=p.count,
                 lastPayment=p.last_ms)
        for p in rows
    ]


def _top_payees(lists: TopLists, limit: int) -> list[TopPayee]:
    rows = sorted(lists.payees, key=lambda p: (-p.amount_micro, p.address))[:limit]
    return [
        TopPayee(address=p.address, totalReceived=p.amount_micro, paymentCount=p.count,
                 uniquePayers=p.unique_payers)
        for p in rows
    ]


def _top_routes(lists: TopLists, limit: int) -> list[TopRoute]:
    rows = sorted(lists.routes, key=lambda r: (-r.amount_micro, r.payer, r.payee))[:limit]
    return [
        TopRoute(payer=r.payer, payee=r.payee, volume=r.amount_micro, count=r.count)
        for r in rows
    ]


def _time_series(
    window: Window, at_ms: int, metric: TimeSeriesMetric, buckets: list[BucketTotals]
) -> TimeSeries:
    by_start = {b.start_ms: b for b in buckets}
    points = []
    for start in bucket_starts(at_ms, window.ms, window.bucket_ms):
        b = by_start.get(start)
        value: Number
        if metric == "payments":
            value = b.settled if b else 0
        elif metric == "volume":
            value = (b.volume_micro if b else 0) / MICRO
        else:
            value = (b.fees_micro if b else 0) / MICRO
        points.append(TimeSeriesPoint(timestamp=start, value=value))
    return TimeSeries(
        name=metric,
        window=window,
        points=points,
        aggregation="count" if metric == "payments" else "sum",
    )


def _realtime(
    at_ms: int, last_minute: WindowTotals, hours: list[BucketTotals], state: PointInTime
) -> RealtimeStats:
    hour_start = at_ms - at_ms % HOUR_MS
    this_hour = next((b.fees_micro for b in hours if b.start_ms == hour_start), 0)
    return RealtimeStats(
        paymentsPerMinute=_sums(last_minute).settled,
        revenuePerHour=this_hour,
        pendingSettlements=state.pending_payments,
        activeConnections=state.websocket_clients,
    )


def _health(totals: WindowTotals, state: PointInTime) -> HealthStatus:
    s = _sums(totals)
    terminal = s.settled + s.failed
    error_rate = s.failed / terminal * 100 if terminal else 0.0
    average = _mean(s.settlement_ms, s.settled)
    return HealthStatus(
        status=health_level(error_rate, average),
        errorRate=error_rate,
        averageSettlementTime=average,
        pendingPayments=state.pending_payments,
    )


# --------------------------------------------------------------------------- facade

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
    return AnalyticKey(name, window, _metric(metric))


def _metric(metric: str | None) -> TimeSeriesMetric:
    for known in TIME_SERIES_METRICS:
        if metric == known:
            return known
    raise AnalyticsRequestError(
        f"unknown time-series metric {metric!r}; allowed: {', '.join(TIME_SERIES_METRICS)}"
    )


class Analytics:
    """Every analytic of docs/architecture.md section 5 over one :class:`AnalyticsSource`."""

    def __init__(self, source: AnalyticsSource) -> None:
        """Derive results from ``source``'s raw aggregates."""
        self.source = source

    async def _totals(self, at_ms: int, span_ms: int) -> WindowTotals:
        return (await self.source.window_totals(at_ms, [span_ms]))[span_ms]

    async def _order_values(self, at_ms: int, span_ms: int, settled: int) -> RankValues:
        if settled == 0:
            return RankValues()
        answer = await self.source.settled_order_values(at_ms, {span_ms: _rank_request(settled)})
        return answer[span_ms]

    async def payments(self, window: Window, at_ms: int) -> PaymentMetrics:
        """PaymentMetrics over ``(at - window, at]``."""
        totals = await self._totals(at_ms, window.ms)
        values = await self._order_values(at_ms, window.ms, _sums(totals).settled)
        return _payment_metrics(totals, values)

    async def networks(self, window: Window, at_ms: int) -> list[NetworkMetrics]:
        """NetworkMetrics of every network with a payment event in the window."""
        return _network_metrics(await self._totals(at_ms, window.ms))

    async def revenue(self, window: Window, at_ms: int) -> RevenueMetrics:
        """RevenueMetrics (fees of settled payments) with days, projection and growth."""
        totals, days = await asyncio.gather(
            self._totals(at_ms, window.ms),
            self.source.settled_buckets(at_ms, [window.ms], DAY_MS),
        )
        return _revenue_metrics(window, at_ms, totals, days.get(window.ms, []))

    async def revenue_breakdown(self, window: Window, at_ms: int) -> RevenueBreakdown:
        """Facilitator fees, gas sponsorship and premium revenue, and their total."""
        return _revenue_breakdown(await self._totals(at_ms, window.ms))

    async def _top(self, window: Window, at_ms: int, limit: int) -> TopLists:
        lists = await self.source.top_lists(at_ms, [window.ms], check_limit(limit))
        return lists[window.ms]

    async def top_payers(
        self, window: Window, at_ms: int, limit: int = DEFAULT_LIMIT
    ) -> list[TopPayer]:
        """The ``limit`` payers who paid most (settled), ties by address."""
        return _top_payers(await self._top(window, at_ms, limit), limit)

    async def top_payees(
        self, window: Window, at_ms: int, limit: int = DEFAULT_LIMIT
    ) -> list[TopPayee]:
        """The ``limit`` payees who received most (settled), ties by address."""
        return _top_payees(await self._top(window, at_ms, limit), limit)

    async def top_routes(
        self, window: Window, at_ms: int, limit: int = DEFAULT_LIMIT
    ) -> list[TopRoute]:
        """The ``limit`` payer-payee routes with most settled volume, ties by payer, payee."""
        return _top_routes(await self._top(window, at_ms, limit), limit)

    async def timeseries(
        self, window: Window, at_ms: int, metric: TimeSeriesMetric = "volume"
    ) -> TimeSeries:
        """Settled volume, fees or count per hour (windows up to 24 h) or per day."""
        buckets = await self.source.settled_buckets(at_ms, [window.ms], window.bucket_ms)
        return _time_series(window, at_ms, _metric(metric), buckets.get(window.ms, []))

    async def realtime(self, at_ms: int) -> RealtimeStats:
        """Payments in the last minute, this UTC hour's fees, pending, WebSocket clients."""
        minute, hours, state = await asyncio.gather(
            self._totals(at_ms, REALTIME_SPAN_MS),
            self.source.settled_buckets(at_ms, [HOUR_MS], HOUR_MS),
            self.source.point_in_time(at_ms),
        )
        return _realtime(at_ms, minute, hours.get(HOUR_MS, []), state)

    async def health(self, window: Window, at_ms: int) -> HealthStatus:
        """healthy / degraded / critical from the window's error rate and settlement time."""
        totals, state = await asyncio.gather(
            self._totals(at_ms, window.ms), self.source.point_in_time(at_ms)
        )
        return _health(totals, state)

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
        requests = {
            s: _rank_request(_sums(totals[s]).settled)
            for s in spans
            if _sums(totals[s]).settled
        }
        values = await source.settled_order_values(at_ms, requests) if requests else {}
        out: dict[AnalyticKey, AnalyticsResult] = {}
        if realtime:
            out[AnalyticKey("realtime", None)] = _realtime(
                at_ms, totals[REALTIME_SPAN_MS], hours.get(HOUR_MS, []), state
            )
        for w in chosen:
            t = totals[w.ms]
            series_buckets = (hours if w.bucket_ms == HOUR_MS else days).get(w.ms, [])
            out[AnalyticKey("payments", w)] = _payment_metrics(t, values.get(w.ms, RankValues()))
            out[AnalyticKey("networks", w)] = _network_metrics(t)
            out[AnalyticKey("revenue", w)] = _revenue_metrics(w, at_ms, t, days.get(w.ms, []))
            out[AnalyticKey("revenue/breakdown", w)] = _revenue_breakdown(t)
            out[AnalyticKey("top/payers", w)] = _top_payers(tops[w.ms], MAX_LIMIT)
            out[AnalyticKey("top/payees", w)] = _top_payees(tops[w.ms], MAX_LIMIT)
            out[AnalyticKey("top/routes", w)] = _top_routes(tops[w.ms], MAX_LIMIT)
            for metric in TIME_SERIES_METRICS:
                out[AnalyticKey("timeseries", w, metric)] = _time_series(
                    w, at_ms, metric, series_buckets
                )
            out[AnalyticKey("health", w)] = _health(t, state)
        return out
