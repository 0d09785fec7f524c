"""Proxy mode: the exporter in front of an x402 facilitator, recording every verify and settle.

Every request is forwarded to the upstream facilitator and its status, headers and body
are returned unchanged; the exporter never changes a payment's outcome. From each
``/verify`` and ``/settle`` exchange it derives payment events (DESIGN section 2) and
commits them through the same ledger path as ``POST /v1/events``, after the answer has
been sent, so recording adds no latency and a recording failure is only counted.

The payment id is derived from the network and the EIP-3009 authorization nonce (or the
signed transaction for other payloads), so a verify and its settle join. Amounts are
converted from atomic units by the asset's decimals: 6 for the known USDC deployments,
else from ``EXPORTER_PROXY_ASSET_DECIMALS``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Histogram
from yarl import URL

from ..auth import bearer_token_matches
from ..errors import LedgerUnavailableError
from ..events import EventError, canonical_json, dedup_key, parse_event
from ..ledger import GroupCommitter, Outcome, PreparedEvent, Submission
from ..metrics import Metrics
from .upstream import ForwardRefused, Upstream, end_to_end, read_bounded

log = logging.getLogger(__name__)

V1_NETWORKS: dict[str, str] = {
    "ethereum": "eip155:1",
    "sepolia": "eip155:11155111",
    "abstract": "eip155:2741",
    "abstract-testnet": "eip155:11124",
    "base": "eip155:8453",
    "base-sepolia": "eip155:84532",
    "avalanche": "eip155:43114",
    "avalanche-fuji": "eip155:43113",
    "iotex": "eip155:4689",
    "sei": "eip155:1329",
    "sei-testnet": "eip155:1328",
    "polygon": "eip155:137",
    "polygon-amoy": "eip155:80002",
    "peaq": "eip155:3338",
    "story": "eip155:1514",
    "educhain": "eip155:41923",
    "skale-base-sepolia": "eip155:324705682",
    "solana": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
    "solana-devnet": "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
}
"""x402 version 1 network names and their CAIP-2 ids (the reference implementation's list)."""

USDC_DEPLOYMENTS: dict[str, str] = {
    "eip155:8453": "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
    "eip155:84532": "0x036cbd53842c5426634e7929541ec2318f3dcf7e",
    "eip155:43114": "0xb97ef9ef8734c71904d8002f8b6bc66dd9c48a6e",
    "eip155:43113": "0x5425890298aed601595a70ab815c96711a31bc65",
    "eip155:4689": "0xcdf79194c6c285077a58da47641d4dbe51f63542",
    "eip155:1329": "0xe15fc38f6d8c56af07bbcbe3baf5708a2bf42392",
    "eip155:1328": "0x4fcf1784b31630811181f670aea7a7bef803eaed",
    "eip155:137": "0x3c499c542cef5e3811e1192ce70d8cc03d5c3359",
    "eip155:80002": "0x41e94eb019c0762f9bfcf9fb1e58725bfb0e7582",
    "eip155:3338": "0xbba60da06c2c5424f03f7434542280fcad453d10",
    "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp": "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
    "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1": "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU",
}
"""USDC (6 decimals) by CAIP-2 network, as the x402 reference implementation lists them."""

USDC_DECIMALS = 6

ENDPOINTS = ("verify", "settle", "supported", "other")
"""Every value of ``x402_facilitator_requests_total{endpoint}``."""

SCHEMES = ("exact", "upto")
"""Schemes named in the ``scheme`` label; any other is ``other``."""

RECORDING_FAILURES = (
    "unparseable",
    "unknown_network",
    "unknown_asset",
    "invalid_event",
    "conflict",
    "ledger_unavailable",
    "overloaded",
    "internal_error",
)
"""Every value of ``x402_proxy_recording_failures_total{reason}``."""

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

SEEN_PAYMENTS = 100_000
"""Payment ids whose stages this process remembers, so each event is recorded once."""

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_EVM_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_CAIP2 = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")
_ATOMIC = re.compile(r"[0-9]{1,40}")

# Stages of a payment that this process has recorded (bit flags).
_RECEIVED, _VERIFIED, _SETTLED, _FAILED = 1, 2, 4, 8


class ProxyMetrics:
    """The proxy's metric families, registered on the app's registry."""

    def __init__(self, registry: CollectorRegistry, known_networks: frozenset[str]) -> None:
        self.known_networks = known_networks
        self.requests = Counter(
            "x402_facilitator_requests",
            "Requests forwarded to the upstream facilitator, by endpoint and outcome "
            "(valid/invalid, settled/failed, ok, client_error, upstream_error, timeout, "
            "unreachable); network and scheme as requested (other when not a known one).",
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
        return network if network in self.known_networks else "other"


@dataclass(frozen=True, slots=True)
class _Exchange:
    """What a verify or settle request says about its payment."""

    version: int | None
    scheme: str | None
    network: str | None  # CAIP-2, None when absent or not mappable
    raw_network: str | None
    payment_id: str | None
    payer: str | None
    payee: str | None
    asset: str | None
    atomic_amount: str | None


@dataclass(frozen=True, slots=True)
class _Answer:
    """The upstream's answer, reduced to what the events and metrics need."""

    outcome: str
    reason: str | None = None
    payer: str | None = None
    transaction: str | None = None


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
        asset_decimals: dict[str, int] | None = None,
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
        self.fee_bps = fee_bps
        self.asset_decimals = dict(asset_decimals or {})
        self.limits = limits or ProxyLimits()
        self.reserved_paths = tuple(path.lower().rstrip("/") for path in reserved_paths)
        self.ingest_token = ingest_token
        self._slots = asyncio.Semaphore(self.limits.max_concurrent_requests)
        configured = {key.rpartition("/")[0] for key in self.asset_decimals} - {""}
        known = frozenset(V1_NETWORKS.values()) | frozenset(USDC_DEPLOYMENTS) | configured
        self.proxy_metrics = ProxyMetrics(registry, known)
        self.clock: Callable[[], float] = time.time
        """Wall clock (seconds) for event timestamps; replaceable in tests."""
        self.timer: Callable[[], float] = time.perf_counter
        """Monotonic timer (seconds) for upstream latency; replaceable in tests."""
        self._seen: OrderedDict[str, int] = OrderedDict()
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
            message = (
                f"the request body did not arrive within {self.body_read_timeout_seconds:g} s"
            )
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
            outcome = "ok" if status < 400 else _error_outcome(status)
            self._count(endpoint, outcome, None, elapsed)
            return
        exchange = self._exchange(endpoint, body, request)
        answer = _read_answer(endpoint, status, headers, payload)
        self._count(endpoint, answer.outcome, exchange, elapsed)
        if answer.outcome not in ("valid", "invalid", "settled", "failed"):
            return  # no definitive answer: the payment's fate is unknown here
        if exchange is None:
            self.proxy_metrics.recording_failures.labels("unparseable").inc()
            return
        events = self._events(exchange, answer, elapsed, received_ms)
        if events:
            self._record(events)

    def _count(
        self, endpoint: str, outcome: str, exchange: _Exchange | None, elapsed: float
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

    def _exchange(self, endpoint: str, body: bytes, request: web.Request) -> _Exchange | None:
        try:
            return _parse_exchange(_decoded(body, request.headers.get("Content-Encoding")))
        except (ValueError, TypeError, KeyError, zlib.error, binascii.Error, RecursionError):
            return None

    def _decimals(self, network: str, asset: str) -> int | None:
        key = asset.lower() if asset.startswith("0x") else asset
        for candidate in (f"{network}/{key}", key):
            if candidate in self.asset_decimals:
                return self.asset_decimals[candidate]
        if USDC_DEPLOYMENTS.get(network) == key:
            return USDC_DECIMALS
        return None

    def _events(
        self, x: _Exchange, answer: _Answer, elapsed: float, received_ms: int
    ) -> list[dict[str, Any]]:
        failures = self.proxy_metrics.recording_failures
        if x.network is None:
            failures.labels("unknown_network").inc()
            return []
        if x.payment_id is None or x.asset is None or x.atomic_amount is None:
            failures.labels("unparseable").inc()
            return []
        decimals = self._decimals(x.network, x.asset)
        if decimals is None:
            failures.labels("unknown_asset").inc()
            log.info(
                "payment not recorded: asset decimals unknown",
                extra={"network": x.network, "asset": x.asset},
            )
            return []
        pid = x.payment_id
        done = self._seen.get(pid, 0)
        now_ms = max(int(self.clock() * 1000), received_ms)
        latency_ms = round(elapsed * 1000, 3)
        events: list[dict[str, Any]] = []
        stages = done
        if not done & _RECEIVED:
            amount = Decimal(x.atomic_amount).scaleb(-decimals)
            events.append(
                {
                    "type": "payment:received",
                    "data": {
                        "paymentId": pid,
                        "payer": x.payer or answer.payer or "unknown",
                        "payee": x.payee or "unknown",
                        "amount": _plain(amount),
                        "network": x.network,
                        "timestamp": received_ms,
                    },
                }
            )
            stages |= _RECEIVED
        terminal = done & (_SETTLED | _FAILED)
        if answer.outcome == "valid" and not done & _VERIFIED:
            events.append(
                {
                    "type": "payment:verified",
                    "data": {"paymentId": pid, "verificationTime": latency_ms, "timestamp": now_ms},
                }
            )
            stages |= _VERIFIED
        elif answer.outcome == "settled" and not done & _SETTLED:
            fee = (Decimal(x.atomic_amount) * self.fee_bps / 10_000).scaleb(-decimals)
            events.append(
                {
                    "type": "payment:settled",
                    "data": {
                        "paymentId": pid,
                        "transaction": answer.transaction or "",
                        "fee": _plain(fee),
                        "settlementTime": latency_ms,
                        "timestamp": now_ms,
                        "network": x.network,
                    },
                }
            )
            stages |= _SETTLED
        elif answer.outcome in ("invalid", "failed") and not terminal:
            events.append(
                {
                    "type": "payment:failed",
                    "data": {
                        "paymentId": pid,
                        "error": (answer.reason or f"{answer.outcome} without a reason")[:2048],
                        "timestamp": now_ms,
                        "network": x.network,
                    },
                }
            )
            stages |= _FAILED
        if stages != done:
            self._remember(pid, stages)
        return events

    def _remember(self, pid: str, stages: int) -> None:
        self._seen[pid] = stages
        self._seen.move_to_end(pid)
        while len(self._seen) > SEEN_PAYMENTS:
            self._seen.popitem(last=False)

    def _forget(self, pid: str, stages: int) -> None:
        if pid in self._seen:
            self._seen[pid] &= ~stages

    def _record(self, events: list[dict[str, Any]]) -> None:
        if len(self._tasks) >= MAX_PENDING_RECORDINGS:
            self.proxy_metrics.recording_failures.labels("overloaded").inc()
            pid = events[0]["data"]["paymentId"]
            self._forget(pid, _stages_of(events))
            return
        task = asyncio.create_task(self._commit(events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, events: list[dict[str, Any]]) -> None:
        failures = self.proxy_metrics.recording_failures
        pid = events[0]["data"]["paymentId"]
        submission = Submission()
        for obj in events:
            try:
                event = parse_event(obj)
            except EventError as error:
                failures.labels("invalid_event").inc()
                self._forget(pid, _stages_of([obj]))
                log.warning(
                    "derived event is invalid",
                    extra={"event_type": obj["type"], "error": str(error)},
                )
                continue
            body = canonical_json(event)
            submission.events.append(PreparedEvent(event, dedup_key(event, body), body, body))
        if not submission.events:
            return
        try:
            result = await self.committer.submit(submission)
        except LedgerUnavailableError as error:
            failures.labels("ledger_unavailable").inc()
            self._forget(pid, _stages_of(events))
            log.error("proxy events not recorded", extra={"error": str(error)})
            return
        except Exception as error:  # recording never affects the proxy; count and go on
            failures.labels("internal_error").inc()
            self._forget(pid, _stages_of(events))
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


def _error_outcome(status: int) -> str:
    return "client_error" if 400 <= status < 500 else "upstream_error"


def _decoded(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, detected
        decoded = decoder.decompress(body, 8 * 1024 * 1024)
        if decoder.unconsumed_tail:
            raise ValueError("body too large to inspect")
        return decoded
    raise ValueError(f"unsupported encoding {encoding!r}")


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _caip2(network: str | None) -> str | None:
    if network is None:
        return None
    if network in V1_NETWORKS:
        return V1_NETWORKS[network]
    return network if _CAIP2.fullmatch(network) else None


def _parse_exchange(raw: bytes) -> _Exchange:
    request = json.loads(raw)
    if not isinstance(request, dict):
        raise ValueError("not an object")
    payload = request.get("paymentPayload")
    header = request.get("paymentHeader")
    if payload is None and isinstance(header, str):  # early v1 clients send the header
        payload = json.loads(base64.b64decode(header, validate=True))
    requirements = request.get("paymentRequirements")
    if not isinstance(payload, dict) or not isinstance(requirements, dict):
        raise ValueError("paymentPayload and paymentRequirements are required")
    accepted = _object(payload.get("accepted"))
    version = request.get("x402Version", payload.get("x402Version"))
    scheme = _text(requirements.get("scheme")) or _text(accepted.get("scheme"))
    scheme = scheme or _text(payload.get("scheme"))
    raw_network = _text(requirements.get("network")) or _text(accepted.get("network"))
    raw_network = raw_network or _text(payload.get("network"))
    network = _caip2(raw_network)
    inner = _object(payload.get("payload"))
    authorization = _object(inner.get("authorization"))
    atomic = _text(requirements.get("amount")) or _text(requirements.get("maxAmountRequired"))
    atomic = atomic or _text(authorization.get("value"))
    if atomic is not None and not _ATOMIC.fullmatch(atomic):
        atomic = None
    return _Exchange(
        version=version if isinstance(version, int) else None,
        scheme=scheme,
        network=network,
        raw_network=raw_network,
        payment_id=_payment_id(network or raw_network, inner, authorization),
        payer=_text(authorization.get("from")),
        payee=_text(requirements.get("payTo")) or _text(accepted.get("payTo")),
        asset=_text(requirements.get("asset")) or _text(accepted.get("asset")),
        atomic_amount=atomic,
    )


def payment_id(network: str, nonce: str) -> str:
    """The payment id the proxy gives an EIP-3009 payment: ``network:nonce`` (lower case)."""
    return f"{network}:{nonce.lower()}"


def _payment_id(
    network: str | None, inner: dict[str, Any], authorization: dict[str, Any]
) -> str | None:
    if network is None:
        return None
    nonce = authorization.get("nonce")
    if isinstance(nonce, str) and _EVM_NONCE.fullmatch(nonce):
        return payment_id(network, nonce)
    if not inner:
        return None
    # Other payloads (e.g. a signed Solana transaction): the same bytes in verify and settle.
    digest = hashlib.sha256(
        json.dumps(inner, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return f"{network}:sha256-{digest[:40]}"


def _read_answer(endpoint: str, status: int, headers: Any, payload: bytes) -> _Answer:
    fallback = _Answer("ok" if status < 400 else _error_outcome(status))
    if status >= 500:
        return fallback
    try:
        answer = json.loads(_decoded(payload, headers.get("Content-Encoding")))
    except (ValueError, zlib.error, RecursionError):
        return fallback
    if not isinstance(answer, dict):
        return fallback
    if endpoint == "verify" and isinstance(answer.get("isValid"), bool):
        if answer["isValid"]:
            return _Answer("valid", payer=_text(answer.get("payer")))
        return _Answer(
            "invalid",
            _reason(answer.get("invalidReason"), answer.get("invalidMessage")),
            _text(answer.get("payer")),
        )
    if endpoint == "settle" and isinstance(answer.get("success"), bool):
        if answer["success"]:
            return _Answer(
                "settled",
                payer=_text(answer.get("payer")),
                transaction=_text(answer.get("transaction")),
            )
        return _Answer(
            "failed",
            _reason(answer.get("errorReason"), answer.get("errorMessage")),
            _text(answer.get("payer")),
        )
    return fallback


def _reason(reason: object, message: object) -> str | None:
    reason_text, message_text = _text(reason), _text(message)
    if reason_text and message_text:
        return f"{reason_text}: {message_text}"
    return reason_text or message_text


def _plain(value: Decimal) -> str:
    with localcontext() as context:
        context.prec = 100
        value = value.quantize(Decimal(1).scaleb(-18), rounding=ROUND_HALF_EVEN)
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _stages_of(events: list[dict[str, Any]]) -> int:
    flags = {
        "payment:received": _RECEIVED,
        "payment:verified": _VERIFIED,
        "payment:settled": _SETTLED,
        "payment:failed": _FAILED,
    }
    stages = 0
    for event in events:
        stages |= flags.get(event["type"], 0)
    return stages
