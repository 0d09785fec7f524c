"""End to end with a real Prometheus: it scrapes the exporter and sees the known scenario.

Also lints the exposition with ``promtool check metrics``. Both tools come from Debian's
``prometheus`` package; the tests skip without them locally and fail without them in CI.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import (
    ExporterProcess,
    LabelSet,
    http_request,
    labels,
    post_json,
    running_exporter,
    try_get,
)
from conftest import BASE_MS, failed, free_port, received, require_tool, settled, wait_until

pytestmark = pytest.mark.slow

BASE, OPTIMISM = "eip155:8453", "eip155:10"
PROMETHEUS_TIMEOUT = 30.0
"""Seconds for Prometheus to start and scrape the exporter at least once."""


def scenario() -> list[dict[str, Any]]:
    """3 settled + 1 failed on Base, 2 settled + 1 pending on Optimism, 1 unknown failure."""
    events: list[dict[str, Any]] = []
    for n, amount in enumerate(("1.50", "2.25", "0.25")):
        events += [received(f"b{n}", amount=amount, network=BASE), settled(f"b{n}", fee="0.01")]
    events += [received("b-fail", network=BASE), failed("b-fail")]
    for n, amount in enumerate(("1.00", "1.50")):
        events += [received(f"o{n}", amount=amount, network=OPTIMISM), settled(f"o{n}")]
    events.append(received("o-pending", network=OPTIMISM))
    events.append(failed("unknown", BASE_MS + 3000, error="invalid_payload"))
    return events


EXPECTED_PAYMENTS = {
    (BASE, "success"): 3.0,
    (BASE, "failed"): 1.0,
    (OPTIMISM, "success"): 2.0,
    ("unknown", "failed"): 1.0,
}
EXPECTED_VOLUME = {BASE: 4.0, OPTIMISM: 2.5}


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[ExporterProcess]:
    """An exporter subprocess that has committed the :func:`scenario`."""
    with running_exporter(tmp_path / "data", tmp_path / "exporter.log") as process:
        events = scenario()
        status, answer = post_json(process.events_url, events)
        assert (status, answer) == (202, {"accepted": len(events), "duplicates": 0, "rejected": []})
        yield process


def write_prometheus_config(path: Path, target: str) -> None:
    """A prometheus.yml scraping ``target`` every second as job ``exporter``."""
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: exporter\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )


def instant_query(api: str, query: str) -> list[dict[str, Any]]:
    """The result vector of a PromQL instant query, or [] while Prometheus is not up."""
    answer = try_get(f"{api}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
    if answer is None or answer[0] != 200:
        return []
    body = json.loads(answer[1])
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def by_labels(result: list[dict[str, Any]]) -> dict[LabelSet, float]:
    """A query's result vector as label set -> value."""
    return {frozenset(s["metric"].items()): float(s["value"][1]) for s in result}


def test_prometheus_scrapes_payment_counters(tmp_path: Path, exporter: ExporterProcess) -> None:
    """Prometheus stores exactly the scenario's series, labelled by network and status."""
    prometheus = require_tool("prometheus")
    config = tmp_path / "prometheus.yml"
    target = f"127.0.0.1:{exporter.port}"
    write_prometheus_config(config, target)
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        expected_payments = {
            frozenset(
                {
                    ("__name__", "facilitator_payments_total"),
                    ("job", "exporter"),
                    ("instance", target),
                    ("network", network),
                    ("status", status),
                }
            ): value
            for (network, status), value in EXPECTED_PAYMENTS.items()
        }

        def payments_scraped() -> dict[LabelSet, float] | None:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            series = by_labels(instant_query(api, "facilitator_payments_total"))
            return series if len(series) >= len(expected_payments) else None

        payments = wait_until(
            payments_scraped,
            PROMETHEUS_TIMEOUT,
            0.2,
            "Prometheus to scrape facilitator_payments_total",
        )
        assert payments == expected_payments

        volume = by_labels(instant_query(api, "sum by (network) (facilitator_volume_usd_total)"))
        assert volume == {labels(network=n): v for n, v in EXPECTED_VOLUME.items()}
        pending = by_labels(instant_query(api, "facilitator_pending_payments > 0"))
        assert pending == {
            labels(
                __name__="facilitator_pending_payments",
                network=OPTIMISM,
                job="exporter",
                instance=target,
            ): 1.0
        }
        up = by_labels(instant_query(api, "up"))
        assert up == {labels(__name__="up", job="exporter", instance=target): 1.0}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_exposition_passes_promtool(exporter: ExporterProcess) -> None:
    """``promtool check metrics`` accepts the exporter's /metrics output."""
    promtool = require_tool("promtool")
    status, exposition = http_request(exporter.url + "/metrics")
    assert status == 200
    assert b"facilitator_payments_total{" in exposition
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
