"""The ``facilitator-exporter`` command: serve, check-config, simulate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from ._logging import configure_logging
from .app import SETTINGS, create_app
from .config import Settings, StoreKind
from .ledger import LedgerError

if TYPE_CHECKING:
    from .store_influx import InfluxCheck

log = logging.getLogger("exporter")

DEMO_RATE = 20.0
"""Payments per second that ``serve --demo`` generates."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _describe_settings(settings: Settings) -> dict[str, Any]:
    described = settings.model_dump(mode="json")
    described["ingest_token"] = "(set)" if settings.ingest_token else None
    described["influx_token"] = "(set)" if settings.influx_token else None
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
    from .store_influx import InfluxStore
    from .stores import open_store

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
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_simulation(
                url, rate=rate, duration=0, seed=int(time.time()), token=token, stop=stop
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


async def _freeze_startup_objects(app: web.Application) -> None:
    # Everything allocated while starting (modules, models, schemas) lives as long as
    # the process; keeping it out of the collector's generations makes each collection
    # cheaper on the ingest path.
    gc.collect()
    gc.freeze()


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format.value)
    if args.demo and settings.port == 0:
        sys.stderr.write("facilitator-exporter: --demo needs a fixed port, not port 0\n")
        return 2
    extra = [_demo_context(args.demo_rate)] if args.demo else []
    app = create_app(settings, extra_contexts=extra)
    app.on_startup.append(_freeze_startup_objects)
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
    except LedgerError as error:
        log.error("cannot start", extra={"error": str(error)})
        sys.stderr.write(f"facilitator-exporter: {error}\n")
        return 1
    except RuntimeError as error:  # store locked or corrupt: say which file and why
        log.error("cannot start", extra={"error": str(error)})
        sys.stderr.write(f"facilitator-exporter: {error}\n")
        return 1
    except OSError as error:
        sys.stderr.write(f"facilitator-exporter: cannot listen on {settings.listen}: {error}\n")
        return 1
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import SimulationProgress, SimulationSummary, render_progress, run_simulation

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
            token=args.token,
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
    simulate.add_argument("--token", help="bearer token (the exporter's EXPORTER_INGEST_TOKEN)")
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
    except KeyboardInterrupt:
        return 130
    return code
