"""``query`` (one analytic, from a running exporter or the store itself) and ``flux``
(ad hoc Flux against the configured InfluxDB)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analytics import (
    ANALYTIC_NAMES,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    TIME_SERIES_METRICS,
    Analytics,
    AnalyticsRequestError,
    Window,
    WindowError,
    analytics_source,
    result_data,
)
from ..config import AnalyticsSourceKind, InfluxApi, Settings, StoreKind
from ..errors import DataDirError, ExporterError, OperatorError
from ..store import open_store
from .common import (
    DATA_DIR_FLAG,
    DATA_DIR_HELP,
    existing_data_dir,
    http_base_url,
    locked_data_dir,
    parse_instant,
    positive_float,
    positive_int,
    settings_from_args,
)
from .http_client import get_json
from .render import render_data, render_flux

if TYPE_CHECKING:
    from .common import Commands

DEFAULT_WINDOW = Window.H24.value
"""The window of ``query`` when ``--window`` is not given."""

DEFAULT_TIMEOUT_SECONDS = 60.0
"""How long ``query --url`` waits for the exporter's answer by default."""


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """One analytics question, as the HTTP API takes it."""

    name: str
    window: str
    at_ms: int | None
    limit: int
    metric: str


def takes_window(name: str) -> bool:
    """Whether analytic ``name`` is computed over a window (realtime has its own spans)."""
    return name != "realtime"


def takes_limit(name: str) -> bool:
    """Whether analytic ``name`` is a top list, cut to ``limit`` entries."""
    return name.startswith("top/")


def takes_metric(name: str) -> bool:
    """Whether analytic ``name`` is the time series of one metric."""
    return name == "timeseries"


def query_exporter(url: str, token: str | None, request: QueryRequest, timeout: float) -> object:
    """Ask a running exporter's ``GET /v1/analytics/{name}``; its JSON answer."""
    params: dict[str, str] = {}
    if takes_window(request.name):
        params["window"] = request.window
    if takes_limit(request.name):
        params["limit"] = str(request.limit)
    if takes_metric(request.name):
        params["metric"] = request.metric
    if request.at_ms is not None:
        params["at"] = str(request.at_ms)
    target = f"{url.rstrip('/')}/v1/analytics/{request.name}"
    if params:
        target += f"?{urllib.parse.urlencode(params)}"
    return get_json(target, token, timeout, "query")


def analytics_store_kind(settings: Settings) -> StoreKind:
    """The store the analytics are computed from (EXPORTER_ANALYTICS_SOURCE)."""
    if settings.resolved_analytics_source is AnalyticsSourceKind.FLUX:
        return StoreKind.INFLUXDB
    return StoreKind.DUCKDB


async def query_store(settings: Settings, request: QueryRequest) -> object:
    """Compute one analytic by opening the configured store (no exporter may hold it)."""
    try:
        window = Window.parse(request.window) if takes_window(request.name) else None
    except WindowError as error:
        raise OperatorError(f"query: {error}", 2) from None
    at_ms = request.at_ms if request.at_ms is not None else int(time.time() * 1000)
    # The embedded store's file is the exporter's while it runs; InfluxDB is shared.
    kind = analytics_store_kind(settings)
    embedded = kind is StoreKind.DUCKDB
    if embedded:  # reading never creates a data directory or an empty store
        existing_data_dir(settings, "query")
        if not settings.duckdb_path.exists():
            raise DataDirError(
                f"query: no store at {settings.duckdb_path}; check {DATA_DIR_FLAG} (the "
                "exporter creates it when it first starts)",
                2,
            )
    lock = locked_data_dir(settings, "query") if embedded else contextlib.nullcontext()
    with lock:
        try:
            store = await asyncio.to_thread(open_store, settings, kind)
        except ExporterError as error:
            raise OperatorError(f"query: cannot open the store: {error}") from None
        try:
            source = analytics_source(store, settings)
            if source is None:
                raise OperatorError(
                    f"query: no analytics for the {store.name} store"
                    + (
                        " over the v1 API (Flux runs on InfluxDB 2.x only)"
                        if settings.influx_api is InfluxApi.V1
                        else ""
                    )
                )
            try:
                result = await Analytics(source, settings.networks).compute(
                    request.name, window, at_ms, limit=request.limit, metric=request.metric
                )
            except AnalyticsRequestError as error:
                raise OperatorError(f"query: {error}", 2) from None
            finally:
                await source.close()
        finally:
            await store.close()
    return result_data(result)



async def run_flux(settings: Settings, flux: str) -> list[tuple[list[str], list[list[object]]]]:
    """Run ad hoc Flux on the configured InfluxDB; each result table's columns and rows."""
    if StoreKind.INFLUXDB not in settings.resolved_stores:
        raise OperatorError(
            f"flux: the configured store is {settings.resolved_store.value}, not InfluxDB; "
            "set EXPORTER_INFLUX_URL, EXPORTER_INFLUX_TOKEN and EXPORTER_INFLUX_ORG "
            "(or use `query` for the analytics of the embedded store)",
            2,
        )
    if settings.influx_api is InfluxApi.V1:
        raise OperatorError(
            "flux: Flux runs on InfluxDB 2.x only, and EXPORTER_INFLUX_API is v1; query "
            "InfluxDB 1.x with InfluxQL (its /query endpoint or the influx shell)",
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



def _refuse_ignored(args: argparse.Namespace) -> None:
    """Refuse an option that this query would accept and then ignore."""
    name = args.analytic
    ignored = [
        (args.window is not None and not takes_window(name), "--window", f"{name} has none"),
        (args.limit is not None and not takes_limit(name), "--limit", "only top lists take it"),
        (args.metric is not None and not takes_metric(name), "--metric", "only timeseries"),
        (args.url and args.data_dir, "--data-dir", "--url asks an exporter, not the store"),
        (not args.url and args.token, "--token", "it is for --url"),
        (not args.url and args.timeout is not None, "--timeout", "it is for --url"),
    ]
    for applies, option, why in ignored:
        if applies:
            raise OperatorError(f"query {name}: {option} does not apply ({why}); drop it", 2)


def _query(args: argparse.Namespace) -> int:
    _refuse_ignored(args)
    settings = settings_from_args(args)
    at = parse_instant(args.at, "--at") if args.at else None
    request = QueryRequest(
        args.analytic,
        args.window or DEFAULT_WINDOW,
        at,
        DEFAULT_LIMIT if args.limit is None else args.limit,
        args.metric or TIME_SERIES_METRICS[0],
    )
    if args.url:
        token = args.token or (
            settings.ingest_token.get_secret_value() if settings.ingest_token else None
        )
        timeout = DEFAULT_TIMEOUT_SECONDS if args.timeout is None else args.timeout
        data = query_exporter(http_base_url(args.url, "query"), token, request, timeout)
        sys.stderr.write(f"query: answered by the exporter at {args.url}\n")
    else:
        data = asyncio.run(query_store(settings, request))
        kind = analytics_store_kind(settings)
        where = (
            str(settings.duckdb_path)
            if kind is StoreKind.DUCKDB
            else f"{settings.influx_url} bucket {settings.influx_bucket}"
        )
        sys.stderr.write(
            f"query: computed from the {kind.value} store at {where} "
            "(no exporter holds the data directory)\n"
        )
    if takes_limit(request.name) and isinstance(data, list):
        data = data[: request.limit]
    sys.stdout.write(render_data(data, args.format))
    return 0


def _flux_source(args: argparse.Namespace) -> str:
    """The Flux text of the command line or of ``--file``."""
    if (args.query is None) == (args.file is None):
        raise OperatorError("flux: give either a query or --file, not both or neither", 2)
    if args.query is not None:
        return str(args.query)
    try:
        return Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise OperatorError(f"flux: cannot read --file {args.file}: {reason}", 2) from None


def _flux(args: argparse.Namespace) -> int:
    text = _flux_source(args)
    tables = asyncio.run(run_flux(settings_from_args(args), text))
    sys.stdout.write(render_flux(tables, args.format))
    return 0


def add_parser(commands: Commands) -> None:
    """Add ``query`` and ``flux`` to the command line."""
    query = commands.add_parser(
        "query",
        help="compute one analytic, as GET /v1/analytics/ANALYTIC answers it",
        description="Compute one analytic. With --url it asks a running exporter's "
        "GET /v1/analytics/ANALYTIC; without, it opens the configured store itself, which "
        "only works while no exporter holds the data directory. Stderr says which. An "
        "option the analytic does not take (--window for realtime, --limit for all but "
        "the top lists, --metric for all but timeseries) is refused.",
    )
    query.add_argument("analytic", choices=ANALYTIC_NAMES, help="the analytic to compute")
    query.add_argument(
        "--window",
        choices=[w.value for w in Window],
        help=f"window ending at --at (default {DEFAULT_WINDOW}; realtime has none)",
    )
    query.add_argument("--at", help="instant to compute as of: epoch ms or RFC 3339 (default now)")
    query.add_argument(
        "--limit",
        type=positive_int,
        help=f"entries of the top lists, 1..{MAX_LIMIT} (default {DEFAULT_LIMIT})",
    )
    query.add_argument(
        "--metric",
        choices=TIME_SERIES_METRICS,
        help=f"timeseries metric (default {TIME_SERIES_METRICS[0]})",
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
        "--timeout",
        type=positive_float,
        help=f"seconds to wait for --url (default {DEFAULT_TIMEOUT_SECONDS:g})",
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
