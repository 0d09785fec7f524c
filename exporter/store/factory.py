"""Opening the store the settings select; each backend's modules load only when chosen.

The InfluxDB client and DuckDB are heavy imports: a DuckDB exporter never loads the
InfluxDB client, and the other way round.
"""

from __future__ import annotations

from ..config import Settings, StoreKind
from ..records import Store


def open_store(settings: Settings) -> Store:
    """Open the store the settings select (blocking; call before serving)."""
    kind = settings.resolved_store
    if kind is StoreKind.DUCKDB:
        from .duckdb import DuckDBStore

        return DuckDBStore.open(
            settings.duckdb_path, settings.duckdb_memory_limit, settings.duckdb_threads
        )
    if kind is StoreKind.INFLUXDB:
        from .influx.store import MAX_LINES_PER_WRITE, InfluxStore

        assert settings.influx_url and settings.influx_token and settings.influx_org
        return InfluxStore(
            settings.influx_url,
            settings.influx_token.get_secret_value(),
            settings.influx_org,
            settings.influx_bucket,
            settings.influx_timeout_seconds,
            min(settings.store_batch_size, MAX_LINES_PER_WRITE),
        )
    raise ValueError(f"unsupported store {kind}")
