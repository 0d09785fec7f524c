"""Money stays exact through the store and the analytics: integer micro-units end to end.

A million settled payments of ``0.000001`` must total exactly ``"1.000000"`` (a float sum
would drift), and amounts near the 12-digit maximum mixed with single micro-units must sum
exactly even where the total no longer fits a 64-bit integer (DuckDB sums as HUGEINT).
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from analytics_helpers import delivered
from conftest import BASE_MS, batch_created, batch_settled, received, settled

from exporter.analytics.compute import Analytics
from exporter.analytics.duckdb import DuckDBAnalyticsSource
from exporter.analytics.models import (
    DAY_MS,
    HOUR_MS,
    AnalyticKey,
    AnalyticsResult,
    Window,
    result_data,
)
from exporter.records import PaymentRecord, StoreRecord
from exporter.store.duckdb import DuckDBStore

AT = BASE_MS + 100 * DAY_MS + 13 * HOUR_MS + 1_234
PAYER, PAYEE = "0x" + "1" * 40, "0x" + "2" * 40
MILLION = 1_000_000
_BATCH = 20_000  # records per store write (inserted 5,000 per statement)


def _data(result: AnalyticsResult) -> dict[str, object]:
    data = result_data(result)
    assert isinstance(data, dict)
    return data


def _six(micro: Fraction) -> str:
    """Micro-units rounded half to even, as a six-place decimal string."""
    whole, fraction = divmod(round(micro), MILLION)
    return f"{whole}.{fraction:06d}"


def _first(result: AnalyticsResult) -> dict[str, object]:
    data = result_data(result)
    assert isinstance(data, list) and data
    first = data[0]
    assert isinstance(first, dict)
    return first


async def test_a_million_micro_payments_total_exactly_one(tmp_path: Path) -> None:
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    try:
        for start in range(0, MILLION, _BATCH):
            batch: list[StoreRecord] = [
                PaymentRecord(
                    f"payment:settled:p{i}",
                    AT - 1 - i,
                    "eip155:8453",
                    "settled",
                    f"p{i}",
                    PAYER,
                    PAYEE,
                    1,
                    1,
                    1_000.0,
                )
                for i in range(start, start + _BATCH)
            ]
            await store.write(batch)
        snapshot = await Analytics(DuckDBAnalyticsSource(store)).compute_all(AT)
    finally:
        await store.close()

    for window in Window:
        assert _data(snapshot[AnalyticKey("payments", window)]) == {
            "totalPayments": 0,
            "successfulPayments": MILLION,
            "failedPayments": 0,
            "totalVolume": "1.000000",
            "totalFees": "1.000000",
            "averagePaymentSize": "0.000001",
            "medianPaymentSize": "0.000001",
            "averageSettlementTime": 1_000.0,
            "p95SettlementTime": 1_000.0,
            "p99SettlementTime": 1_000.0,
        }
        revenue = _data(snapshot[AnalyticKey("revenue", window)])
        assert revenue["totalRevenue"] == "1.000000"
        assert revenue["revenueByNetwork"] == {"eip155:8453": "1.000000"}
        days = revenue["revenueByDay"]
        assert isinstance(days, list)
        assert [d["fees"] for d in days if d["payments"]] == ["1.000000"]
        assert _data(snapshot[AnalyticKey("revenue/breakdown", window)])["total"] == "1.000000"
        assert _first(snapshot[AnalyticKey("networks", window)])["totalVolume"] == "1.000000"
        payer = _first(snapshot[AnalyticKey("top/payers", window)])
        assert (payer["totalPaid"], payer["paymentCount"]) == ("1.000000", MILLION)
        assert _first(snapshot[AnalyticKey("top/routes", window)])["volume"] == "1.000000"
    assert _data(snapshot[AnalyticKey("revenue", Window.H1)])["projectedMonthlyRevenue"] == (
        "720.000000"  # 30 days of hours
    )


async def test_large_and_small_amounts_sum_exactly(tmp_path: Path) -> None:
    largest = "999999999999.999999"  # 12 integer digits: the most one event may carry
    amounts = [largest] * 10 + ["0.000001"] * 7 + ["123456789012.345678"] * 3 + ["0.5"]
    events = []
    for i, amount in enumerate(amounts):
        events += [
            received(f"p{i}", AT - 10_000 + i, amount=amount, payer=PAYER, payee=PAYEE),
            settled(f"p{i}", AT - 5_000 + i, fee=amount),
        ]
    gas = "9" * 30
    for b in range(3):
        events += [
            batch_created(f"b{b}", AT - 9_000, count=7),
            batch_settled(f"b{b}", AT - 1_000, gas=gas),
        ]
    total = sum(Decimal(a) for a in amounts)
    total_micro = int(total * MILLION)
    assert total_micro > 2**63  # beyond BIGINT: the store must sum as HUGEINT
    expected = f"{total:.6f}"

    async with delivered(events, tmp_path, "duckdb") as analytics:
        payments = _data(await analytics.payments(Window.H1, AT))
        revenue = _data(await analytics.revenue(Window.D90, AT))
        payer = _first(await analytics.top_payers(Window.H24, AT))
        network = _first(await analytics.networks(Window.H6, AT))
        breakdown = _data(await analytics.revenue_breakdown(Window.H1, AT))

    assert (payments["totalVolume"], payments["totalFees"]) == (expected, expected)
    assert payments["averagePaymentSize"] == _six(Fraction(total_micro, len(amounts)))
    assert payments["medianPaymentSize"] == "123456789012.345678"  # the 11th of 21
    assert revenue["totalRevenue"] == expected
    assert revenue["projectedMonthlyRevenue"] == _six(Fraction(total_micro * 30, 90))
    assert payer["totalPaid"] == expected
    assert (network["totalVolume"], network["totalGasSpent"]) == (expected, str(3 * int(gas)))
    assert network["averageGasCost"] == _six(Fraction(3 * int(gas) * MILLION, 21))
    assert breakdown["total"] == expected
