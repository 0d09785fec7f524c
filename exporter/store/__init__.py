"""Stores: the time-series sinks the ledger outbox drains into, and the forwarder that drains it.

Other stages import from here; the backends (DuckDB, InfluxDB) load only when opened.
"""

from .forwarder import (
    Forwarder,
    StoreMetrics,
    open_store,
)

__all__ = [
    "Forwarder",
    "StoreMetrics",
    "open_store",
]
