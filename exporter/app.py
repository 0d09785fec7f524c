"""The aiohttp application: routes, typed state, and one cleanup context per resource.

Resources start in dependency order (ledger, stores, forwarders) and stop in reverse, so
each forwarder drains into a still-open store and the ledger closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .addresses import host_name, is_loopback_name
from .analytics import Analytics, analytics_source
from .analytics.service import AnalyticsAPI, AnalyticsService, AnalyticsSink
from .config import AnalyticsSourceKind, Settings, StoreKind
from .errors import LedgerUnavailableError
from .ingest.proxy import PROXY, FacilitatorProxy, ProxyLimits
from .ingest.receiver import IngestLimits, Receiver, expect_within
from .ingest.signing import verifier_from_settings
from .ledger import DataDirLock, GroupCommitter, Ledger
from .metrics import Metrics
from .openapi import OPENAPI_PATH, openapi_json
from .records import Store
from .store import Forwarder, close_stores, open_stores

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
METRICS = web.AppKey("metrics", Metrics)
COMMITTER = web.AppKey("committer", GroupCommitter)
STORE = web.AppKey("store", Store)
"""The store the analytics read (the first configured one when analytics have none)."""
STORES = web.AppKey[tuple[Store, ...]]("stores")
"""Every store the ledger feeds, in the order EXPORTER_STORES lists them."""
FORWARDER = web.AppKey("forwarder", Forwarder)
"""The first store's forwarder."""
FORWARDERS = web.AppKey[tuple[Forwarder, ...]]("forwarders")
"""One forwarder per store, in the order of :data:`STORES`."""
RECEIVER = web.AppKey("receiver", Receiver)
ANALYTICS = web.AppKey("analytics", AnalyticsService)
ANALYTICS_API = web.AppKey("analytics_api", AnalyticsAPI)

INGEST_PATH = "/v1/events"
ANALYTICS_PATH = "/v1/analytics"
EXPORTER_PATHS = (INGEST_PATH, ANALYTICS_PATH, "/metrics", "/healthz", "/readyz", OPENAPI_PATH)
"""The exporter's own paths: in proxy mode, these and anything under them never reach the
upstream, whatever their case or trailing slash, so ingest credentials cannot leak there."""

MAINTENANCE_INTERVAL_SECONDS = 30.0
RETENTION_INTERVAL_SECONDS = 3600.0
LETTERS_PER_SLICE = 10_000
"""Dead letters deleted per retention transaction."""
DRAIN_SECONDS = 10.0
READY_COMMIT_MAX_AGE_SECONDS = 10.0
"""``/readyz`` reports the last commit's outcome; one older than this (or none) is
confirmed by one small write, shared by the probes that arrive meanwhile."""
EVENT_LOOP_LAG_INTERVAL_SECONDS = 0.25
"""How often ``exporter_event_loop_lag_seconds`` is sampled."""

CleanupContext = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def create_app(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    extra_contexts: list[CleanupContext] | None = None,
) -> web.Application:
    """Build the exporter application for ``settings``.

    ``registry`` defaults to a fresh one (never the process-global registry).
    ``extra_contexts`` run after the built-in resources, e.g. the demo traffic generator.
    """
    registry = registry if registry is not None else CollectorRegistry()
    app = web.Application(
        middlewares=[loopback_host_guard(settings)] if settings.listens_on_loopback else [],
        client_max_size=settings.max_body_bytes,
        handler_args={
            "auto_decompress": False,  # the receiver decodes gzip within limits
            # Starts at connect, so it also closes connections that never send a full head.
            "keepalive_timeout": settings.idle_timeout_seconds,
        },
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[METRICS] = Metrics(registry, settings.max_network_labels)
    app.cleanup_ctx.extend(
        [
            _event_loop_lag_context,
            _ledger_context,
            _store_context,
            _forwarder_context,
            _analytics_context,
        ]
    )
    if settings.upstream_facilitator is not None:
        app.cleanup_ctx.append(_proxy_context)
    app.cleanup_ctx.extend(extra_contexts or [])
    app.router.add_post(INGEST_PATH, _ingest, expect_handler=expect_within(settings.max_body_bytes))
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get(ANALYTICS_PATH + "/{name:.+}", _analytics)
    app.router.add_get(OPENAPI_PATH, _openapi_handler(settings))
    if settings.upstream_facilitator is not None:
        # A body announced over the proxy's limit is not invited with 100 Continue.
        within = expect_within(settings.proxy_max_request_bytes)
        app.router.add_post("/verify", _proxy, expect_handler=within)
        app.router.add_post("/settle", _proxy, expect_handler=within)
        app.router.add_get("/supported", _proxy)
        # any other path passes through
        app.router.add_route("*", "/{path:.*}", _proxy, expect_handler=within)
    return app


_HOST_VERDICTS_KEPT = 64


def loopback_host_guard(settings: Settings) -> Middleware:
    """Refuse requests to a loopback listener whose ``Host`` is not a loopback name.

    A web page can make a browser send requests to ``127.0.0.1`` under a name its
    attacker controls (DNS rebinding); such requests carry that name in ``Host``. Only
    ``localhost``, loopback addresses and ``EXPORTER_ALLOWED_HOSTS`` are answered.
    """
    allowed = frozenset(name.lower() for name in settings.allowed_hosts)
    # Verdicts by Host value: clients send one or two values, and parsing an address
    # literal costs more than the rest of the check. Bounded: every byte is the sender's.
    verdicts: dict[str, bool] = {}

    def answers_to(host: str) -> bool:
        verdict = verdicts.get(host)
        if verdict is None:
            name = host_name(host)
            verdict = name is not None and (name in allowed or is_loopback_name(name))
            if len(verdicts) < _HOST_VERDICTS_KEPT:
                verdicts[host] = verdict
        return verdict

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not answers_to(request.host):
            body: dict[str, object] = {
                "error": "this exporter listens on a loopback address and answers only to "
                "localhost and loopback Host names; add the name to EXPORTER_ALLOWED_HOSTS "
                "to allow it",
            }
            if request.path == INGEST_PATH:
                body = {"accepted": 0, "duplicates": 0, "rejected": [], **body}
            return web.json_response(body, status=421)
        return await handler(request)

    return guard


@contextlib.asynccontextmanager
async def _ledger_resource(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    lock = DataDirLock(settings.data_dir)
    try:
        ledger = await asyncio.to_thread(
            Ledger, settings.ledger_path, settings.durability, sinks=settings.sink_names
        )
    except BaseException:
        lock.release()
        raise
    metrics.restore(await asyncio.to_thread(ledger.gauges))
    for sink in ledger.sinks:
        metrics.track_backlog(sink, functools.partial(ledger.backlog_of, sink))
    metrics.track_waiting(ledger.waiting_events)
    committer = GroupCommitter(ledger, commit_on_loop=settings.ledger_commit_on_loop)
    committer.on_commit_hooks.append(metrics.ledger_commits.inc)
    app[COMMITTER] = committer
    token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
    limits = IngestLimits(
        settings.max_body_bytes,
        settings.max_batch_events,
        settings.max_backlog_events,
        settings.body_read_timeout_seconds,
        settings.max_inflight_body_bytes,
        settings.dead_letter_max_bytes,
        settings.dead_letter_max_bytes_per_minute,
    )
    app[RECEIVER] = Receiver(
        committer, metrics, limits, token, verifier_from_settings(settings), settings.networks
    )
    maintenance = asyncio.create_task(_maintain(settings, committer, metrics))
    log.info(
        "ledger open",
        extra={
            "path": str(settings.ledger_path),
            "backlog": ledger.backlog,
            "durability": settings.durability.value,
        },
    )
    try:
        yield
    finally:
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        await asyncio.to_thread(committer.close)
        await asyncio.to_thread(ledger.close)
        lock.release()
        log.info("ledger closed", extra={"path": str(settings.ledger_path)})


def _analytics_store(settings: Settings, stores: tuple[Store, ...]) -> Store:
    """The store the analytics source reads: the sink EXPORTER_ANALYTICS_SOURCE names."""
    wanted = (
        StoreKind.INFLUXDB
        if settings.resolved_analytics_source is AnalyticsSourceKind.FLUX
        else StoreKind.DUCKDB
    )
    return next((store for store in stores if store.name == wanted.value), stores[0])


@contextlib.asynccontextmanager
async def _store_resource(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    stores = tuple(await open_stores(settings))
    app[STORES] = stores
    app[STORE] = _analytics_store(settings, stores)
    for store in stores:
        where: dict[str, object] = {"store": store.name}
        if store.name == StoreKind.INFLUXDB.value:
            where.update(
                url=settings.influx_url, org=settings.influx_org, bucket=settings.influx_bucket
            )
        log.info("store open", extra=where)
    try:
        yield
    finally:
        await close_stores(list(stores))


@contextlib.asynccontextmanager
async def _forwarder_resource(app: web.Application) -> AsyncIterator[None]:
    committer = app[COMMITTER]
    settings = app[SETTINGS]
    forwarders = tuple(
        Forwarder(
            committer,
            store,
            app[METRICS],
            settings.store_batch_size,
            flush_interval_seconds=settings.store_flush_interval_seconds,
            sink=store.name,
        )
        for store in app[STORES]
    )
    app[FORWARDERS] = forwarders
    app[FORWARDER] = forwarders[0]
    for forwarder in forwarders:
        committer.on_commit_hooks.append(forwarder.wake)
        forwarder.start()
    try:
        yield
    finally:
        # Each drains for at most DRAIN_SECONDS, side by side.
        await asyncio.gather(*(forwarder.stop(DRAIN_SECONDS) for forwarder in forwarders))


@contextlib.asynccontextmanager
async def _analytics_resource(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    source = analytics_source(store, settings)
    if source is None:
        log.warning(
            "analytics are not computed: Flux needs the InfluxDB v2 API; add duckdb to "
            "EXPORTER_STORES to compute them here",
            extra={"store": store.name},
        )
        yield
        return
    service = AnalyticsService(
        Analytics(source, settings.networks),
        app[REGISTRY],
        store if isinstance(store, AnalyticsSink) else None,
        settings.analytics_refresh_seconds,
        settings.analytics_timeout_seconds,
    )
    token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
    app[ANALYTICS] = service
    app[ANALYTICS_API] = AnalyticsAPI(service, token, app[METRICS])
    service.start()
    try:
        yield
    finally:
        await service.stop()  # closes the source too


def _analytics_context(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _analytics_resource(app)


async def _analytics(request: web.Request) -> web.Response:
    api = request.app.get(ANALYTICS_API)
    if api is None:
        return web.json_response(
            {
                "error": f"analytics are not available for the {request.app[STORE].name} "
                "store (Flux needs the InfluxDB v2 API): add duckdb to EXPORTER_STORES"
            },
            status=503,
        )
    return await api.handle(request)


@contextlib.asynccontextmanager
async def _proxy_resource(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.upstream_facilitator is not None
    session = aiohttp.ClientSession(
        auto_decompress=False,  # bodies pass through as the upstream encoded them
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    proxy = FacilitatorProxy(
        settings.upstream_facilitator,
        session,
        app[COMMITTER],
        app[METRICS],
        app[REGISTRY],
        timeout_seconds=settings.upstream_timeout_seconds,
        body_read_timeout_seconds=settings.body_read_timeout_seconds,
        fee_bps=settings.proxy_fee_bps,
        networks=settings.networks,
        limits=ProxyLimits(
            settings.proxy_max_request_bytes,
            settings.proxy_max_response_bytes,
            settings.proxy_max_concurrent_requests,
        ),
        reserved_paths=EXPORTER_PATHS,
        ingest_token=settings.ingest_token.get_secret_value() if settings.ingest_token else None,
    )
    app[PROXY] = proxy
    log.info("proxy mode", extra={"upstream": proxy.upstream.shown})
    try:
        yield
    finally:
        await proxy.drain(DRAIN_SECONDS)
        await session.close()


def _proxy_context(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _proxy_resource(app)


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


async def _measure_event_loop_lag(metrics: Metrics, interval_seconds: float) -> None:
    """Observe, every ``interval_seconds``, how much later than asked the loop woke it."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_seconds
        await asyncio.sleep(interval_seconds)
        metrics.event_loop_lag.observe(max(0.0, loop.time() - due))


@contextlib.asynccontextmanager
async def _event_loop_lag_resource(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        _measure_event_loop_lag(app[METRICS], EVENT_LOOP_LAG_INTERVAL_SECONDS)
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _event_loop_lag_context(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _event_loop_lag_resource(app)


def _ledger_context(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _ledger_resource(app)


def _store_context(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _store_resource(app)


def _forwarder_context(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _forwarder_resource(app)


async def _maintain(settings: Settings, committer: GroupCommitter, metrics: Metrics) -> None:
    """Release events past the join timeout, end settlements past theirs and apply
    retention, periodically."""
    ledger = committer.ledger
    next_retention = next_letters = 0.0
    while True:
        try:
            cutoff_ms = int((time.time() - settings.join_timeout_seconds) * 1000)
            effects = await committer.call(
                functools.partial(ledger.release_unjoined, cutoff_ms)
            )
            metrics.apply(effects)
            effects = await committer.call(
                functools.partial(
                    ledger.release_overdue_settlements,
                    int(time.time() * 1000),
                    settings.settlement_timeout_seconds * 1000,
                )
            )
            metrics.apply(effects)
            if settings.retention_days and time.monotonic() >= next_retention:
                keep_ms = int((time.time() - settings.retention_days * 86400) * 1000)
                deleted = await committer.call(functools.partial(ledger.apply_retention, keep_ms))
                if deleted:
                    log.info("retention applied", extra={"deleted_events": deleted})
                next_retention = time.monotonic() + RETENTION_INTERVAL_SECONDS
            if settings.dead_letter_retention_days and time.monotonic() >= next_letters:
                keep_ms = int((time.time() - settings.dead_letter_retention_days * 86400) * 1000)
                expired = 0
                while True:  # in slices, so that ingest commits between them
                    deleted = await committer.call(
                        functools.partial(ledger.expire_dead_letters, keep_ms, LETTERS_PER_SLICE)
                    )
                    expired += deleted
                    if deleted < LETTERS_PER_SLICE:
                        break
                if expired:
                    log.info("dead letter retention applied", extra={"deleted": expired})
                next_letters = time.monotonic() + RETENTION_INTERVAL_SECONDS
        except LedgerUnavailableError as error:
            log.warning("ledger maintenance failed", extra={"error": str(error)})
        await asyncio.sleep(MAINTENANCE_INTERVAL_SECONDS)


async def _ingest(request: web.Request) -> web.Response:
    return await request.app[RECEIVER].handle(request)


def _openapi_handler(settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    body = openapi_json(
        auth=settings.ingest_token is not None,
        proxy=settings.upstream_facilitator is not None,
        signed=settings.ingest_signing_secret is not None,
    )

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    app = request.app
    committer = app[COMMITTER]
    forwarders = app[FORWARDERS]
    try:
        stats = await asyncio.to_thread(committer.ledger.stats)
        commit = await committer.last_outcome(READY_COMMIT_MAX_AGE_SECONDS)
    except Exception as error:  # the ledger is the one thing ingest depends on
        return web.json_response(
            {"status": "not ready", "ledger": {"error": f"{type(error).__name__}: {error}"}},
            status=503,
        )
    last_commit = {"at": commit.at, "ok": commit.ok, "error": commit.error}
    if not commit.ok:
        return web.json_response(
            {"status": "not ready", "ledger": {"error": commit.error, "lastCommit": last_commit}},
            status=503,
        )
    states = [_store_state(forwarder) for forwarder in forwarders]
    refusing = [forwarder.label for forwarder in forwarders if not forwarder.ready]
    body: dict[str, object] = {
        "status": "not ready" if refusing else "ready",
        "ledger": {
            "events": stats.events,
            "backlog": stats.backlog,
            "waitingForJoin": stats.waiting_for_join,
            "deadLetters": stats.dead_letters,
            "lastCommit": last_commit,
        },
        "store": states[0],
        "stores": states,
    }
    if refusing:
        # Ingest still works (events buffer in the ledger); the store needs an operator.
        body["reason"] = (
            f"the store {', '.join(refusing)} refuses the exporter's credentials; "
            "events are buffering"
        )
        return web.json_response(body, status=503)
    return web.json_response(body)


def _store_state(forwarder: Forwarder) -> dict[str, object]:
    """One store's delivery state as ``/readyz`` shows it."""
    state = forwarder.state()
    return {
        "name": state.name,
        "reachable": state.reachable,
        "authFailed": state.auth_failed,
        "backlog": state.backlog,
        "lagSeconds": state.lag_seconds,
        "lastSuccessfulWrite": state.last_success,
        "lastError": state.last_error,
        "errorClass": state.error_class,
        "consecutiveFailures": state.consecutive_failures,
    }
