"""The network label is bounded: beyond EXPORTER_MAX_NETWORK_LABELS it reads ``other``, the
overflow is counted, and the store and the analytics keep every true network."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from conftest import AppClient, async_wait_until, received, settled
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.metrics import Metrics
from exporter.networks import OTHER_NETWORK


def test_a_network_keeps_its_label_and_the_bound_holds() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_network_labels=2)
    assert metrics.network_label("eip155:1") == "eip155:1"
    assert metrics.network_label("eip155:2") == "eip155:2"
    assert metrics.network_label("eip155:3") == OTHER_NETWORK
    assert metrics.network_label("eip155:1") == "eip155:1"
    assert metrics.network_label("unknown") == "unknown"  # never folded
    assert registry.get_sample_value("exporter_network_labels_overflow_total") == 1


async def test_payments_beyond_the_bound_count_as_other_and_analytics_keep_them(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    registry = CollectorRegistry()
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", max_network_labels=2)
    client = await aiohttp_client(create_app(settings, registry))
    now = int(time.time() * 1000)
    networks = ["eip155:1", "eip155:10", "eip155:137", "eip155:8453"]
    events = []
    for n, network in enumerate(networks):
        events += [received(f"p{n}", now - 60_000, network=network), settled(f"p{n}", now - 1000)]
    assert (await client.post("/v1/events", json=events)).status == 202
    ledger = client.app[COMMITTER].ledger

    async def drained() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(drained, what="store caught up")

    def payments(network: str) -> float:
        labels = {"network": network, "status": "success"}
        return registry.get_sample_value("facilitator_payments_total", labels) or 0

    assert [payments(n) for n in networks[:2]] == [1, 1]
    assert payments(OTHER_NETWORK) == 2
    assert payments("eip155:137") == payments("eip155:8453") == 0
    overflow = registry.get_sample_value("exporter_network_labels_overflow_total")
    assert overflow is not None and overflow >= 2
    answer = await client.get(f"/v1/analytics/networks?window=1h&at={now}")
    assert sorted(row["chainId"] for row in await answer.json()) == sorted(networks)
