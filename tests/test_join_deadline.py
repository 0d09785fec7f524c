"""Join deadline: an event still waiting for its partner after EXPORTER_JOIN_TIMEOUT_SECONDS
is counted with what it carries, and a partner arriving later counts nothing twice."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import (
    BASE_MS,
    AppClient,
    async_wait_until,
    batch_created,
    batch_settled,
    failed,
    received,
    settled,
    verified,
)
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.ledger import (
    BatchGas,
    GroupCommitter,
    JoinTimeout,
    Ledger,
    Outcome,
    PendingChange,
    Submission,
    TerminalPayment,
)
from exporter.metrics import Metrics
from exporter.records import BatchRecord, PaymentRecord

BASE = "eip155:8453"
FOREVER = 2**62


@pytest.fixture
async def committer(tmp_path: Path) -> AsyncIterator[GroupCommitter]:
    """A ledger on a fresh file behind its writer thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    yield committer
    committer.close()
    ledger.close()




async def test_an_orphan_settlement_is_counted_on_unknown_past_the_deadline(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    result = await committer.submit(Submission([prepare(settled("p1", fee="0.25"))]))
    assert not [e for e in result.effects if isinstance(e, TerminalPayment)]
    assert ledger.waiting_events() == 1
    assert await committer.call(lambda: ledger.release_unjoined(0)) == []  # not yet due
    effects = await committer.call(lambda: ledger.release_unjoined(FOREVER))
    assert effects == [
        TerminalPayment("unknown", "success", 0, 250_000, 1500),
        JoinTimeout("payment:settled"),
    ]
    assert ledger.waiting_events() == 0
    [record] = [r.record for r in ledger.read_outbox(100)]
    assert isinstance(record, PaymentRecord)
    assert (record.network, record.status, record.amount_micro, record.fee_micro) == (
        "unknown",
        "settled",
        0,
        250_000,
    )
    assert (record.payer, record.payee) == ("unknown", "unknown")


async def test_a_settlement_naming_its_network_is_released_on_it(
    committer: GroupCommitter,
) -> None:
    event = settled("p1")
    event["data"]["network"] = BASE
    await committer.submit(Submission([prepare(event)]))
    effects = await committer.call(lambda: committer.ledger.release_unjoined(FOREVER))
    assert TerminalPayment(BASE, "success", 0, 10_000, 1500) in effects


async def test_a_late_receipt_is_recorded_and_nothing_counts_twice(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    await committer.submit(Submission([prepare(settled("p1"))]))
    await committer.call(lambda: ledger.release_unjoined(FOREVER))
    late = await committer.submit(Submission([prepare(received("p1"))]))
    assert late.outcomes == [Outcome.ACCEPTED]
    # Recorded (a received payment in the analytics), but it has ended: not pending, and
    # the settlement is not counted again.
    assert not [e for e in late.effects if isinstance(e, PendingChange | TerminalPayment)]
    records = [r.record for r in ledger.read_outbox(100)]
    statuses = [(r.status, r.network) for r in records if isinstance(r, PaymentRecord)]
    assert statuses == [("settled", "unknown"), ("received", BASE)]
    again = await committer.submit(Submission([prepare(failed("p1"))]))
    assert again.outcomes == [Outcome.CONFLICT]
    assert ledger.gauges().pending_by_network == {}


async def test_a_released_verification_leaves_its_payment_open(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    await committer.submit(Submission([prepare(verified("p1"))]))
    effects = await committer.call(lambda: ledger.release_unjoined(FOREVER))
    assert effects == [JoinTimeout("payment:verified")]
    late = await committer.submit(Submission([prepare(received("p1")), prepare(settled("p1"))]))
    assert [e for e in late.effects if isinstance(e, PendingChange)] == [
        PendingChange(BASE, 1),
        PendingChange(BASE, -1),
    ]
    assert TerminalPayment(BASE, "success", 1_500_000, 10_000, 1500) in late.effects


async def test_an_orphan_batch_settlement_is_counted_on_unknown(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    await committer.submit(Submission([prepare(batch_settled("b1", gas="42000"))]))
    effects = await committer.call(lambda: ledger.release_unjoined(FOREVER))
    assert effects == [BatchGas("unknown", 42_000), JoinTimeout("batch:settled")]
    late = await committer.submit(Submission([prepare(batch_created("b1"))]))
    assert not [e for e in late.effects if isinstance(e, BatchGas)]
    records = [r.record for r in ledger.read_outbox(100)]
    assert all(isinstance(r, BatchRecord) for r in records)
    assert [(r.status, r.network) for r in records if isinstance(r, BatchRecord)] == [
        ("settled", "unknown"),
        ("created", BASE),
    ]


def test_join_timeouts_and_waiting_events_are_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.track_waiting(lambda: 3)
    metrics.apply([JoinTimeout("payment:settled"), JoinTimeout("payment:settled")])
    assert registry.get_sample_value("exporter_ledger_waiting_events") == 3
    settled_type = {"type": "payment:settled"}
    assert registry.get_sample_value("exporter_join_timeouts_total", settled_type) == 2
    assert registry.get_sample_value("exporter_join_timeouts_total", {"type": "batch:settled"}) == 0


async def test_the_exporter_releases_what_waited_past_the_deadline_after_a_restart(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    first = Settings(data_dir=data_dir, listen="127.0.0.1:0")
    before = await aiohttp_client(create_app(first, CollectorRegistry()))
    await before.post("/v1/events", json=[settled("p1"), failed("p2")])
    assert before.app[COMMITTER].ledger.waiting_events() == 2
    await before.close()
    registry = CollectorRegistry()
    due = Settings(data_dir=data_dir, listen="127.0.0.1:0", join_timeout_seconds=0)
    after = await aiohttp_client(create_app(due, registry))

    ledger: Ledger = after.app[COMMITTER].ledger

    async def released() -> bool:
        return ledger.waiting_events() == 0

    await async_wait_until(released, what="the waiting events released")
    metrics = await after.get("/metrics")
    text = await metrics.text()
    assert "exporter_ledger_waiting_events 0.0" in text
    assert registry.get_sample_value(
        "facilitator_payments_total", {"network": "unknown", "status": "success"}
    ) == 1
    assert registry.get_sample_value(
        "exporter_join_timeouts_total", {"type": "payment:failed"}
    ) == 1

    async def stored() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(stored, what="the released events in the store")
    at = BASE_MS + 3_600_000
    answer = await after.get(f"/v1/analytics/payments?window=1h&at={at}")
    payments = await answer.json()
    assert (payments["successfulPayments"], payments["failedPayments"]) == (1, 1)
    answer = await after.get(f"/v1/analytics/networks?window=1h&at={at}")
    assert [row["chainId"] for row in await answer.json()] == ["unknown"]
