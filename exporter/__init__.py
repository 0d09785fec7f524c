"""facilitator-exporter: monitoring and analytics back end for x402 payment facilitators.

Payment events arrive over HTTP, are made durable in a SQLite ledger, exported as
Prometheus metrics and forwarded to a time-series store (InfluxDB or embedded DuckDB).
"""

from .app import create_app
from .config import Settings
from .events import Event, EventError, parse_event
from .ledger import GroupCommitter, Ledger
from .metrics import Metrics

__all__ = [
    "Event",
    "EventError",
    "GroupCommitter",
    "Ledger",
    "Metrics",
    "Settings",
    "create_app",
    "parse_event",
]
