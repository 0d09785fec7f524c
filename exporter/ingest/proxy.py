"""Proxy mode: the exporter in front of an x402 facilitator, recording every verify and settle.

Every request is forwarded to the upstream facilitator and its status, headers and body
are returned unchanged; the exporter never changes a payment's outcome. From each
``/verify`` and ``/settle`` exchange it derives payment events (the mapping, identity and
decimals of :mod:`exporter.ingest.payments`, shared with the SDK hooks) and commits them
through the same ledger path as ``POST /v1/events``, after the answer has been sent, so
recording adds no latency and a recording failure is only counted. Where requests may go
is :mod:`exporter.ingest.upstream`'s business.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Histogram
from yarl import URL

from ..auth import bearer_token_matches
from ..errors import LedgerUnavailableError
from ..events import EventError, parse_event
from ..ledger import GroupCommitter, Outcome, PreparedEvent, Submission
from ..metrics import Metrics
from ..networks import NetworkTable
from .payments import (
    RECORDING_FAILURES,
    Exchange,
    PaymentEvents,
    decoded,
    error_outcome,
    parse_exchange,
    read_answer,
)
from .upstream import ForwardRefused, Upstream, end_to_end, read_bounded

log = logging.getLogger(__name__)

ENDPOINTS = ("verify", "settle", "supported", "other")
"""Every value of ``x402_facilitator_requests_total{endpoint}``."""

SCHEMES = ("exact", "upto")
"""Schemes named in the ``scheme`` label; any other is ``other``."""

REFUSALS = ("bad_target", "reserved_path", "too_large", "overloaded")
"""Every value of ``x402_proxy_refused_requests_total{reason}``."""

_REFUSAL_REASONS = {400: "bad_target", 404: "reserved_path", 413: "too_large"}


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """What one client can make the proxy hold: body sizes both ways and upstream slots."""

    max_request_bytes: int = 1024 * 1024
    max_response_bytes: int = 4 * 1024 * 1024
    max_concurrent_requests: int = 64


MAX_PENDING_RECORDINGS = 10_000
"""Recordings waiting for the ledger beyond which new ones are dropped (and counted)."""

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# Stages of a payment that this process has recorded (bit flags).
_RECEIVED, _VERIFIED, _SETTLED, _FAILED = 1, 2, 4, 8


class ProxyMetrics:
    """The proxy's metric families, registered on the app's registry."""

    def __init__(self, registry: CollectorRegistry, networks: NetworkTable) -> None:
        self.networks = networks
        self.requests = Counter(
            "x402_facilitator_requests",
            "Requests forwarded to the upstream facilitator, by endpoint and outcome "
            "(valid/invalid, settled/failed/pending, ok, client_error, upstream_error, "
            "timeout, unreachable); network and scheme as requested (other when not a known one).",
            ["endpoint", "outcome", "network", "scheme"],
            registry=registry,
        )
        self.duration = Histogram(
            "x402_facilitator_request_duration_seconds",
            "Upstream facilitator round trip as seen by the proxy, by endpoint.",
            ["endpoint"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.recording_failures = Counter(
            "x402_proxy_recording_failures",
            "Exchanges (or their events) the proxy could not record, by reason; the "
            "answer to the client went through unchanged.",
            ["reason"],
            registry=registry,
        )
        self.refused = Counter(
            "x402_proxy_refused_requests",
            "Requests the proxy answered itself without forwarding them, by reason: a target "
            "not in origin form or leaving the upstream's base path, a path of the exporter's "
            "own, a body over the limit, or every upstream slot in use.",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSALS:
            self.refused.labels(reason)
        for endpoint in ENDPOINTS:
            self.duration.labels(endpoint)
        for reason in RECORDING_FAILURES:
            self.recording_failures.labels(reason)

    def network_label(self, network: str | None) -> str:
        """A bounded ``network`` label value."""
        if network is None:
            return "unknown"
        return network if self.networks.is_known(network) else "other"

    def recording_failures_inc(self, reason: str) -> None:
        """Count one exchange (or event) that could not be recorded, by reason."""
        self.recording_failures.labels(reason).inc()


class FacilitatorProxy:
    """Forwards facilitator requests upstream and records the payments they carry."""

    def __init__(
        self,
        upstream: str,
        session: aiohttp.ClientSession,
        committer: GroupCommitter,
        metrics: Metrics,
        registry: CollectorRegistry,
        *,
        timeout_seconds: float,
        body_read_timeout_seconds: float = 30.0,
        fee_bps: int = 0,
        networks: NetworkTable | None = None,
        limits: ProxyLimits | None = None,
        reserved_paths: tuple[str, ...] = (),
        ingest_token: str | None = None,
    ) -> None:
        self.upstream = Upstream.parse(upstream)
        self.session = session
        self.committer = committer
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, sock_connect=min(timeout_seconds, 10.0)
        )
        self.body_read_timeout_seconds = body_read_timeout_seconds
        self.networks = networks or NetworkTable()
        self.limits = limits or ProxyLimits()
        self.reserved_paths = tuple(path.lower().rstrip("/") for path in reserved_paths)
        self.ingest_token = ingest_token
        self._slots = asyncio.Semaphore(self.limits.max_concurrent_requests)
        self.proxy_metrics = ProxyMetrics(registry, self.networks)
        self.payments = PaymentEvents(
            self.networks, fee_bps, self.proxy_metrics.recording_failures_inc
        )
        self.clock: Callable[[], float] = time.time
        """Wall clock (seconds) for event timestamps; replaceable in tests."""
        self.timer: Callable[[], float] = time.perf_counter
        """Monotonic timer (seconds) for upstream latency; replaceable in tests."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward ``request`` upstream and answer with the upstream's answer, unchanged.

        Refused without forwarding anything: a target that is not origin form or leaves
        the upstream's base path (400), a path of the exporter's own (404), a body over
        the proxy's limit (413), and any request while every upstream slot is taken (503).
        """
        endpoint = _endpoint(request)
        try:
            url = self._target(request)
        except ForwardRefused as refused:
            self.proxy_metrics.refused.labels(_REFUSAL_REASONS[refused.status]).inc()
            return self._refusal(request, refused.status, str(refused))
        if self._slots.locked():
            self.proxy_metrics.refused.labels("overloaded").inc()
            return self._refusal(
                request,
                503,
                f"all {self.limits.max_concurrent_requests} upstream request slots are in use",
                {"Retry-After": "1"},
            )
        async with self._slots:
            return await self._forward(request, endpoint, url)

    def _target(self, request: web.Request) -> URL:
        path = request.path.lower().rstrip("/")
        if any(path == p or path.startswith(p + "/") for p in self.reserved_paths):
            raise ForwardRefused(404, f"{request.path} belongs to the exporter, not the upstream")
        declared = request.content_length
        if declared is not None and declared > self.limits.max_request_bytes:
            limit = self.limits.max_request_bytes
            raise ForwardRefused(413, _too_large("request body", limit))
        return self.upstream.target(request.raw_path)

    def _refusal(
        self,
        request: web.Request,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        log.warning(
            "proxy request refused",
            extra={"status": status, "reason": message, "path": request.path},
        )
        return web.json_response(
            {"error": message, "upstream": self.upstream.shown, "endpoint": request.path},
            status=status,
            headers={"Connection": "close", **(headers or {})},
        )

    def _outgoing_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = end_to_end(request.headers.items())
        presented = headers.get("Authorization")
        if self.upstream.authorization is not None:
            headers["Authorization"] = self.upstream.authorization
        elif self.ingest_token and bearer_token_matches(presented, self.ingest_token):
            del headers["Authorization"]  # the exporter's own token never leaves it
        return headers

    async def _forward(self, request: web.Request, endpoint: str, url: URL) -> web.Response:
        received_ms = int(self.clock() * 1000)
        try:
            # aiohttp has no timeout on a body once the handler runs (as on ingest).
            async with asyncio.timeout(self.body_read_timeout_seconds):
                body = await read_bounded(request.content, self.limits.max_request_bytes)
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_read_timeout_seconds:g} s"
            return self._refusal(request, 408, message)
        if body is None:
            self.proxy_metrics.refused.labels("too_large").inc()
            message = _too_large("request body", self.limits.max_request_bytes)
            return self._refusal(request, 413, message)
        started = self.timer()
        try:
            async with self.session.request(
                request.method,
                url,
                headers=self._outgoing_headers(request),
                data=body if body else None,
                allow_redirects=False,
                timeout=self.timeout,
                skip_auto_headers=_NO_AUTO_HEADERS,
            ) as upstream:
                declared = upstream.content_length
                too_large = declared is not None and declared > self.limits.max_response_bytes
                payload = (
                    None
                    if too_large
                    else await read_bounded(upstream.content, self.limits.max_response_bytes)
                )
                status = upstream.status
                headers = end_to_end(upstream.headers.items())
        except TimeoutError:
            message = f"the upstream facilitator did not answer within {self.timeout.total:g} s"
            return self._gateway_error(request, endpoint, body, started, 504, "timeout", message)
        except aiohttp.ClientError as error:
            message = f"the upstream facilitator is unreachable: {type(error).__name__}: {error}"
            return self._gateway_error(
                request, endpoint, body, started, 502, "unreachable", message
            )
        if payload is None:
            message = _too_large("upstream answer", self.limits.max_response_bytes)
            return self._gateway_error(
                request, endpoint, body, started, 502, "upstream_error", message
            )
        elapsed = self.timer() - started
        response = web.Response(status=status, body=payload, headers=headers)
        try:
            self._observe(endpoint, body, request, status, headers, payload, elapsed, received_ms)
        except Exception:  # recording never changes the answer
            self.proxy_metrics.recording_failures.labels("internal_error").inc()
            log.exception("proxy exchange not recorded", extra={"endpoint": endpoint})
        return response

    def _gateway_error(
        self,
        request: web.Request,
        endpoint: str,
        body: bytes,
        started: float,
        status: int,
        outcome: str,
        message: str,
    ) -> web.Response:
        elapsed = self.timer() - started
        try:
            exchange = self._exchange(endpoint, body, request) if endpoint in _PAYMENT else None
            self._count(endpoint, outcome, exchange, elapsed)
        except Exception:  # counting never changes the answer
            self.proxy_metrics.recording_failures.labels("internal_error").inc()
            log.exception("proxy exchange not counted", extra={"endpoint": endpoint})
        log.warning(
            "upstream facilitator request failed",
            extra={"endpoint": endpoint, "outcome": outcome, "upstream": self.upstream.shown},
        )
        return web.json_response(
            {"error": message, "upstream": self.upstream.shown, "endpoint": request.path},
            status=status,
        )

    def _observe(
        self,
        endpoint: str,
        body: bytes,
        request: web.Request,
        status: int,
        headers: CIMultiDict[str],
        payload: bytes,
        elapsed: float,
        received_ms: int,
    ) -> None:
        if endpoint not in _PAYMENT:
            outcome = "ok" if status < 400 else error_outcome(status)
            self._count(endpoint, outcome, None, elapsed)
            return
        exchange = self._exchange(endpoint, body, request)
        try:
            answer_body = decoded(payload, headers.get("Content-Encoding"))
        except (ValueError, zlib.error):
            answer_body = b""
        answer = read_answer(endpoint, status, answer_body)
        self._count(endpoint, answer.outcome, exchange, elapsed)
        if exchange is None:
            if answer.outcome in ("valid", "invalid", "settled", "failed"):
                self.proxy_metrics.recording_failures_inc("unparseable")
            return
        now_ms = int(self.clock() * 1000)
        latency_ms = round(elapsed * 1000, 3)
        events = self.payments.events(exchange, answer, latency_ms, received_ms, now_ms)
        pid = exchange.payment_id
        # A settle answered as not final: the ledger keeps the payment pending, to end it
        # as failed past EXPORTER_SETTLEMENT_TIMEOUT_SECONDS unless a later answer does.
        pending = []
        if answer.outcome == "pending" and pid and self.payments.recorded(pid):
            pending.append(pid)
        if events or pending:
            self._record(events, pending)

    def _count(
        self, endpoint: str, outcome: str, exchange: Exchange | None, elapsed: float
    ) -> None:
        pm = self.proxy_metrics
        network = pm.network_label(exchange.network if exchange else None)
        if exchange is not None and exchange.network is None and exchange.raw_network:
            network = "other"
        scheme = "unknown"
        if exchange is not None and exchange.scheme is not None:
            scheme = exchange.scheme if exchange.scheme in SCHEMES else "other"
        pm.requests.labels(endpoint, outcome, network, scheme).inc()
        pm.duration.labels(endpoint).observe(elapsed)

    def _exchange(self, endpoint: str, body: bytes, request: web.Request) -> Exchange | None:
        try:
            raw = decoded(body, request.headers.get("Content-Encoding"))
        except (ValueError, zlib.error):
            return None
        return parse_exchange(raw, self.networks)

    def _record(self, events: list[dict[str, Any]], pending: list[str]) -> None:
        if len(self._tasks) >= MAX_PENDING_RECORDINGS:
            self.proxy_metrics.recording_failures.labels("overloaded").inc()
            self.payments.forget(events)
            return
        task = asyncio.create_task(self._commit(events, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, events: list[dict[str, Any]], pending: list[str]) -> None:
        failures = self.proxy_metrics.recording_failures
        # Derived: a replayed exchange, or one after a restart that finds its payment
        # in the ledger, records nothing new and leaves no conflict (the memo of
        # recorded stages does not survive a restart; the ledger does).
        submission = Submission(pending_settlements=pending, derived=True)
        for obj in events:
            try:
                event = parse_event(obj)
            except EventError as error:
                failures.labels("invalid_event").inc()
                self.payments.forget([obj])
                log.warning(
                    "derived event is invalid",
                    extra={"event_type": obj["type"], "error": str(error)},
                )
                continue
            submission.events.append(PreparedEvent.of(event))
        if not submission.events and not pending:
            return
        try:
            result = await self.committer.submit(submission)
        except LedgerUnavailableError as error:
            failures.labels("ledger_unavailable").inc()
            self.payments.forget(events)
            log.error("proxy events not recorded", extra={"error": str(error)})
            return
        except Exception as error:  # recording never affects the proxy; count and go on
            failures.labels("internal_error").inc()
            self.payments.forget(events)
            log.exception("proxy events not recorded", extra={"error": repr(error)})
            return
        self.metrics.apply(result.effects)
        duplicates = sum(1 for o in result.outcomes if o is Outcome.DUPLICATE)
        conflicts = sum(1 for o in result.outcomes if o is Outcome.CONFLICT)
        if duplicates:
            self.metrics.events_duplicate.inc(duplicates)
        if conflicts:
            self.metrics.reject("conflict", conflicts)
            failures.labels("conflict").inc(conflicts)

    async def drain(self, within: float | None = None) -> None:
        """Wait until every recording started so far is committed (or ``within`` s pass)."""
        while self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=within)
            if pending:
                log.warning("proxy recordings abandoned", extra={"pending": len(pending)})
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return


PROXY = web.AppKey("proxy", FacilitatorProxy)
"""The app's :class:`FacilitatorProxy`, present in proxy mode."""


_PAYMENT = frozenset({"verify", "settle"})


def _endpoint(request: web.Request) -> str:
    path = request.path.rstrip("/")
    if request.method == "POST" and path in ("/verify", "/settle"):
        return path[1:]
    if request.method == "GET" and path == "/supported":
        return "supported"
    return "other"


def _too_large(what: str, limit: int) -> str:
    return f"the {what} is larger than {limit} bytes (the proxy's limit)"
