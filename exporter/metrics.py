"""Prometheus metrics: the brief's payment metrics and the exporter's own health.

Everything registers on an injected :class:`CollectorRegistry`, never the global one,
so that tests and several apps in one process stay apart. Payment metrics move only on
ledger commits (:meth:`Metrics.apply`), which is what makes them count each
deduplicated event once, on the network its join resolved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .events import EVENT_TYPES, MICRO
from .ledger import (
    BatchGas,
    Effect,
    GaugeSnapshot,
    JoinTimeout,
    NewEvent,
    PendingChange,
    TerminalPayment,
    WebsocketCount,
)
from .networks import OTHER_NETWORK, UNKNOWN_NETWORK

log = logging.getLogger(__name__)

_Labelled = Counter | Gauge | Histogram

SETTLEMENT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60)
GAS_BUCKETS = (21000, 50000, 100000, 200000, 500000, 1000000)
EVENT_LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

MAX_NETWORK_LABELS = 64
"""Default bound on distinct ``network`` label values (``EXPORTER_MAX_NETWORK_LABELS``)."""

AUTH_ROUTES = ("ingest", "analytics")
"""Every value of ``exporter_auth_failures_total{route}``."""

AUTH_LOG_INTERVAL_SECONDS = 10.0
"""At most one log line per route this often for refused tokens."""

REJECT_REASONS = (
    "invalid",
    "conflict",
    "malformed",
    "too_large",
    "unsupported_media_type",
    "bad_signature",
)
"""Every value of ``exporter_events_rejected_total{reason}``."""

JOINED_TYPES = ("payment:verified", "payment:settled", "payment:failed", "batch:settled")
"""Event types that wait for a join partner: every value of
``exporter_join_timeouts_total{type}``."""


class Metrics:
    """The exporter's metric families, registered on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        max_network_labels: int = MAX_NETWORK_LABELS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self._clock = clock
        """Seconds on a monotonic clock: when refused tokens were last logged."""
        self._children: dict[tuple[_Labelled, tuple[str, ...]], Any] = {}
        self.payments = Counter(
            "facilitator_payments",
            "Terminal payments (settled = success, failed = failed) by network.",
            ["network", "status"],
            registry=registry,
        )
        self.volume = Counter(
            "facilitator_volume_usd",
            "Settled payment amount in USD by network.",
            ["network"],
            registry=registry,
        )
        self.fees = Counter(
            "facilitator_fees_usd",
            "Facilitator fees of settled payments in USD by network.",
            ["network"],
            registry=registry,
        )
        self.settlement = Histogram(
            "facilitator_settlement_duration_seconds",
            "Settlement time of settled payments by network.",
            ["network"],
            buckets=SETTLEMENT_BUCKETS,
            registry=registry,
        )
        self.gas = Histogram(
            "facilitator_gas_used",
            "Gas used per settled batch, on the network its batch:created named.",
            ["network"],
            buckets=GAS_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "facilitator_pending_payments",
            "Payments received and not yet settled or failed, by network.",
            ["network"],
            registry=registry,
        )
        self.websocket_clients = Gauge(
            "facilitator_active_websocket_clients",
            "The facilitator's connected WebSocket clients (latest websocket:clients event).",
            registry=registry,
        )
        self.events_received = Counter(
            "exporter_events_received",
            "Events committed to the ledger (duplicates excluded), by type.",
            ["type"],
            registry=registry,
        )
        self.events_rejected = Counter(
            "exporter_events_rejected",
            "Events or request bodies refused, by reason; kept as dead letters, except bodies "
            "whose signature was not verified.",
            ["reason"],
            registry=registry,
        )
        self.ingest_busy = Counter(
            "exporter_ingest_busy",
            "Ingest requests answered 503 before their body was read: the bodies already in "
            "flight held EXPORTER_MAX_INFLIGHT_BODY_BYTES.",
            registry=registry,
        )
        self.events_duplicate = Counter(
            "exporter_events_duplicate",
            "Events acknowledged as duplicates of ones already in the ledger.",
            registry=registry,
        )
        self.max_network_labels = max_network_labels
        self._network_labels: set[str] = set()
        self.network_labels_overflow = Counter(
            "exporter_network_labels_overflow",
            "Payment metric updates whose network was shown as other: more distinct "
            "networks than EXPORTER_MAX_NETWORK_LABELS were seen (the store keeps the "
            "true network).",
            registry=registry,
        )
        self.auth_failures = Counter(
            "exporter_auth_failures",
            "Requests refused for a missing or wrong bearer token, by route (ingest, analytics).",
            ["route"],
            registry=registry,
        )
        for route in AUTH_ROUTES:
            self.auth_failures.labels(route)
        self._auth_logged_at: dict[str, float] = {}
        self._auth_unlogged: dict[str, int] = {}
        self.backlog = Gauge(
            "exporter_ledger_backlog_events",
            "Store records committed to the ledger and not yet delivered to the store.",
            ["store"],
            registry=registry,
        )
        self.waiting = Gauge(
            "exporter_ledger_waiting_events",
            "Events in the ledger waiting for their join partner (a settled, verified or "
            "failed event for its payment:received, a batch:settled for its batch:created); "
            "each is released on its own after EXPORTER_JOIN_TIMEOUT_SECONDS.",
            registry=registry,
        )
        self.join_timeouts = Counter(
            "exporter_join_timeouts",
            "Events counted without their join partner, past EXPORTER_JOIN_TIMEOUT_SECONDS, "
            "by type.",
            ["type"],
            registry=registry,
        )
        for event_type in JOINED_TYPES:
            self.join_timeouts.labels(event_type)
        self.store_writes = Counter(
            "exporter_store_writes",
            "Successful store writes (batches).",
            ["store"],
            registry=registry,
        )
        self.store_records = Counter(
            "exporter_store_records_written",
            "Records delivered to the store.",
            ["store"],
            registry=registry,
        )
        self.store_write_errors = Counter(
            "exporter_store_write_errors",
            "Failed store writes; the records stay in the ledger and are retried.",
            ["store"],
            registry=registry,
        )
        self.store_write_duration = Histogram(
            "exporter_store_write_duration_seconds",
            "Duration of store writes.",
            ["store"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.store_last_success = Gauge(
            "exporter_store_last_success_timestamp_seconds",
            "Unix time of the last successful store write.",
            ["store"],
            registry=registry,
        )
        self.ledger_commits = Counter(
            "exporter_ledger_commits",
            "Ledger transactions; concurrent requests share one (group commit).",
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "exporter_event_loop_lag_seconds",
            "How much later than asked the event loop woke a periodic timer: the time "
            "it was held by work that did not yield (a slow commit, a large body).",
            buckets=EVENT_LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.dead_letter_truncated_bytes = Counter(
            "exporter_dead_letter_truncated_bytes",
            "Bytes of refused bodies not kept in their dead letters: past "
            "EXPORTER_DEAD_LETTER_MAX_BYTES only a body's head is stored.",
            registry=registry,
        )
        self.dead_letters_unstored = Counter(
            "exporter_dead_letters_unstored",
            "Refusals answered and counted but not stored as dead letters, by reason: "
            "EXPORTER_DEAD_LETTER_MAX_BYTES_PER_MINUTE was spent.",
            ["reason"],
            registry=registry,
        )
        for event_type in EVENT_TYPES:
            self.events_received.labels(event_type)
        for reason in REJECT_REASONS:
            self.events_rejected.labels(reason)
            self.dead_letters_unstored.labels(reason)

    def network_label(self, network: str) -> str:
        """The ``network`` label for ``network``: itself while fewer than
        ``max_network_labels`` networks have a label, else ``other`` (counted). Once a
        network has a label it keeps it for the life of the process."""
        if network in self._network_labels or network == UNKNOWN_NETWORK:
            return network
        if len(self._network_labels) < self.max_network_labels:
            self._network_labels.add(network)
            return network
        self.network_labels_overflow.inc()
        return OTHER_NETWORK

    def track_backlog(self, store: str, read_backlog: Callable[[], float]) -> None:
        """Read the ledger backlog of ``store`` (its ``store`` label) at scrape time."""
        self.backlog.labels(store).set_function(read_backlog)

    def track_waiting(self, read_waiting: Callable[[], float]) -> None:
        """Read the ledger's count of events waiting for their join partner at scrape time."""
        self.waiting.set_function(read_waiting)

    def restore(self, snapshot: GaugeSnapshot) -> None:
        """Set the gauges from the ledger after a restart."""
        pending: dict[str, int] = {}
        for network, count in snapshot.pending_by_network.items():
            label = self.network_label(network)
            pending[label] = pending.get(label, 0) + count
        for label, count in pending.items():
            self.pending.labels(label).set(count)
        if snapshot.websocket_clients is not None:
            self.websocket_clients.set(snapshot.websocket_clients)

    def apply(self, effects: Iterable[Effect]) -> None:
        """Move the payment metrics by what a ledger commit did.

        Counter and gauge moves are summed per series first and applied once each: a
        request of a thousand events makes thousands of effects but touches a few
        series, and every update takes the metric's lock. Money is summed in integer
        micro-units before it becomes a float.
        """
        events: dict[str, int] = {}
        payments: dict[tuple[str, str], int] = {}
        volume: dict[str, int] = {}
        fees: dict[str, int] = {}
        pending: dict[str, int] = {}
        settlements: dict[str, list[float]] = {}
        gas: list[tuple[str, int]] = []
        websocket_clients: int | None = None
        timeouts: dict[str, int] = {}
        labels: dict[str, str] = {}
        # About two effects per event: exact types (effects are never subclassed), the
        # most frequent first, and each network's label looked up once per call.
        for effect in effects:
            if type(effect) is NewEvent:
                event_type = effect.type
                events[event_type] = events.get(event_type, 0) + 1
            elif type(effect) is PendingChange:
                network = labels.get(effect.network) or self._label(labels, effect.network)
                pending[network] = pending.get(network, 0) + effect.delta
            elif type(effect) is TerminalPayment:
                network = labels.get(effect.network) or self._label(labels, effect.network)
                status = effect.status
                payments[network, status] = payments.get((network, status), 0) + 1
                if status == "success":
                    volume[network] = volume.get(network, 0) + effect.amount_micro
                    fees[network] = fees.get(network, 0) + effect.fee_micro
                    if effect.settlement_ms is not None:
                        settlements.setdefault(network, []).append(effect.settlement_ms / 1000)
            elif type(effect) is BatchGas:
                gas.append((self.network_label(effect.network), effect.gas_used))
            elif type(effect) is JoinTimeout:
                timeouts[effect.type] = timeouts.get(effect.type, 0) + 1
            elif type(effect) is WebsocketCount:
                websocket_clients = effect.count
        child = self._child
        for event_type, count in events.items():
            child(self.events_received, event_type).inc(count)
        for (network, status), count in payments.items():
            child(self.payments, network, status).inc(count)
        for network, micro in volume.items():
            child(self.volume, network).inc(micro / MICRO)
        for network, micro in fees.items():
            child(self.fees, network).inc(micro / MICRO)
        for network, delta in pending.items():
            child(self.pending, network).inc(delta)
        for network, seconds in settlements.items():
            observe = child(self.settlement, network).observe
            for value in seconds:
                observe(value)
        for network, gas_used in gas:
            child(self.gas, network).observe(gas_used)
        if websocket_clients is not None:
            self.websocket_clients.set(websocket_clients)
        for event_type, count in timeouts.items():
            self.join_timeouts.labels(event_type).inc(count)

    def _label(self, labels: dict[str, str], network: str) -> str:
        """:meth:`network_label` of ``network``, kept in ``labels``."""
        label = labels[network] = self.network_label(network)
        return label

    def _child(self, metric: _Labelled, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the lookup costs more than the update,
        and a request of a thousand events makes thousands of them."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def auth_failed(self, route: str, peer: str | None) -> None:
        """Count a refused bearer token and log it, at most one line per route every
        :data:`AUTH_LOG_INTERVAL_SECONDS` (a line carries the refusals it stands for), so a
        client guessing tokens cannot flood the log. The token itself is never logged."""
        self.auth_failures.labels(route).inc()
        self._auth_unlogged[route] = self._auth_unlogged.get(route, 0) + 1
        now = self._clock()
        last = self._auth_logged_at.get(route)
        if last is not None and now - last < AUTH_LOG_INTERVAL_SECONDS:
            return
        self._auth_logged_at[route] = now
        log.warning(
            "bearer token refused",
            extra={
                "route": route,
                "peer": peer or "unknown",
                "refusals": self._auth_unlogged.pop(route),
            },
        )

    def reject(self, reason: str, count: int = 1) -> None:
        """Count refused events (or whole bodies) by reason."""
        self.events_rejected.labels(reason).inc(count)
