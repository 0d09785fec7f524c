"""Stores: the time-series sinks the ledger outbox drains into, and the forwarder that drains it.

Other stages import from here; the backends (DuckDB, InfluxDB) load only when opened.
"""

from ..addresses import redact_url
from .base import ANSWERED_CLASSES, ERROR_CLASSES, error_class, has_user_info
from .factory import close_stores, open_store, open_stores
from .forwarder import Forwarder, StoreMetrics, StoreState

__all__ = [
    "ANSWERED_CLASSES",
    "ERROR_CLASSES",
    "Forwarder",
    "StoreMetrics",
    "StoreState",
    "error_class",
    "close_stores",
    "has_user_info",
    "open_store",
    "open_stores",
    "redact_url",
]
