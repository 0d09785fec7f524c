"""The hooks' own metrics, on the registry the facilitator already serves.

Names start with ``x402_exporter_hook_`` so they sit apart from the facilitator's own
series and from the exporter's. Every labelled family is created with all its label
values at zero, so a dashboard shows a flat line rather than no data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

DROP_REASONS = ("spool_full", "too_large", "closed", "error")
"""Why a verify or settle answer was not spooled."""

UNRECORDED_REASONS = ("unparseable", "unknown_network", "unknown_asset")
"""Why a spooled answer yielded no event (the proxy's recording-failure reasons)."""

ERROR_CLASSES = ("unreachable", "timeout", "server", "throttled", "auth")
"""Classes of failed delivery attempts, each retried with backoff."""

ENDPOINTS = ("verify", "settle")


class HookMetrics:
    """Spooled, dropped, delivered and dead-lettered counts, delivery lag and spool size."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.spooled = Counter(
            "x402_exporter_hook_spooled",
            "Verify and settle answers the hooks appended to the spool, by endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.dropped = Counter(
            "x402_exporter_hook_dropped",
            "Verify and settle answers the hooks did not spool, by reason: the spool at its "
            "byte bound, one answer over the size bound, the attachment closed, an error.",
            ["reason"],
            registry=registry,
        )
        self.unrecorded = Counter(
            "x402_exporter_hook_unrecorded",
            "Spooled answers that yielded no event, by reason (as in proxy mode).",
            ["reason"],
            registry=registry,
        )
        self.delivered = Counter(
            "x402_exporter_hook_delivered_events",
            "Events the exporter acknowledged: accepted, or already stored (duplicate or "
            "conflict).",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "x402_exporter_hook_dead_lettered_events",
            "Events the exporter refused (4xx), kept in the spool's dead_letters table.",
            registry=registry,
        )
        self.delivery_errors = Counter(
            "x402_exporter_hook_delivery_errors",
            "Delivery attempts that failed and are retried, by class.",
            ["class"],
            registry=registry,
        )
        self.lag = Gauge(
            "x402_exporter_hook_delivery_lag_seconds",
            "Age of the oldest answer or event not yet delivered; 0 when none waits.",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "x402_exporter_hook_spool_bytes",
            "Bytes the spool holds: undelivered answers and events, and dead letters.",
            registry=registry,
        )
        for endpoint in ENDPOINTS:
            self.spooled.labels(endpoint)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for reason in UNRECORDED_REASONS:
            self.unrecorded.labels(reason)
        for error_class in ERROR_CLASSES:
            self.delivery_errors.labels(error_class)
