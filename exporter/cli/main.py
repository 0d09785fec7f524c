"""The ``facilitator-exporter`` command: serve, check-config, simulate, and the operator
commands (replay, export, dead-letters, query, flux, backfill, recover) of
:mod:`exporter.cli.operator`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import SecretStr, ValidationError

from .._logging import configure_logging
from ..app import SETTINGS, create_app
from ..config import Settings, StoreKind, check_secret
from ..errors import ExporterError, OperatorError

if TYPE_CHECKING:
    from ..store.influx.store import InfluxCheck

log = logging.getLogger("exporter")

DEMO_RATE = 20.0
"""Payments per second that ``serve --demo`` generates."""

SIGNING_SECRET_VARIABLE = "EXPORTER_INGEST_SIGNING_SECRET"
"""Where ``simulate`` finds its signing secret when ``--signing-secret`` is not given."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "upstream_facilitator", None):
        overrides["upstream_facilitator"] = args.upstream_facilitator
    return Settings(**overrides)


def _describe_settings(settings: Settings) -> dict[str, Any]:
    described = settings.model_dump(mode="json")
    for name, value in settings:  # every secret, so that a new one cannot be printed
        if isinstance(value, SecretStr):
            described[name] = "(set)"
    described["ingest_signing"] = "on" if settings.ingest_signing_secret is not None else "off"
    described["resolved_store"] = settings.resolved_store.value
    described["ledger_path"] = str(settings.ledger_path)
    if settings.resolved_store is StoreKind.DUCKDB:
        described["duckdb_path"] = str(settings.duckdb_path)
    else:
        described["store_target"] = (
            f"influxdb at {settings.influx_url} "
            f"(org {settings.influx_org}, bucket {settings.influx_bucket})"
        )
    return described


def _config_error(error: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for detail in error.errors(include_url=False):
        name = "EXPORTER_" + "_".join(str(p) for p in detail["loc"]).upper()
        message = str(detail["msg"]).removeprefix("Value error, ")
        lines.append(f"  {name}: {message}" if detail["loc"] else f"  {message}")
    return "\n".join(lines)


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sys.stdout.write(json.dumps(_describe_settings(settings), indent=2) + "\n")
    sys.stdout.write("configuration is valid\n")
    if not getattr(args, "ping", False):
        return 0
    if settings.resolved_store is not StoreKind.INFLUXDB:
        sys.stdout.write(
            f"store {settings.resolved_store.value}: nothing to ping "
            f"(embedded file {settings.duckdb_path})\n"
        )
        return 0
    check = asyncio.run(_ping_influx(settings))
    where = f"influxdb {settings.influx_url}"
    if not check.reachable:
        sys.stdout.write(f"{where}: unreachable ({check.detail})\n")
        return 1
    sys.stdout.write(f"{where}: reachable (InfluxDB {check.version}); ")
    if check.credentials == "accepted":
        sys.stdout.write(
            f"token accepted for org {settings.influx_org}, bucket {settings.influx_bucket}\n"
        )
        return 0
    sys.stdout.write(f"credentials {check.credentials}: {check.detail}\n")
    return 1


async def _ping_influx(settings: Settings) -> InfluxCheck:
    from ..store import open_store
    from ..store.influx.store import InfluxStore

    store = open_store(settings)
    assert isinstance(store, InfluxStore)
    try:
        return await store.check()
    finally:
        await store.close()


def _demo_context(rate: float) -> Any:
    @contextlib.asynccontextmanager
    async def demo(app: web.Application) -> AsyncIterator[None]:
        from .simulate import run_simulation

        settings = app[SETTINGS]
        host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"
        token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
        secret = settings.ingest_signing_secret
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_simulation(
                url,
                rate=rate,
                duration=0,
                seed=int(time.time()),
                token=token,
                signing_secret=secret.get_secret_value() if secret is not None else None,
                stop=stop,
            )
        )
        log.info("demo traffic started", extra={"url": url, "payments_per_s": rate})
        try:
            yield
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, 5)
            except (TimeoutError, Exception) as error:  # the demo never blocks shutdown
                log.info("demo traffic stopped", extra={"detail": repr(error)})

    return demo


_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before any thread starts, unless MALLOC_ARENA_MAX is set.

    glibc gives each thread that allocates (the ledger writer, DuckDB and checkpoint
    workers) an arena of its own, and memory freed in one is not reused by another:
    under sustained ingest that held about 13 MB more at peak over a million events.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no arenas to cap)
        return
    mallopt(_M_ARENA_MAX, arenas)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; (old, new) soft limits.

    Each connection holds a descriptor until the idle timeout closes it, and the common
    soft default of 1024 lets a few hundred idle clients make ``accept`` fail for everyone
    (and the ledger's own files with it); the hard limit is what the operator granted.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, _OPEN_FILES_UNLIMITED)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # e.g. a hard limit above the kernel's nr_open
        return soft, soft
    return soft, target


_OPEN_FILES_UNLIMITED = 1 << 20
"""The soft limit taken when the hard one is unlimited (the kernel's default nr_open)."""


_GC_YOUNG_THRESHOLD = 50_000
"""Allocations between collections of the youngest generation (Python's default: 700).

Ingest allocates many short-lived containers (parsed events, rows, records) that
reference counting frees. At 700, a request of 1,000 events set off about 17
collections, every tenth of them also of the older generation, each walking the events
still in flight: 1.2 s of collector time over 200,000 batched events, against 0.3 s at
this threshold.
"""


async def _tune_garbage_collector(app: web.Application) -> None:
    # Everything allocated while starting (modules, models, schemas) lives as long as
    # the process; keeping it out of the collector's generations makes each collection
    # cheaper on the ingest path.
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format.value)
    if args.demo and settings.port == 0:
        sys.stderr.write("facilitator-exporter: --demo needs a fixed port, not port 0\n")
        return 2
    _limit_malloc_arenas()
    before, after = raise_open_file_limit()
    if after != before:
        log.info("open file limit raised", extra={"soft_before": before, "soft": after})
    extra = [_demo_context(args.demo_rate)] if args.demo else []
    app = create_app(settings, extra_contexts=extra)
    app.on_startup.append(_tune_garbage_collector)
    log.info(
        "starting",
        extra={
            "listen": settings.listen,
            "data_dir": str(settings.data_dir),
            "store": settings.resolved_store.value,
        },
    )
    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            print=lambda message: log.info("serving", extra={"listen": settings.listen}),
            access_log=None,
            shutdown_timeout=15.0,
        )
    except ExporterError as error:  # ledger, data dir or store: the message names which
        log.error("cannot start", extra={"error": str(error)})
        sys.stderr.write(f"facilitator-exporter: {error}\n")
        return error.exit_code
    except OSError as error:
        sys.stderr.write(f"facilitator-exporter: cannot listen on {settings.listen}: {error}\n")
        return 1
    return 0


def _signing_secret(args: argparse.Namespace) -> str | None:
    """The simulator's signing secret: ``--signing-secret``, else the exporter's variable."""
    if args.signing_secret is not None:
        name, value = "--signing-secret", args.signing_secret
    elif SIGNING_SECRET_VARIABLE in os.environ:
        name, value = SIGNING_SECRET_VARIABLE, os.environ[SIGNING_SECRET_VARIABLE]
    else:
        return None
    try:
        return check_secret(value)
    except ValueError as error:
        raise OperatorError(f"{name} {error}", exit_code=2) from None


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import SimulationProgress, SimulationSummary, render_progress, run_simulation

    signing_secret = _signing_secret(args)
    logging.basicConfig(level=logging.WARNING)
    tty = sys.stderr.isatty()
    last_draw = 0.0

    def progress(p: SimulationProgress) -> None:
        nonlocal last_draw
        now = time.monotonic()
        if now - last_draw < 0.2:
            return
        last_draw = now
        line = render_progress(p, args.duration or None)
        sys.stderr.write(("\r" + line) if tty else line + "\n")
        sys.stderr.flush()

    async def simulate() -> SimulationSummary:
        # Ctrl-C or SIGTERM ends the run cleanly, still printing the summary.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await run_simulation(
            args.url.rstrip("/"),
            rate=args.rate,
            duration=args.duration,
            seed=args.seed,
            token=args.token or os.environ.get("EXPORTER_INGEST_TOKEN") or None,
            signing_secret=signing_secret,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            progress=progress,
            stop=stop,
        )

    summary = asyncio.run(simulate())
    if tty:
        sys.stderr.write("\n")
    sys.stdout.write(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return 0 if summary.errors == 0 else 1


def _replay(args: argparse.Namespace) -> int:
    from .operator import replay

    logging.basicConfig(level=logging.WARNING)
    settings = _settings(args)
    summary = asyncio.run(
        replay(
            settings,
            [Path(p) for p in args.files],
            err=sys.stderr,
            deliver=not args.no_deliver,
            drain_seconds=args.drain_timeout,
        )
    )
    if summary.delivered_to is None:
        sys.stderr.write(
            "replay: committed to the ledger only; the exporter delivers the records to "
            "the store when it next starts\n"
        )
    elif summary.left_in_ledger:
        sys.stderr.write(
            f"replay: {summary.left_in_ledger} store records not yet delivered to "
            f"{summary.delivered_to}; the exporter delivers them when it next starts\n"
        )
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    return 1 if summary.rejected else 0


def _export(args: argparse.Namespace) -> int:
    from .operator import export, parse_instant

    settings = _settings(args)
    since = parse_instant(args.since, "--since") if args.since else None
    until = parse_instant(args.until, "--until") if args.until else None
    output = Path(args.output) if args.output else None
    count = export(settings, since, until, output, sys.stdout.buffer)
    sys.stderr.write(f"export: {count} events written to {output or 'stdout'}\n")
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    from .operator import dead_letters, render_table

    letters = dead_letters(_settings(args), args.reason, args.limit)
    if args.format == "json":
        sys.stdout.write(json.dumps(letters, indent=2) + "\n")
        return 0
    if not letters:
        sys.stderr.write("dead-letters: none\n")
        return 0
    width = args.width
    rows = [
        [
            d["id"],
            d["receivedAt"],
            d["reason"],
            d["key"],
            _clip(d["error"], width),
            _clip(d["raw"], width),
        ]
        for d in letters
    ]
    sys.stdout.write(render_table(["id", "received_at", "reason", "key", "error", "raw"], rows))
    return 0


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if width <= 0 or len(text) <= width else text[: max(1, width - 3)] + "..."


def _query(args: argparse.Namespace) -> int:
    from .operator import QueryRequest, parse_instant, query_exporter, query_store, render_data

    settings = _settings(args)
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
    from .operator import render_flux, run_flux

    if (args.query is None) == (args.file is None):
        sys.stderr.write("flux: give either a query or --file, not both or neither\n")
        return 2
    text = args.query if args.query is not None else Path(args.file).read_text()
    tables = asyncio.run(run_flux(_settings(args), text))
    sys.stdout.write(render_flux(tables, args.format))
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from .operator import backfill

    logging.basicConfig(level=logging.WARNING)
    settings = _settings(args)
    summary = asyncio.run(
        backfill(
            settings,
            StoreKind(args.to),
            err=sys.stderr,
            restart=args.restart,
            drain_seconds=args.drain_timeout,
        )
    )
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    if not summary.complete:
        sys.stderr.write(
            f"backfill: {summary.left_in_scratch} records not delivered to {args.to}; "
            "run the same command again to resume\n"
        )
        return 1
    return 0


def _recover(args: argparse.Namespace) -> int:
    from .operator import recover

    logging.basicConfig(level=logging.WARNING)
    settings = _settings(args)
    summary = asyncio.run(recover(settings, err=sys.stderr, drain_seconds=args.drain_timeout))
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    if summary.ledger_problem is None and summary.store_problem is None:
        sys.stderr.write("recover: the ledger and the store are intact; nothing to do\n")
        return 0
    if not summary.store_complete and settings.ledger_path.exists():
        sys.stderr.write(
            "recover: the store is not fully rebuilt (the exporter does not start until it "
            f"is); run `facilitator-exporter recover --data-dir {settings.data_dir}` again\n"
        )
    elif not summary.store_complete:
        sys.stderr.write("recover: there is no ledger to rebuild the store from\n")
    if (
        summary.unreadable_ranges
        or summary.unreadable_events
        or summary.unreadable_dead_letters
        or summary.unreadable_dead_letter_ranges
    ):
        sys.stderr.write(
            f"recover: {summary.salvaged_events} events salvaged, but the damaged ledger "
            "could not be read in full (see unreadableSeqRanges, "
            "unreadableDeadLetterIdRanges), so some may be lost; "
            f"the damaged file is kept as {summary.moved_aside[0]}\n"
        )
    if summary.retention_removed_before_seq is not None:
        sys.stderr.write(
            "recover: retention had deleted the ledger's events before sequence number "
            f"{summary.retention_removed_before_seq}; their records are not in the "
            "rebuilt store\n"
        )
    return 0 if summary.lossless else 1


def _add_operator_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    from ..analytics.models import (
        ANALYTIC_NAMES,
        DEFAULT_LIMIT,
        MAX_LIMIT,
        TIME_SERIES_METRICS,
        Window,
    )

    data_dir_help = "data directory holding the ledger and store (EXPORTER_DATA_DIR, data)"
    replay = commands.add_parser(
        "replay",
        help="ingest NDJSON event files through the ledger, as POST /v1/events does",
        description="Validate each line of the files like POST /v1/events, commit the events "
        "to the ledger (deduplicated: replaying twice changes nothing) and deliver the store "
        "records by running the forwarder until the outbox is drained. Needs the data "
        "directory to itself: refuses while an exporter runs on it. Progress (events/s, "
        "ETA) goes to stderr; the summary (accepted, duplicates, rejected by reason) to "
        "stdout as JSON. Bad lines are reported as FILE:LINE and skipped. Exit 1 when a "
        "line was rejected.",
    )
    replay.add_argument(
        "files", nargs="+", metavar="FILE", help="NDJSON files, plain or gzip (.ndjson.gz)"
    )
    replay.add_argument("--data-dir", help=data_dir_help)
    replay.add_argument(
        "--no-deliver",
        action="store_true",
        help="only commit to the ledger; the exporter delivers to the store on its next start "
        "(use when the store is unreachable now)",
    )
    replay.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to keep delivering to the store after the last line; what is left "
        "stays in the ledger for the next start (default 60)",
    )
    replay.set_defaults(run=_replay)

    export = commands.add_parser(
        "export",
        help="write the ledger's events as NDJSON that replay can ingest",
        description="Write the ledger's events in commit order, one canonical JSON event per "
        "line, re-ingestible by `replay`. Needs the data directory to itself.",
    )
    export.add_argument(
        "--since", help="first event timestamp to include (epoch ms or RFC 3339, inclusive)"
    )
    export.add_argument(
        "--until", help="event timestamp to stop before (epoch ms or RFC 3339, exclusive)"
    )
    export.add_argument(
        "--output", help="file to write; gzip when it ends in .gz (default stdout)"
    )
    export.add_argument("--data-dir", help=data_dir_help)
    export.set_defaults(run=_export)

    letters = commands.add_parser(
        "dead-letters",
        help="list rejected and conflicting events with their reasons",
        description="List the ledger's dead letters, newest first. Reads the ledger "
        "read-only, so it also works while an exporter runs.",
    )
    letters.add_argument(
        "--reason",
        help="only this reason: invalid, malformed, conflict, too_large, "
        "unsupported_media_type or store",
    )
    letters.add_argument(
        "--format", choices=("table", "json"), default="table", help="output (default table)"
    )
    letters.add_argument(
        "--limit", type=int, default=100, help="most dead letters to show (default 100)"
    )
    letters.add_argument(
        "--width",
        type=int,
        default=60,
        help="clip error and raw columns of the table to this width; 0 keeps them whole "
        "(default 60)",
    )
    letters.add_argument("--data-dir", help=data_dir_help)
    letters.set_defaults(run=_dead_letters)

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
    query.add_argument("--data-dir", help=data_dir_help)
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

    backfill = commands.add_parser(
        "backfill",
        help="re-deliver the ledger's history to a store (e.g. move to InfluxDB)",
        description="Derive the store records of every event in the ledger again and write "
        "them to the chosen store, with progress on stderr. Resumable: an interrupted run "
        "continues where it stopped when run again (files backfill-STORE.* in the data "
        "directory). Needs the data directory to itself. Exit 1 when not everything was "
        "delivered.",
    )
    backfill.add_argument(
        "--to",
        required=True,
        choices=(StoreKind.INFLUXDB.value, StoreKind.DUCKDB.value),
        help="target store: influxdb (EXPORTER_INFLUX_* settings) or duckdb "
        "(DATA_DIR/store.duckdb)",
    )
    backfill.add_argument(
        "--restart", action="store_true", help="discard a previous run's progress and start over"
    )
    backfill.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to keep delivering after the last event before giving up for this run "
        "(default 60)",
    )
    backfill.add_argument("--data-dir", help=data_dir_help)
    backfill.set_defaults(run=_backfill)

    recover = commands.add_parser(
        "recover",
        help="move a damaged ledger or store aside and rebuild it",
        description="Check the ledger (its size against its header, then SQLite's "
        "quick_check) and the embedded DuckDB store (size against header, every block's "
        "checksum). A damaged file is renamed NAME.damaged-<UTC time> (never deleted): "
        "every readable event and dead letter of a damaged ledger is committed to a new "
        "ledger, and a damaged store is rebuilt from the ledger's events. Each is built as "
        "NAME.recovering and renamed into place when complete; NAME.recover-pending keeps "
        "the exporter from starting until then, and a rerun finishes an interrupted run. "
        "A file that cannot be opened for another reason (disk full, locked, permissions) "
        "is left in place. Intact files are left alone. "
        "Needs the data directory to itself. The summary goes to stdout as JSON; exit 1 "
        "when something could not be salvaged or rebuilt.",
    )
    recover.add_argument("--data-dir", help=data_dir_help)
    recover.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to keep writing the rebuilt store after the last event (default 60)",
    )
    recover.set_defaults(run=_recover)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="facilitator-exporter",
        description="Monitoring and analytics back end for x402 payment facilitators. "
        "Settings come from EXPORTER_* environment variables; flags override them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the exporter")
    serve.add_argument("--listen", help="host:port to bind (EXPORTER_LISTEN, 127.0.0.1:9402)")
    serve.add_argument("--data-dir", help="ledger and store directory (EXPORTER_DATA_DIR)")
    serve.add_argument(
        "--upstream-facilitator",
        metavar="URL",
        help="proxy mode: forward /verify, /settle, /supported to this x402 facilitator and "
        "record every payment (EXPORTER_UPSTREAM_FACILITATOR)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also generate simulated payment traffic against this exporter",
    )
    serve.add_argument(
        "--demo-rate",
        type=float,
        default=DEMO_RATE,
        help=f"payments per second for --demo (default {DEMO_RATE:g})",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--listen", help="host:port to check instead of EXPORTER_LISTEN")
    check.add_argument("--data-dir", help="data directory to check instead of EXPORTER_DATA_DIR")
    check.add_argument(
        "--ping",
        action="store_true",
        help="also reach the configured InfluxDB and test its token, org and bucket "
        "(exit 1 when it cannot be reached or refuses them)",
    )
    check.set_defaults(run=_check_config)

    simulate = commands.add_parser(
        "simulate", help="send realistic simulated x402 traffic to a running exporter"
    )
    simulate.add_argument(
        "--url",
        default="http://127.0.0.1:9402",
        help="exporter base URL (default http://127.0.0.1:9402)",
    )
    simulate.add_argument(
        "--rate", type=float, default=50.0, help="payments per second (default 50)"
    )
    simulate.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds to run; 0 runs until interrupted (default 60)",
    )
    simulate.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    simulate.add_argument(
        "--token",
        help="bearer token (default EXPORTER_INGEST_TOKEN when set; prefer the variable, a "
        "command line is visible to other local users)",
    )
    simulate.add_argument(
        "--signing-secret",
        metavar="SECRET",
        help=f"sign every request with X-Exporter-Signature (default {SIGNING_SECRET_VARIABLE} "
        "when set; prefer the variable, a command line is visible to other local users)",
    )
    simulate.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="events per request; above 1 sends NDJSON (default 1)",
    )
    simulate.add_argument(
        "--concurrency", type=int, default=8, help="concurrent requests (default 8)"
    )
    simulate.set_defaults(run=_simulate)
    _add_operator_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``facilitator-exporter`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ValidationError as error:
        sys.stderr.write(_config_error(error) + "\n")
        return 2
    except ExporterError as error:
        sys.stderr.write(f"facilitator-exporter: {error}\n")
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return code
