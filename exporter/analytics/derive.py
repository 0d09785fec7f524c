"""Every derived figure of the analytics, computed once in Python from a source's raw
aggregates: averages and medians rounded half to even to a micro-unit, nearest-rank
percentiles, success and error rates, growth, projection, health, chain names, zero-filled
day and hour buckets, and the ordering of every list with its tie rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..events import MICRO, round_half_even_div
from ..networks import BUILTIN_TABLE
from .models import (
    DAY_MS,
    HOUR_MS,
    BucketTotals,
    DailyStats,
    HealthLevel,
    HealthStatus,
    NetworkMetrics,
    Number,
    PaymentMetrics,
    PointInTime,
    RankRequest,
    RankValues,
    RealtimeStats,
    RevenueBreakdown,
    RevenueMetrics,
    TimeSeries,
    TimeSeriesMetric,
    TimeSeriesPoint,
    TopLists,
    TopPayee,
    TopPayer,
    TopRoute,
    Window,
    WindowTotals,
)

# --------------------------------------------------------------------------- pure rules


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
    return BUILTIN_TABLE.chain_name(chain_id)


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


# --------------------------------------------------------------------------- derivation


@dataclass(frozen=True, slots=True)
class Sums:
    """A window's counters and sums over all its networks."""
    received: int
    settled: int
    failed: int
    volume: int
    fees: int
    settlement_ms: float
    timed: int
    """Settled records with a settlement time."""


def window_sums(totals: WindowTotals) -> Sums:
    """The totals of every network of ``totals`` added up."""
    networks = totals.networks
    return Sums(
        received=sum(n.received for n in networks),
        settled=sum(n.settled for n in networks),
        failed=sum(n.failed for n in networks),
        volume=sum(n.volume_micro for n in networks),
        fees=sum(n.fees_micro for n in networks),
        settlement_ms=sum(n.settlement_ms_sum for n in networks),
        timed=sum(n.timed_settled for n in networks),
    )


def mean(total: float, n: int) -> float:
    """``total / n``, or 0.0 when ``n`` is 0."""
    return total / n if n else 0.0


def rank_request(settled: int, timed: int | None = None) -> RankRequest:
    """The ranks of the median amount of ``settled`` records and the p95 and p99
    settlement times of the ``timed`` ones (None: all of them) that have a time."""
    timed = settled if timed is None else timed
    if settled == 0:
        return RankRequest(settled=0)
    return RankRequest(
        settled=settled,
        amount=median_ranks(settled),
        settlement=(nearest_rank(95, timed), nearest_rank(99, timed)) if timed else (),
        timed=None if timed == settled else timed,
    )


def payment_metrics(totals: WindowTotals, values: RankValues) -> PaymentMetrics:
    """PaymentMetrics from a window's totals and its rank values."""
    s = window_sums(totals)
    median = 0
    if s.settled:
        middle = [values.amount[k] for k in median_ranks(s.settled)]
        median = round_half_even_div(sum(middle), len(middle))
    p95 = values.settlement[nearest_rank(95, s.timed)] if s.timed else 0.0
    p99 = values.settlement[nearest_rank(99, s.timed)] if s.timed else 0.0
    return PaymentMetrics(
        totalPayments=s.received,
        successfulPayments=s.settled,
        failedPayments=s.failed,
        totalVolume=s.volume,
        totalFees=s.fees,
        averagePaymentSize=round_half_even_div(s.volume, s.settled) if s.settled else 0,
        medianPaymentSize=median,
        averageSettlementTime=mean(s.settlement_ms, s.timed),
        p95SettlementTime=float(p95),
        p99SettlementTime=float(p99),
    )


def network_metrics(
    totals: WindowTotals, names: Callable[[str], str] = BUILTIN_TABLE.chain_name
) -> list[NetworkMetrics]:
    """NetworkMetrics of the networks with a payment record, by volume then chain id;
    ``names`` gives each chain's human name (the operator's network table)."""
    rows = [n for n in totals.networks if n.payment_events > 0]
    rows.sort(key=lambda n: (-n.volume_micro, n.network))
    return [
        NetworkMetrics(
            chainId=n.network,
            chainName=names(n.network),
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
            averageConfirmationTime=mean(n.settlement_ms_sum, n.timed_settled),
        )
        for n in rows
    ]


def growth_rate(total_fees: int, second_half: int) -> float:
    """Second-half fees against the first half, in percent (0 when the first half is 0)."""
    first_half = total_fees - second_half
    return (second_half - first_half) / first_half * 100 if first_half else 0.0


def revenue_metrics(
    window: Window, at_ms: int, totals: WindowTotals, days: list[BucketTotals]
) -> RevenueMetrics:
    """RevenueMetrics with zero-filled days, the 30-day projection and growth."""
    s = window_sums(totals)
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
        growthRate=growth_rate(s.fees, totals.fees_second_half_micro),
    )


def revenue_breakdown(totals: WindowTotals) -> RevenueBreakdown:
    """Facilitator fees, gas sponsorship, premium revenue and their total."""
    fees = window_sums(totals).fees
    gas = totals.revenue_by_kind.get("gas_sponsorship", 0)
    premium = totals.revenue_by_kind.get("premium", 0)
    return RevenueBreakdown(
        facilitatorFees=fees, gasSponsorship=gas, premiumFeatures=premium,
        total=fees + gas + premium,
    )


def top_payers(lists: TopLists, limit: int) -> list[TopPayer]:
    """The first ``limit`` payers by amount paid, ties by address."""
    return [
        TopPayer(address=p.address, totalPaid=p.amount_micro, paymentCount=p.count,
                 lastPayment=p.last_ms)
        for p in lists.first(limit).payers
    ]


def top_payees(lists: TopLists, limit: int) -> list[TopPayee]:
    """The first ``limit`` payees by amount received, ties by address."""
    return [
        TopPayee(address=p.address, totalReceived=p.amount_micro, paymentCount=p.count,
                 uniquePayers=p.unique_payers)
        for p in lists.first(limit).payees
    ]


def top_routes(lists: TopLists, limit: int) -> list[TopRoute]:
    """The first ``limit`` routes by volume, ties by payer then payee."""
    return [
        TopRoute(payer=r.payer, payee=r.payee, volume=r.amount_micro, count=r.count)
        for r in lists.first(limit).routes
    ]


def time_series(
    window: Window, at_ms: int, metric: TimeSeriesMetric, buckets: list[BucketTotals]
) -> TimeSeries:
    """One zero-filled point per bucket of the window: volume, fees (token units) or count."""
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


def realtime_stats(
    at_ms: int, last_minute: WindowTotals, hours: list[BucketTotals], state: PointInTime
) -> RealtimeStats:
    """The last minute's settled count, this UTC hour's fees, pending and clients."""
    hour_start = at_ms - at_ms % HOUR_MS
    this_hour = next((b.fees_micro for b in hours if b.start_ms == hour_start), 0)
    return RealtimeStats(
        paymentsPerMinute=window_sums(last_minute).settled,
        revenuePerHour=this_hour,
        pendingSettlements=state.pending_payments,
        activeConnections=state.websocket_clients,
    )


def health_status(totals: WindowTotals, state: PointInTime) -> HealthStatus:
    """Health from the window's error rate and mean settlement time."""
    s = window_sums(totals)
    terminal = s.settled + s.failed
    error_rate = s.failed / terminal * 100 if terminal else 0.0
    average = mean(s.settlement_ms, s.timed)
    return HealthStatus(
        status=health_level(error_rate, average),
        errorRate=error_rate,
        averageSettlementTime=average,
        pendingPayments=state.pending_payments,
    )
