"""``serve``: run the exporter (optionally with demo traffic against itself)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .._logging import configure_logging
from ..app import SETTINGS, create_app
from ..errors import ConfigError, DataDirError, ExporterError, OperatorError
from .common import (
    DATA_DIR_FLAG,
    local_url,
    positive_float,
    settings_from_args,
    writable_data_dir,
)

if TYPE_CHECKING:
    from .common import Commands

log = logging.getLogger("exporter")

DEMO_RATE = 20.0
"""Payments per second that ``serve --demo`` generates."""


def _demo_context(rate: float) -> Any:
    @contextlib.asynccontextmanager
    async def demo(app: web.Application) -> AsyncIterator[None]:
        from .simulate_live import run_simulation

        settings = app[SETTINGS]
        url = local_url((settings.host, settings.port))
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


def _demo_rate(args: argparse.Namespace) -> float | None:
    """Payments per second of the demo traffic, None without ``--demo``; refuses a
    ``--demo-rate`` that would be ignored."""
    if not args.demo:
        if args.demo_rate is not None:
            raise ConfigError(
                "serve: --demo-rate applies only with --demo; add --demo or drop --demo-rate"
            )
        return None
    return DEMO_RATE if args.demo_rate is None else float(args.demo_rate)


PRIVATE_UMASK = 0o077
"""Files and directories the serving process creates are its user's alone (0600/0700)."""


def _serve(args: argparse.Namespace) -> int:
    demo_rate = _demo_rate(args)
    settings = settings_from_args(args)
    if demo_rate is not None and settings.port == 0:
        raise ConfigError(
            "serve: --demo needs a fixed port to send its traffic to, not port 0; "
            "set --listen or EXPORTER_LISTEN to host:port"
        )
    os.umask(PRIVATE_UMASK)
    writable_data_dir(settings, "serve")
    configure_logging(settings.log_level, settings.log_format.value)
    _limit_malloc_arenas()
    before, after = raise_open_file_limit()
    if after != before:
        log.info("open file limit raised", extra={"soft_before": before, "soft": after})
    extra = [_demo_context(demo_rate)] if demo_rate is not None else []
    app = create_app(settings, extra_contexts=extra)
    app.on_startup.append(_tune_garbage_collector)
    log.info(
        "starting",
        extra={
            "listen": settings.listen,
            "data_dir": str(settings.data_dir),
            "stores": ",".join(settings.sink_names),
            "analytics_source": settings.resolved_analytics_source.value,
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
        raise
    except OSError as error:
        log.error("cannot start", extra={"error": str(error)})
        if error.filename is not None:  # a file the exporter needs, not the address
            raise DataDirError(
                f"serve: cannot open {error.filename}: {error.strerror or error}; check the "
                f"data directory {settings.data_dir} (permissions, free space) or choose "
                f"another with {DATA_DIR_FLAG}"
            ) from None
        raise OperatorError(
            f"serve: cannot listen on {settings.listen}: {error.strerror or error}; stop what "
            "holds it or choose another address with --listen or EXPORTER_LISTEN"
        ) from None
    return 0


def add_parser(commands: Commands) -> None:
    """Add ``serve`` to the command line."""
    serve = commands.add_parser(
        "serve",
        help="run the exporter",
        description="Receive facilitator events on POST /v1/events, keep them in the "
        "ledger, deliver them to the store, and serve analytics and metrics. Exit 2 on a "
        "configuration error, 1 when the data directory, the address or the store cannot "
        "be used.",
    )
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
        type=positive_float,
        help=f"payments per second for --demo, above 0 (default {DEMO_RATE:g}); "
        "only with --demo",
    )
    serve.set_defaults(run=_serve)
