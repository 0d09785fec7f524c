"""Opening the stores the settings select; each backend's modules load only when chosen.

The InfluxDB client and DuckDB are heavy imports: a DuckDB exporter never loads the
InfluxDB client, and the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..config import Settings, StoreKind
from ..records import Store


def open_store(settings: Settings, kind: StoreKind | None = None) -> Store:
    """Open the store ``kind`` (the first configured one by default); blocking, so call
    it before serving."""
    kind = kind if kind is not None else settings.resolved_store
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


async def close_stores(stores: list[Store]) -> None:
    """Close ``stores``, last opened first; one failing to close keeps no other open."""
    for store in reversed(stores):
        with contextlib.suppress(Exception):
            await store.close()


async def open_stores(settings: Settings) -> list[Store]:
    """Open every configured store, in the order ``EXPORTER_STORES`` lists them.

    A store that fails to open raises; the ones opened before it are closed first.
    """
    opened: list[Store] = []
    try:
        for kind in settings.resolved_stores:
            opened.append(await asyncio.to_thread(open_store, settings, kind))
    except BaseException:
        await close_stores(opened)
        raise
    return opened
