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

        assert settings.influx_url
        token, password = settings.influx_token, settings.influx_password
        return InfluxStore(
            settings.influx_url,
            token.get_secret_value() if token else None,
            settings.influx_org,
            settings.influx_bucket,
            settings.influx_timeout_seconds,
            min(settings.store_batch_size, MAX_LINES_PER_WRITE),
            api=settings.influx_api.value,
            username=settings.influx_username,
            password=password.get_secret_value() if password else None,
            retention_policy=settings.influx_retention_policy,
        )
    raise ValueError(f"unsupported store {kind}")
