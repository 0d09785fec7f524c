"""Reading a store's answers into raw aggregates: the value checks and the per-network
sums that the DuckDB and Flux sources share.

Money and gas must stay exact, so an integer column must hold a Python ``int`` (DuckDB's
HUGEINT sums and Flux's ``long`` both arrive as one); anything else is a query that
answered the wrong type, reported with the store's name rather than summed wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import NetworkTotals


def exact_int(value: object, store: str) -> int:
    """An exact integer count or sum from ``store``; null (an aggregate over no rows) is 0."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an integer from {store}, got {value!r}")


def number(value: object, store: str) -> float:
    """A float from a ``store`` floating or integer column; null is 0.0."""
    if value is None:
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number from {store}, got {value!r}")


def text(value: object, store: str) -> str:
    """A string column from ``store``."""
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string from {store}, got {value!r}")


@dataclass(slots=True)
class NetworkSums:
    """One network's counters and sums, added up from a store's rows or series."""

    events: int = 0
    received: int = 0
    settled: int = 0
    failed: int = 0
    volume: int = 0
    fees: int = 0
    settlement_ms: float = 0.0
    timed: int = 0
    """Settled records with a settlement time."""
    batches: int = 0
    """Settled batch records: a network with only batches still has gas figures."""
    gas_used: int = 0
    batch_payments: int = 0

    def add_status(self, status: object, count: int) -> None:
        """Count ``count`` payment records of ``status`` (verified ones count as events only)."""
        self.events += count
        if status == "received":
            self.received += count
        elif status == "settled":
            self.settled += count
        elif status == "failed":
            self.failed += count

    def add(self, other: NetworkSums) -> None:
        """Add ``other``'s counters and sums to these."""
        self.events += other.events
        self.received += other.received
        self.settled += other.settled
        self.failed += other.failed
        self.volume += other.volume
        self.fees += other.fees
        self.settlement_ms += other.settlement_ms
        self.timed += other.timed
        self.batches += other.batches
        self.gas_used += other.gas_used
        self.batch_payments += other.batch_payments

    def totals(self, network: str) -> NetworkTotals:
        """These sums as ``network``'s :class:`NetworkTotals`."""
        return NetworkTotals(
            network=network,
            payment_events=self.events,
            received=self.received,
            settled=self.settled,
            failed=self.failed,
            volume_micro=self.volume,
            fees_micro=self.fees,
            settlement_ms_sum=self.settlement_ms,
            gas_used=self.gas_used,
            batch_payments=self.batch_payments,
            timed_settled=self.timed,
        )
