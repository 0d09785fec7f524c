"""Helpers for tests of PromQL the project ships (dashboards, alert and recording rules):
which metric and label names the exporter really exposes, read from the code itself."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from exporter.analytics.scheduler import Scheduler
from exporter.metrics import Metrics
from exporter.store import StoreMetrics

ROOT = Path(__file__).resolve().parent.parent

PROM_IDENTIFIER = re.compile(r"\b(?:facilitator|exporter)_[a-z0-9_]+\b|\bup\b")
"""A metric name of the exporter (or Prometheus's own ``up``) inside a PromQL expression."""
_SELECTOR = re.compile(r"\b([a-z_:][a-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
SCRAPE_LABELS = frozenset({"job", "instance"})


@cache
def exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the exporter can expose -> its label names (from the code itself)."""
    registry = CollectorRegistry()
    owners: list[object] = [Metrics(registry), StoreMetrics.on(registry), Scheduler(registry, [])]
    names: dict[str, frozenset[str]] = {}
    for owner in owners:
        for metric in vars(owner).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = frozenset(metric._labelnames)
            assert metric._type is not None
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",),
            }[metric._type]
            for suffix in suffixes:
                extra = {"le"} if suffix == "_bucket" else set()
                names[metric._name + suffix] = labels | extra
    # The analytics gauges come from a custom collector that emits a family only once a result
    # is cached: read their names and labels from its source.
    source = (ROOT / "exporter" / "analytics" / "service.py").read_text(encoding="utf-8")
    families = re.findall(r'GaugeMetricFamily\(\s*"(\w+)",.*?labels=\[([^\]]*)\]', source, re.S)
    assert len(families) >= 5, "the analytics collector's families were not found"
    for name, labels in families:
        names[name] = frozenset(re.findall(r'"(\w+)"', labels))
    names["up"] = frozenset()
    return names


def unknown_metric_references(expr: str) -> list[str]:
    """Metric names and label names in a PromQL ``expr`` that the exporter never exposes."""
    known = exported_metrics()
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    problems = [f"metric {n}" for n in PROM_IDENTIFIER.findall(bare) if n not in known]
    used = [n for n in PROM_IDENTIFIER.findall(bare) if n in known]
    allowed = SCRAPE_LABELS.union(*(known[n] for n in used)) if used else SCRAPE_LABELS
    for metric, matchers in _SELECTOR.findall(expr):
        if metric in known:
            labels = set(_MATCHER.findall(matchers))
            problems += [f"label {metric}{{{n}}}" for n in labels - known[metric] - SCRAPE_LABELS]
    for group in _GROUPING.findall(bare):
        labels = {label.strip() for label in group.split(",") if label.strip()}
        problems += [f"grouping label {n}" for n in labels - allowed]
    return problems
