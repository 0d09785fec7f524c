"""Choosing the analytics queries that fit a store: SQL on DuckDB, Flux on InfluxDB."""

from __future__ import annotations

from ..config import Settings
from ..records import Store
from .models import AnalyticsSource


def analytics_source(store: Store, settings: Settings) -> AnalyticsSource | None:
    """The analytics queries for ``store``: SQL on DuckDB, Flux on InfluxDB."""
    from ..store.duckdb import DuckDBStore

    if isinstance(store, DuckDBStore):
        from .duckdb import DuckDBAnalyticsSource

        return DuckDBAnalyticsSource(store)
    # Imported only here: the InfluxDB client and its dependencies hold about 13 MiB
    # that an exporter on the embedded store never uses.
    from ..store.influx.store import InfluxStore

    if isinstance(store, InfluxStore):
        from .flux import FluxAnalyticsSource

        assert settings.influx_url and settings.influx_token and settings.influx_org
        return FluxAnalyticsSource.connect(
            settings.influx_url,
            settings.influx_token.get_secret_value(),
            settings.influx_org,
            settings.influx_bucket,
            timeout_seconds=settings.influx_timeout_seconds,
        )
    return None
