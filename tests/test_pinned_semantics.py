"""Behaviours of the contract that a plausible one-token bug would break, each pinned through
the real app (receiver, ledger, embedded DuckDB store, analytics API) on a registry of the
test's own.

Each test names the bug it catches: a failure counted on its own ``data.network`` instead of
its payment's, a nearest-rank percentile one rank off where ``p * n`` is a multiple of 100, the
health status at exactly 10 % errors, the pending gauge set to a commit's delta instead of
moved by it, and an array of duplicates and invalid events acknowledged as if accepted.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from conftest import AppClient, async_wait_until, failed, received, settled
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER

BASE = "eip155:8453"
OP = "eip155:10"
MINUTE = 60_000


def payments(registry: CollectorRegistry, network: str, status: str) -> float | None:
    """``facilitator_payments_total{network, status}``, None when the series does not exist."""
    return registry.get_sample_value(
        "facilitator_payments_total", {"network": network, "status": status}
    )


def pending(registry: CollectorRegistry, network: str) -> float | None:
    """``facilitator_pending_payments{network}``."""
    return registry.get_sample_value("facilitator_pending_payments", {"network": network})


async def post(client: AppClient, body: object) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the ingest route; the status and the JSON answer."""
    response = await client.post("/v1/events", json=body)
    return response.status, await response.json()


async def ingest_and_drain(client: AppClient, events: list[dict[str, Any]]) -> None:
    """Ingest ``events`` (all accepted) and wait until the store holds every record."""
    status, answer = await post(client, events)
    assert (status, answer["accepted"]) == (202, len(events))
    ledger = client.app[COMMITTER].ledger

    async def drained() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(drained, what="the store caught up")


async def analytics(client: AppClient, name: str, at_ms: int) -> dict[str, Any]:
    """``GET /v1/analytics/{name}?window=1h&at=...``, answered on demand as of ``at_ms``."""
    response = await client.get(f"/v1/analytics/{name}?window=1h&at={at_ms}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


# ------------------------------------------------------------------ joined failures


async def test_a_joined_failure_counts_on_its_payments_network(
    client: AppClient, registry: CollectorRegistry
) -> None:
    """Bug caught: the failure counted on the network its own ``data`` names."""
    now = int(time.time() * 1000)
    assert (await post(client, received("p", now, network=BASE)))[0] == 202
    assert (await post(client, failed("p", now + 1, network=OP)))[0] == 202
    assert payments(registry, BASE, "failed") == 1
    assert payments(registry, OP, "failed") is None
    assert pending(registry, BASE) == 0


async def test_a_failure_before_its_payment_counts_once_when_the_payment_arrives(
    client: AppClient, registry: CollectorRegistry
) -> None:
    """The failure waits for its ``payment:received`` (well within the join timeout), then
    counts once, on the payment's network; a repeated receipt changes nothing."""
    now = int(time.time() * 1000)
    assert (await post(client, failed("p", now + 1, network=OP)))[0] == 202
    for network in (BASE, OP, "unknown"):
        assert payments(registry, network, "failed") is None
    assert (await post(client, received("p", now, network=BASE)))[0] == 202
    assert payments(registry, BASE, "failed") == 1
    assert payments(registry, OP, "failed") is None
    assert pending(registry, BASE) == 0
    status, answer = await post(client, received("p", now, network=BASE))
    assert (status, answer["duplicates"]) == (202, 1)
    assert payments(registry, BASE, "failed") == 1
    assert pending(registry, BASE) == 0


# ------------------------------------------------------------------ percentiles


@pytest.mark.parametrize(
    ("n", "p95", "p99"),
    [
        (20, 19_000, 20_000),  # 0.95 * 20 = 19 exactly: sorted[18]
        (100, 95_000, 99_000),  # 0.99 * 100 = 99 exactly: sorted[98]
    ],
)
async def test_nearest_rank_percentiles_at_exact_multiples(
    client: AppClient, n: int, p95: int, p99: int
) -> None:
    """Settlement times 1 s .. n s (ingested shuffled): p95 and p99 are ``sorted[ceil(p/100 *
    n) - 1]``. Bug caught: the rank one off where ``p * n`` is a multiple of 100."""
    now = int(time.time() * 1000)
    seconds = list(range(1, n + 1))
    random.Random(n).shuffle(seconds)
    events: list[dict[str, Any]] = []
    for i, s in enumerate(seconds):
        events.append(received(f"p{i}", now - 30 * MINUTE + i))
        events.append(settled(f"p{i}", now - 20 * MINUTE + i, settlement_ms=s * 1000))
    await ingest_and_drain(client, events)
    body = await analytics(client, "payments", now)
    assert body["successfulPayments"] == n
    assert (body["p95SettlementTime"], body["p99SettlementTime"]) == (p95, p99)


# ------------------------------------------------------------------ health


@pytest.mark.parametrize(
    ("settled_count", "failed_count", "status"),
    [
        (9, 1, "degraded"),  # exactly 10 %: critical is above 10
        (19, 1, "healthy"),  # exactly 5 %: degraded is above 5
        (8, 1, "critical"),  # 11.1 %
        (18, 1, "degraded"),  # 5.3 %
    ],
)
async def test_health_status_at_the_error_rate_boundaries(
    client: AppClient, settled_count: int, failed_count: int, status: str
) -> None:
    """Bug caught: ``>=`` for ``>`` at a boundary (9 settled + 1 failed is ``degraded``)."""
    now = int(time.time() * 1000)
    events: list[dict[str, Any]] = []
    for i in range(settled_count + failed_count):
        events.append(received(f"p{i}", now - 30 * MINUTE + i))
        end = now - 20 * MINUTE + i
        events.append(
            settled(f"p{i}", end, settlement_ms=1000) if i < settled_count else failed(f"p{i}", end)
        )
    await ingest_and_drain(client, events)
    body = await analytics(client, "health", now)
    assert body["errorRate"] == pytest.approx(100 * failed_count / (settled_count + failed_count))
    assert body["status"] == status


# ------------------------------------------------------------------ pending gauge


async def test_the_pending_gauge_moves_by_each_commits_delta(
    client: AppClient, registry: CollectorRegistry
) -> None:
    """Three payments received in one request, two in another, one settled in a third: 4
    pending. Bug caught: the gauge set to a commit's delta (2, then -1)."""
    now = int(time.time() * 1000)
    assert (await post(client, [received(f"a{i}", now) for i in range(3)]))[0] == 202
    assert pending(registry, BASE) == 3
    assert (await post(client, [received(f"b{i}", now) for i in range(2)]))[0] == 202
    assert pending(registry, BASE) == 5
    assert (await post(client, settled("a0", now + 1)))[0] == 202
    assert pending(registry, BASE) == 4


# ------------------------------------------------------------------ ingest answers


async def test_duplicates_and_invalid_events_only_are_answered_422(
    client: AppClient, registry: CollectorRegistry
) -> None:
    """202 needs an accepted event or a body of duplicates only; duplicates beside invalid
    events accept nothing, so the answer is 422 naming the invalid ones. Bug caught: 202."""
    now = int(time.time() * 1000)
    assert (await post(client, [received("a", now), received("b", now)]))[0] == 202
    invalid = {"type": "payment:received", "data": {"paymentId": "c"}}
    status, answer = await post(client, [received("a", now), invalid, received("b", now)])
    assert status == 422
    assert (answer["accepted"], answer["duplicates"]) == (0, 2)
    assert [r["index"] for r in answer["rejected"]] == [1]
    assert "error" in answer
    rejected = registry.get_sample_value("exporter_events_rejected_total", {"reason": "invalid"})
    assert rejected == 1
    # the contract's other side: duplicates alone are acknowledged
    status, answer = await post(client, [received("a", now), received("b", now)])
    assert (status, answer["accepted"], answer["duplicates"]) == (202, 0, 2)
