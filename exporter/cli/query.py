"""``query`` (one analytic, from a running exporter or the store itself) and ``flux``
(ad hoc Flux against the configured InfluxDB)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analytics.models import Analytics, AnalyticsRequestError, Window, WindowError, result_data
from ..analytics.source import analytics_source
from ..config import Settings, StoreKind
from ..errors import ExporterError, OperatorError
from ..store import open_store
from .common import DATA_DIR_HELP, locked_data_dir, parse_instant, settings_from_args
from .http_client import QueryRequest, query_exporter
from .render import render_data, render_flux

if TYPE_CHECKING:
    from .common import Commands


async def query_store(settings: Settings, request: QueryRequest) -> object:
    """Compute one analytic by opening the configured store (no exporter may hold it)."""
    try:
        window = None if request.name == "realtime" else Window.parse(request.window)
    except WindowError as error:
        raise OperatorError(f"query: {error}", 2) from None
    at_ms = request.at_ms if request.at_ms is not None else int(time.time() * 1000)
    # The embedded store's file is the exporter's while it runs; InfluxDB is shared.
    embedded = settings.resolved_store is StoreKind.DUCKDB
    lock = locked_data_dir(settings, "query") if embedded else contextlib.nullcontext()
    with lock:
        try:
            store = await asyncio.to_thread(open_store, settings)
        except ExporterError as error:
            raise OperatorError(f"query: cannot open the store: {error}") from None
        try:
            source = analytics_source(store, settings)
            if source is None:
                raise OperatorError(f"query: no analytics for the {store.name} store")
            try:
                result = await Analytics(source).compute(
                    request.name, window, at_ms, limit=request.limit, metric=request.metric
                )
            except AnalyticsRequestError as error:
                raise OperatorError(f"query: {error}", 2) from None
            finally:
                close: Callable[[], Any] | None = getattr(source, "close", None)
                if close is not None:
                    await close()
        finally:
            await store.close()
    return result_data(result)



async def run_flux(settings: Settings, flux: str) -> list[tuple[list[str], list[list[object]]]]:
    """Run ad hoc Flux on the configured InfluxDB; each result table's columns and rows."""
    if settings.resolved_store is not StoreKind.INFLUXDB:
        raise OperatorError(
            f"flux: the configured store is {settings.resolved_store.value}, not InfluxDB; "
            "set EXPORTER_INFLUX_URL, EXPORTER_INFLUX_TOKEN and EXPORTER_INFLUX_ORG "
            "(or use `query` for the analytics of the embedded store)",
            2,
        )
    from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

    assert settings.influx_url and settings.influx_token and settings.influx_org
    client: Any = InfluxDBClientAsync(
        url=settings.influx_url,
        token=settings.influx_token.get_secret_value(),
        org=settings.influx_org,
        timeout=max(1, int(settings.influx_timeout_seconds * 1000)),
    )
    try:
        tables = await client.query_api().query(flux)
    except Exception as error:  # the client raises ApiException, aiohttp and OS errors
        status = getattr(error, "status", None)
        body = getattr(error, "body", None) or error
        detail = f"{status}: {body}" if status else f"{type(error).__name__}: {error}"
        raise OperatorError(f"flux: InfluxDB at {settings.influx_url} refused: {detail}") from None
    finally:
        await client.close()
    out: list[tuple[list[str], list[list[object]]]] = []
    for table in tables:
        columns = [c.label for c in table.columns if c.label not in ("result", "table")]
        rows = [[_flux_value(record.values.get(c)) for c in columns] for record in table.records]
        out.append((columns, rows))
    return out


def _flux_value(value: object) -> object:
    if isinstance(value, datetime.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value



def _query(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    at = parse_instant(args.at, "--at") if args.at else None
    request = QueryRequest(args.analytic, args.window, at, args.limit, args.metric)
    if args.url:
        token = args.token or (
            settings.ingest_token.get_secret_value() if settings.ingest_token else None
        )
        data = query_exporter(args.url, token, request, args.timeout)
        sys.stderr.write(f"query: answered by the exporter at {args.url}\n")
    else:
        data = asyncio.run(query_store(settings, request))
        where = (
            str(settings.duckdb_path)
            if settings.resolved_store is StoreKind.DUCKDB
            else f"{settings.influx_url} bucket {settings.influx_bucket}"
        )
        sys.stderr.write(
            f"query: computed from the {settings.resolved_store.value} store at {where} "
            "(no exporter holds the data directory)\n"
        )
    if isinstance(data, list):
        data = data[: args.limit]
    sys.stdout.write(render_data(data, args.format))
    return 0


def _flux(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.file is None):
        sys.stderr.write("flux: give either a query or --file, not both or neither\n")
        return 2
    text = args.query if args.query is not None else Path(args.file).read_text()
    tables = asyncio.run(run_flux(settings_from_args(args), text))
    sys.stdout.write(render_flux(tables, args.format))
    return 0


def add_parser(commands: Commands) -> None:
    """Add ``query`` and ``flux`` to the command line."""
    from ..analytics.models import (
        ANALYTIC_NAMES,
        DEFAULT_LIMIT,
        MAX_LIMIT,
        TIME_SERIES_METRICS,
        Window,
    )
    query = commands.add_parser(
        "query",
        help="compute one analytic (DESIGN section 5)",
        description="Compute one analytic. With --url it asks a running exporter's "
        "GET /v1/analytics/ANALYTIC; without, it opens the configured store itself, which "
        "only works while no exporter holds the data directory. Stderr says which.",
    )
    query.add_argument("analytic", choices=ANALYTIC_NAMES, help="the analytic to compute")
    query.add_argument(
        "--window",
        default="24h",
        choices=[w.value for w in Window],
        help="window ending at --at (default 24h; realtime has none)",
    )
    query.add_argument("--at", help="instant to compute as of: epoch ms or RFC 3339 (default now)")
    query.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"entries of the top lists, 1..{MAX_LIMIT} (default {DEFAULT_LIMIT})",
    )
    query.add_argument(
        "--metric",
        default="volume",
        choices=TIME_SERIES_METRICS,
        help="timeseries metric (default volume)",
    )
    query.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="aligned table (money right-aligned, 6 decimals), JSON as the API answers, or "
        "CSV (default table)",
    )
    query.add_argument("--url", help="base URL of a running exporter to ask instead of the store")
    query.add_argument(
        "--token", help="bearer token for --url (default EXPORTER_INGEST_TOKEN)"
    )
    query.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for --url (default 60)"
    )
    query.add_argument("--data-dir", help=DATA_DIR_HELP)
    query.set_defaults(run=_query)

    flux = commands.add_parser(
        "flux",
        help="run ad hoc Flux against the configured InfluxDB",
        description="Run a Flux query against the InfluxDB of EXPORTER_INFLUX_URL, "
        "EXPORTER_INFLUX_TOKEN and EXPORTER_INFLUX_ORG and print each result table. "
        "Exit 2 when the configured store is not InfluxDB.",
    )
    flux.add_argument(
        "query",
        nargs="?",
        help="the Flux source, e.g. 'from(bucket: \"payments\") |> range(start: -1h)'",
    )
    flux.add_argument("--file", help="read the Flux source from this file instead")
    flux.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="one aligned table per result table, JSON or CSV (default table)",
    )
    flux.set_defaults(run=_flux)
