"""The facilitator hooks with the official x402 SDK's facilitator over the in-memory chain:
every case reported to a real exporter exactly once, through exporter restarts, a spool at
its bound and refused deliveries; and importing the hooks loads no server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import ExporterProcess, LabelSet, http_request
from conftest import free_port, wait_until
from hooks_helpers import (
    CASES,
    Outcome,
    chains_and_facilitator,
    expected_metrics,
    run_case,
    start_on,
)
from prometheus_client import CollectorRegistry

from exporter.hooks import HookAttachment, SenderLimits, attach_x402_facilitator

FAST = SenderLimits(idle_seconds=0.05, backoff_base=0.05, backoff_cap=0.5, request_timeout=5.0)
"""Sender pauses short enough for tests."""

pytestmark = pytest.mark.slow


@pytest.fixture
def port() -> int:
    """The exporter's port for the whole test."""
    return free_port()


@pytest.fixture
def exporter(tmp_path: Path, port: int) -> Iterator[ExporterProcess]:
    """An exporter on :func:`port`, killed at the end."""
    process = start_on(port, tmp_path / "data", tmp_path / "exporter.log")
    yield process
    process.kill()


def flat(samples: dict[LabelSet, float]) -> dict[tuple[str, ...], float]:
    """Samples keyed by their label values in label-name order, zeros left out."""
    return {
        tuple(value for _, value in sorted(key)): value for key, value in samples.items() if value
    }


def assert_counters(exporter: ExporterProcess, outcomes: list[Outcome]) -> None:
    """The exporter's payment counters and volume are exactly ``outcomes``, and it saw no
    duplicate and refused nothing."""
    payments, volume = expected_metrics(outcomes)
    assert flat(exporter.metric("facilitator_payments_total")) == payments
    got_volume = exporter.metric("facilitator_volume_usd_total")
    assert {k: Decimal(str(v)) for k, v in flat(got_volume).items()} == {
        (network,): amount for network, amount in volume.items()
    }
    assert flat(exporter.metric("exporter_events_duplicate_total")) == {}
    rejected = exporter.metric("exporter_events_rejected_total")
    assert sum(rejected.values()) == 0, rejected


def assert_analytics(exporter: ExporterProcess, outcomes: list[Outcome]) -> None:
    """The exporter's payment analytics of the last hour hold exactly ``outcomes``."""
    exporter.wait_caught_up()
    now = int(time.time() * 1000)
    status, body = http_request(f"{exporter.url}/v1/analytics/payments?window=1h&at={now}")
    assert status == 200, body
    totals = json.loads(body)
    _, volume = expected_metrics(outcomes)
    assert totals["totalPayments"] == len(outcomes)
    assert totals["successfulPayments"] == sum(o.status == "success" for o in outcomes)
    assert totals["failedPayments"] == sum(o.status == "failed" for o in outcomes)
    assert Decimal(totals["totalVolume"]) == sum(volume.values(), Decimal(0))


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample of the hooks' registry (0 when absent)."""
    return registry.get_sample_value(name, labels) or 0.0


def attach(facilitator: Any, url: str, spool: Path, **options: Any) -> HookAttachment:
    """The hooks on ``facilitator``, with fast retries and a registry of their own."""
    return attach_x402_facilitator(
        facilitator,
        url=url,
        spool_dir=spool,
        registry=CollectorRegistry(),
        limits=FAST,
        **options,
    )


def test_importing_the_hooks_loads_no_server_scheduler_database_or_sdk() -> None:
    code = "import sys, json, exporter.hooks; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    assert "exporter.hooks" in loaded
    heavy = ("aiohttp", "apscheduler", "duckdb", "influxdb_client", "x402")
    assert not {m for m in loaded if m.partition(".")[0] in heavy}
    assert not {m for m in loaded if m.startswith(("exporter.app", "exporter.ledger"))}


async def test_every_case_reaches_the_exporter_once_through_a_restart(
    tmp_path: Path, port: int
) -> None:
    chains, facilitator = chains_and_facilitator()
    log_path = tmp_path / "exporter.log"
    exporter = start_on(port, tmp_path / "data", log_path)
    attachment = attach(facilitator, exporter.url, tmp_path / "spool")
    registry = attachment.registry
    outcomes: list[Outcome] = []
    try:
        for index, case in enumerate(CASES):
            outcomes.append(await run_case(facilitator, chains, case, index))
        wait_until(lambda: attachment.spool.undelivered() == 0, what="the first half delivered")
        exporter.terminate()  # the second half happens while the exporter is down
        for index, case in enumerate(CASES, start=len(CASES)):
            outcomes.append(await run_case(facilitator, chains, case, index))
        wait_until(
            lambda: value(
                registry, "x402_exporter_hook_delivery_errors_total", **{"class": "unreachable"}
            ),
            what="a failed delivery",
        )
        exporter = start_on(port, tmp_path / "data", log_path)
        assert await attachment.aclose(15.0)
        assert {o.status for o in outcomes} == {"success", "failed"}
        # a restarted exporter's counters start at zero: they hold the second half
        assert_counters(exporter, outcomes[len(CASES) :])
        assert_analytics(exporter, outcomes)
    finally:
        exporter.kill()
    assert value(registry, "x402_exporter_hook_dropped_total", reason="error") == 0
    assert value(registry, "x402_exporter_hook_dead_lettered_events_total") == 0
    assert value(registry, "x402_exporter_hook_delivery_lag_seconds") == 0
    delivered = value(registry, "x402_exporter_hook_delivered_events_total")
    assert delivered == sum(o.events for o in outcomes)
