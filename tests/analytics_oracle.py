"""A brute-force oracle for the analytics: every figure straight from the raw events.

It shares no code with the exporter's ledger, stores or derivation: it reads the events
as the facilitator sent them (in delivery order, with duplicates and conflicts), applies
docs/architecture.md section 2 (dedup keys, joins by paymentId/batchId in any order,
unknown failures, failures whose payment never arrived) and section 5 (windows, exact
money, rounding, percentiles, ordering) in the plainest way, and answers JSON-ready values (money as
six-place strings) to compare with the exporter's serialised results.

Rational arithmetic (:class:`fractions.Fraction`) stands in for every quotient, so the
rounding rules are checked against an independent implementation.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

WINDOWS_MS: dict[str, int] = {
    "1h": 3_600_000,
    "6h": 21_600_000,
    "24h": 86_400_000,
    "7d": 604_800_000,
    "30d": 2_592_000_000,
    "90d": 7_776_000_000,
}
NAMES = {
    "eip155:8453": "Base",
    "eip155:84532": "Base Sepolia",
    "eip155:42161": "Arbitrum",
    "eip155:10": "Optimism",
    "eip155:137": "Polygon",
    "eip155:1": "Ethereum",
    "eip155:43114": "Avalanche",
}
METRICS = ("volume", "fees", "payments")
JSON = Any
OracleKey = tuple[str, str | None, str | None]
"""(analytic name, window or None for realtime, time-series metric or None)."""


@dataclass(frozen=True)
class PaymentFact:
    """One payment lifecycle event as the analytics must see it (joined)."""

    status: str
    time: int
    network: str
    payment_id: str
    payer: str | None = None
    payee: str | None = None
    amount: int = 0
    fee: int = 0
    settlement_ms: float | None = 0.0
    """None for a settlement without its (optional) settlementTime."""


@dataclass
class Facts:
    """What the deduplicated, joined event stream says."""

    payments: list[PaymentFact] = field(default_factory=list)
    batches: list[tuple[int, str, int, int]] = field(default_factory=list)
    """Settled batches: (time, network of the created event, paymentCount, gasUsed)."""
    revenue: list[tuple[int, str, int]] = field(default_factory=list)
    """(time, kind, amount micro)."""
    websocket: list[tuple[int, int]] = field(default_factory=list)
    """(time, count)."""


def micro(amount: str) -> int:
    """Token units to micro-units, rounded half to even."""
    return int((Decimal(amount) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def money(value: int) -> str:
    """Micro-units as a six-place decimal string."""
    return f"{value // 1_000_000}.{value % 1_000_000:06d}"


def _address(value: str) -> str:
    is_evm = len(value) == 42 and value[:2] == "0x"
    is_evm = is_evm and all(c in "0123456789abcdefABCDEF" for c in value[2:])
    return value.lower() if is_evm else value


def _settlement_time(data: dict[str, Any]) -> float | None:
    value = data.get("settlementTime")
    return None if value is None else float(value)


def _key(event: dict[str, Any]) -> object:
    kind, data = event["type"], event["data"]
    ref = data.get("paymentId", data.get("batchId"))
    lifecycle = kind not in ("revenue:recorded", "websocket:clients") and ref != "unknown"
    if lifecycle:  # the natural key, whatever id the event carries
        return (kind, ref)
    if event.get("id") is not None:
        return ("id", event["id"])
    if kind in ("revenue:recorded", "websocket:clients") or ref == "unknown":
        # the ledger hashes the normalised body: equal amounts are equal however written
        body = dict(data)
        if "amount" in body:
            body["amount"] = str(Decimal(body["amount"]).normalize())
        return (kind, data["timestamp"], json.dumps(body, sort_keys=True))
    return (kind, ref)


def facts_from_events(events: Iterable[dict[str, Any]]) -> Facts:
    """Deduplicate (first of each key wins) and join, as docs/architecture.md section 2 says."""
    kept: list[dict[str, Any]] = []
    seen: set[object] = set()
    ended: set[str] = set()  # payments with a settled or failed event: they end once
    for event in events:
        key = _key(event)
        if key in seen:
            continue
        pid = event["data"].get("paymentId")
        if event["type"] in ("payment:settled", "payment:failed") and pid != "unknown":
            if pid in ended:
                continue  # a second end: a conflict
            ended.add(pid)
        seen.add(key)
        kept.append(event)
    first_received: dict[str, dict[str, Any]] = {}
    first_created: dict[str, dict[str, Any]] = {}
    for event in kept:
        data = event["data"]
        if event["type"] == "payment:received":
            first_received.setdefault(data["paymentId"], data)
        elif event["type"] == "batch:created":
            first_created.setdefault(data["batchId"], data)

    facts = Facts()
    for event in kept:
        kind, data = event["type"], event["data"]
        ts = data["timestamp"]
        if kind == "payment:received":
            facts.payments.append(
                PaymentFact(
                    "received",
                    ts,
                    data["network"],
                    data["paymentId"],
                    _address(data["payer"]),
                    _address(data["payee"]),
                    micro(data["amount"]),
                )
            )
        elif kind in ("payment:verified", "payment:settled", "payment:failed"):
            pid = data["paymentId"]
            payment = None if pid == "unknown" else first_received.get(pid)
            if payment is None:
                # Never joined: released past the join timeout with what it carries, on
                # its own network, else unknown; a settlement with amount 0 and unknown
                # parties (docs/architecture.md section 2, "Join deadline").
                network = data.get("network") or "unknown"
                if kind == "payment:failed":
                    facts.payments.append(PaymentFact("failed", ts, network, pid))
                elif kind == "payment:settled":
                    facts.payments.append(
                        PaymentFact(
                            "settled", ts, network, pid, "unknown", "unknown", 0,
                            micro(data["fee"]), _settlement_time(data),
                        )
                    )
                else:
                    facts.payments.append(PaymentFact("verified", ts, "unknown", pid))
                continue
            facts.payments.append(
                PaymentFact(
                    kind.removeprefix("payment:"),
                    ts,
                    payment["network"],
                    pid,
                    _address(payment["payer"]),
                    _address(payment["payee"]),
                    micro(payment["amount"]),
                    micro(data["fee"]) if kind == "payment:settled" else 0,
                    _settlement_time(data) if kind == "payment:settled" else 0.0,
                )
            )
        elif kind == "batch:settled":
            created = first_created.get(data["batchId"])
            if created is not None:
                facts.batches.append(
                    (ts, created["network"], created["paymentCount"], int(data["gasUsed"]))
                )
            else:  # released past the join timeout: unknown network, no payments
                facts.batches.append((ts, "unknown", 0, int(data["gasUsed"])))
        elif kind == "revenue:recorded":
            facts.revenue.append((ts, data["kind"], micro(data["amount"])))
        elif kind == "websocket:clients":
            facts.websocket.append((ts, data["count"]))
    return facts


def _inside(time: int, at: int, span: int) -> bool:
    return at - span < time <= at


def _half_even(value: Fraction) -> int:
    return round(value)  # Fraction rounds half to even


def _times(settled: list[PaymentFact]) -> list[float]:
    """The settlement times of the settled facts that have one (settlementTime is optional)."""
    return [p.settlement_ms for p in settled if p.settlement_ms is not None]


def _mean_ms(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _rank(values: list[Any], percentile: int) -> Any:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[math.ceil(Fraction(percentile, 100) * len(ordered)) - 1]


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 1000, tz=UTC) + timedelta(milliseconds=ms % 1000)


def _epoch_ms(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) * 1000


class Oracle:
    """Every analytic, computed by brute force over :class:`Facts`."""

    def __init__(self, facts: Facts) -> None:
        """Answer from ``facts``."""
        self.facts = facts

    def _pay(self, status: str, at: int, span: int) -> list[PaymentFact]:
        return [p for p in self.facts.payments if p.status == status and _inside(p.time, at, span)]

    def payments(self, at: int, window: str) -> JSON:
        """PaymentMetrics."""
        span = WINDOWS_MS[window]
        settled = self._pay("settled", at, span)
        amounts = sorted(p.amount for p in settled)
        times = _times(settled)
        n = len(settled)
        if n == 0:
            median = 0
        elif n % 2:
            median = amounts[n // 2]
        else:
            median = _half_even(Fraction(amounts[n // 2 - 1] + amounts[n // 2], 2))
        volume = sum(amounts)
        return {
            "totalPayments": len(self._pay("received", at, span)),
            "successfulPayments": n,
            "failedPayments": len(self._pay("failed", at, span)),
            "totalVolume": money(volume),
            "totalFees": money(sum(p.fee for p in settled)),
            "averagePaymentSize": money(_half_even(Fraction(volume, n)) if n else 0),
            "medianPaymentSize": money(median),
            "averageSettlementTime": _mean_ms(times),
            "p95SettlementTime": float(_rank(times, 95)),
            "p99SettlementTime": float(_rank(times, 99)),
        }

    def networks(self, at: int, window: str) -> JSON:
        """NetworkMetrics[]."""
        span = WINDOWS_MS[window]
        inside = [p for p in self.facts.payments if _inside(p.time, at, span)]
        rows: list[tuple[int, dict[str, Any]]] = []
        for network in {p.network for p in inside}:
            mine = [p for p in inside if p.network == network]
            settled = [p for p in mine if p.status == "settled"]
            failed = [p for p in mine if p.status == "failed"]
            batches = [b for b in self.facts.batches if b[1] == network and _inside(b[0], at, span)]
            gas = sum(b[3] for b in batches)
            count = sum(b[2] for b in batches)
            volume = sum(p.amount for p in settled)
            terminal = len(settled) + len(failed)
            rows.append((volume, {
                    "chainId": network,
                    "chainName": NAMES.get(network, network),
                    "totalPayments": sum(1 for p in mine if p.status == "received"),
                    "totalVolume": money(volume),
                    "totalFees": money(sum(p.fee for p in settled)),
                    "averageGasCost": money(
                        _half_even(Fraction(gas, count) * 1_000_000) if count else 0
                    ),
                    "totalGasSpent": str(gas),
                    "successRate": len(settled) / terminal * 100 if terminal else 100.0,
                    "averageConfirmationTime": _mean_ms(_times(settled)),
                }))
        rows.sort(key=lambda r: (-r[0], r[1]["chainId"]))
        return [row for _, row in rows]

    def revenue(self, at: int, window: str) -> JSON:
        """RevenueMetrics."""
        span = WINDOWS_MS[window]
        settled = self._pay("settled", at, span)
        total = sum(p.fee for p in settled)
        by_network: dict[str, int] = defaultdict(int)
        for p in settled:
            by_network[p.network] += p.fee
        on_day: dict[date, list[PaymentFact]] = defaultdict(list)
        for p in settled:
            on_day[_utc(p.time).date()].append(p)
        days = []
        day: date = _utc(at - span).date()
        while day <= _utc(at).date():
            mine = on_day[day]
            days.append(
                {
                    "date": day.isoformat(),
                    "payments": len(mine),
                    "volume": money(sum(p.amount for p in mine)),
                    "fees": money(sum(p.fee for p in mine)),
                    "uniquePayers": len({p.payer for p in mine}),
                    "uniquePayees": len({p.payee for p in mine}),
                }
            )
            day += timedelta(days=1)
        second = sum(p.fee for p in settled if _inside(p.time, at, span // 2))
        first = total - second
        return {
            "totalRevenue": money(total),
            "revenueByNetwork": {k: money(v) for k, v in sorted(by_network.items())},
            "revenueByDay": days,
            "projectedMonthlyRevenue": money(
                _half_even(Fraction(total * 30) / Fraction(span, 86_400_000))
            ),
            "growthRate": (second - first) / first * 100 if first else 0.0,
        }

    def breakdown(self, at: int, window: str) -> JSON:
        """RevenueBreakdown."""
        span = WINDOWS_MS[window]
        fees = sum(p.fee for p in self._pay("settled", at, span))
        by_kind: dict[str, int] = defaultdict(int)
        for ts, kind, amount in self.facts.revenue:
            if _inside(ts, at, span):
                by_kind[kind] += amount
        gas, premium = by_kind["gas_sponsorship"], by_kind["premium"]
        return {
            "facilitatorFees": money(fees),
            "gasSponsorship": money(gas),
            "premiumFeatures": money(premium),
            "total": money(fees + gas + premium),
        }

    def top_payers(self, at: int, window: str, limit: int) -> JSON:
        """TopPayer[]."""
        groups: dict[str, list[PaymentFact]] = defaultdict(list)
        for p in self._pay("settled", at, WINDOWS_MS[window]):
            assert p.payer is not None
            groups[p.payer].append(p)
        rows = sorted(groups.items(), key=lambda kv: (-sum(p.amount for p in kv[1]), kv[0]))
        return [
            {
                "address": address,
                "totalPaid": money(sum(p.amount for p in mine)),
                "paymentCount": len(mine),
                "lastPayment": max(p.time for p in mine),
            }
            for address, mine in rows[:limit]
        ]

    def top_payees(self, at: int, window: str, limit: int) -> JSON:
        """TopPayee[]."""
        groups: dict[str, list[PaymentFact]] = defaultdict(list)
        for p in self._pay("settled", at, WINDOWS_MS[window]):
            assert p.payee is not None
            groups[p.payee].append(p)
        rows = sorted(groups.items(), key=lambda kv: (-sum(p.amount for p in kv[1]), kv[0]))
        return [
            {
                "address": address,
                "totalReceived": money(sum(p.amount for p in mine)),
                "paymentCount": len(mine),
                "uniquePayers": len({p.payer for p in mine}),
            }
            for address, mine in rows[:limit]
        ]

    def top_routes(self, at: int, window: str, limit: int) -> JSON:
        """TopRoute[]."""
        groups: dict[tuple[str, str], list[PaymentFact]] = defaultdict(list)
        for p in self._pay("settled", at, WINDOWS_MS[window]):
            assert p.payer is not None and p.payee is not None
            groups[(p.payer, p.payee)].append(p)
        rows = sorted(groups.items(), key=lambda kv: (-sum(p.amount for p in kv[1]), kv[0]))
        return [
            {
                "payer": payer,
                "payee": payee,
                "volume": money(sum(p.amount for p in mine)),
                "count": len(mine),
            }
            for (payer, payee), mine in rows[:limit]
        ]

    def timeseries(self, at: int, window: str, metric: str) -> JSON:
        """TimeSeries."""
        span = WINDOWS_MS[window]
        settled = self._pay("settled", at, span)
        hourly = span <= 86_400_000

        def bucket(ms: int) -> datetime:
            moment = _utc(ms).replace(minute=0, second=0, microsecond=0)
            return moment if hourly else moment.replace(hour=0)

        step = timedelta(hours=1) if hourly else timedelta(days=1)
        in_bucket: dict[datetime, list[PaymentFact]] = defaultdict(list)
        for p in settled:
            in_bucket[bucket(p.time)].append(p)
        points = []
        start = bucket(at - span)
        while start <= bucket(at):
            mine = in_bucket[start]
            value: int | float
            if metric == "payments":
                value = len(mine)
            elif metric == "volume":
                value = sum(p.amount for p in mine) / 1_000_000
            else:
                value = sum(p.fee for p in mine) / 1_000_000
            points.append({"timestamp": _epoch_ms(start), "value": value})
            start += step
        return {
            "name": metric,
            "window": window,
            "points": points,
            "aggregation": "count" if metric == "payments" else "sum",
        }

    def pending(self, at: int) -> int:
        """Payments received at or before ``at`` with no settled/failed event by then."""
        received = {
            p.payment_id for p in self.facts.payments if p.status == "received" and p.time <= at
        }
        ended = {
            p.payment_id
            for p in self.facts.payments
            if p.time <= at
            and (p.status == "settled" or (p.status == "failed" and p.payment_id != "unknown"))
        }
        return len(received - ended)

    def realtime(self, at: int) -> JSON:
        """RealtimeStats."""
        hour = _epoch_ms(_utc(at).replace(minute=0, second=0, microsecond=0))
        settled = [p for p in self.facts.payments if p.status == "settled"]
        latest = [(ts, count) for ts, count in self.facts.websocket if ts <= at]
        return {
            "paymentsPerMinute": sum(1 for p in settled if _inside(p.time, at, 60_000)),
            "revenuePerHour": money(sum(p.fee for p in settled if hour <= p.time <= at)),
            "pendingSettlements": self.pending(at),
            "activeConnections": max(latest)[1] if latest else 0,
        }

    def health(self, at: int, window: str) -> JSON:
        """HealthStatus."""
        span = WINDOWS_MS[window]
        settled = self._pay("settled", at, span)
        failed = len(self._pay("failed", at, span))
        terminal = len(settled) + failed
        error_rate = failed / terminal * 100 if terminal else 0.0
        average = _mean_ms(_times(settled))
        if error_rate > 10 or average > 60_000:
            status = "critical"
        elif error_rate > 5 or average > 30_000:
            status = "degraded"
        else:
            status = "healthy"
        return {
            "status": status,
            "errorRate": error_rate,
            "averageSettlementTime": average,
            "pendingPayments": self.pending(at),
        }

    def answer(
        self, name: str, window: str | None, at: int, limit: int = 10, metric: str = "volume"
    ) -> JSON:
        """One analytic by its API name."""
        if name == "realtime":
            return self.realtime(at)
        assert window is not None
        match name:
            case "payments":
                return self.payments(at, window)
            case "networks":
                return self.networks(at, window)
            case "revenue":
                return self.revenue(at, window)
            case "revenue/breakdown":
                return self.breakdown(at, window)
            case "top/payers":
                return self.top_payers(at, window, limit)
            case "top/payees":
                return self.top_payees(at, window, limit)
            case "top/routes":
                return self.top_routes(at, window, limit)
            case "timeseries":
                return self.timeseries(at, window, metric)
            case "health":
                return self.health(at, window)
        raise ValueError(f"unknown analytic {name!r}")

    def everything(self, at: int, limit: int = 1000) -> dict[OracleKey, JSON]:
        """Every analytic for every window, keyed like the exporter's snapshot."""
        out: dict[OracleKey, JSON] = {("realtime", None, None): self.realtime(at)}
        for window in WINDOWS_MS:
            for name in (
                "payments",
                "networks",
                "revenue",
                "revenue/breakdown",
                "top/payers",
                "top/payees",
                "top/routes",
                "health",
            ):
                out[(name, window, None)] = self.answer(name, window, at, limit)
            for metric in METRICS:
                out[("timeseries", window, metric)] = self.timeseries(at, window, metric)
        return out
