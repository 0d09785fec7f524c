"""Settlement deadline: a payment still pending settlement past
EXPORTER_SETTLEMENT_TIMEOUT_SECONDS ends as failed (settlement_timeout), durably."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import AppClient, received, settled
from facilitator_helpers import (
    NETWORK,
    ScriptedFacilitator,
    payment_id,
    start_proxy,
    through,
)
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER
from exporter.ledger import (
    GroupCommitter,
    Ledger,
    Outcome,
    PendingChange,
    Submission,
    TerminalPayment,
)

BASE = "eip155:8453"
TIMEOUT_MS = 900_000


@pytest.fixture
async def committer(tmp_path: Path) -> AsyncIterator[GroupCommitter]:
    """A ledger on a fresh file behind its writer thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    yield committer
    committer.close()
    ledger.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


async def test_a_payment_pending_past_the_deadline_ends_as_failed(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    marked = _now_ms()
    await committer.submit(
        Submission([prepare(received("p1"))], pending_settlements=["p1"], derived=True)
    )
    early = await committer.call(
        lambda: ledger.release_overdue_settlements(marked + TIMEOUT_MS - 1_000, TIMEOUT_MS)
    )
    assert early == []
    later = _now_ms() + TIMEOUT_MS
    effects = await committer.call(lambda: ledger.release_overdue_settlements(later, TIMEOUT_MS))
    assert [e for e in effects if isinstance(e, TerminalPayment | PendingChange)] == [
        TerminalPayment(BASE, "failed"),
        PendingChange(BASE, -1),
    ]
    failure = json.loads(list(ledger.iter_events())[-1][2])
    assert failure["type"] == "payment:failed"
    assert failure["data"]["error"] == "settlement_timeout"
    assert marked + TIMEOUT_MS <= failure["data"]["timestamp"] <= later
    # Ended once: released again, nothing more; a settle answer now is a conflict.
    assert await committer.call(lambda: ledger.release_overdue_settlements(later, TIMEOUT_MS)) == []
    for derived in (True, False):
        late = await committer.submit(Submission([prepare(settled("p1"))], derived=derived))
        assert late.outcomes == [Outcome.CONFLICT]
    assert len(ledger.dead_letters("conflict")) == 2


async def test_a_payment_that_settles_in_time_is_left_alone(committer: GroupCommitter) -> None:
    ledger = committer.ledger
    await committer.submit(
        Submission([prepare(received("p1"))], pending_settlements=["p1"], derived=True)
    )
    await committer.submit(Submission([prepare(settled("p1"))], derived=True))
    later = _now_ms() + TIMEOUT_MS
    assert await committer.call(lambda: ledger.release_overdue_settlements(later, TIMEOUT_MS)) == []
    assert [json.loads(body)["type"] for _, _, body in ledger.iter_events()] == [
        "payment:received",
        "payment:settled",
    ]


async def test_the_proxy_keeps_a_pending_settlement_across_a_restart(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    data_dir: Path,
) -> None:
    facilitator = ScriptedFacilitator(settle="pending")
    server = await aiohttp_server(facilitator.app(), port=0)
    url = str(server.make_url("")).rstrip("/")
    before = await start_proxy(aiohttp_client, data_dir, url, CollectorRegistry())
    assert await through(before, "/settle", 7) == 200  # no verify first: received, pending
    await before.close()

    registry = CollectorRegistry()
    after = await start_proxy(aiohttp_client, data_dir, url, registry)
    committer = after.app[COMMITTER]
    ledger = committer.ledger
    later = _now_ms() + TIMEOUT_MS
    await committer.call(lambda: ledger.release_overdue_settlements(later, TIMEOUT_MS))
    stored = [json.loads(body) for _, _, body in ledger.iter_events()]
    assert [(e["type"], e["data"].get("error")) for e in stored] == [
        ("payment:received", None),
        ("payment:failed", "settlement_timeout"),
    ]
    assert stored[0]["data"]["paymentId"] == payment_id(7)
    # The facilitator reconciles and now says settled: the payment already ended.
    facilitator.settle = "settled"
    assert await through(after, "/settle", 7) == 200
    assert len(ledger.dead_letters("conflict")) == 1
    success = {"network": NETWORK, "status": "success"}
    assert registry.get_sample_value("facilitator_payments_total", success) in (None, 0)
    failures = {"reason": "conflict"}
    assert registry.get_sample_value("x402_proxy_recording_failures_total", failures) == 1
