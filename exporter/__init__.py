"""facilitator-exporter: monitoring and analytics back end for x402 payment facilitators.

Payment events arrive over HTTP, are made durable in a SQLite ledger, exported as
Prometheus metrics and forwarded to a time-series store (InfluxDB or embedded DuckDB).

The names below are loaded on first use, so that importing a light part of the package
(``exporter.events``, the facilitator hooks of ``exporter.hooks``) loads no web server,
scheduler or database.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app as create_app
    from .config import Settings as Settings
    from .events import Event as Event
    from .events import EventError as EventError
    from .events import parse_event as parse_event
    from .ledger import GroupCommitter as GroupCommitter
    from .ledger import Ledger as Ledger
    from .metrics import Metrics as Metrics

_HOMES = {
    "Event": ".events",
    "EventError": ".events",
    "GroupCommitter": ".ledger",
    "Ledger": ".ledger",
    "Metrics": ".metrics",
    "Settings": ".config",
    "create_app": ".app",
    "parse_event": ".events",
}

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


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
