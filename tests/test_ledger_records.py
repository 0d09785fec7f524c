"""The store records the ledger emits, field by field: joined updates carry their receipt's
fields (also after the payment ended), a failure of the ``unknown`` payment is recorded at
once, an orphan failure when released after the join timeout; and what a payment's late
``payment:received`` finds afterwards, before and after retention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import BASE_MS, failed, received, settled, verified
from ledger_helpers import prepare

from exporter.ledger import GroupCommitter, Ledger, PendingChange, Submission
from exporter.records import PaymentRecord, StoreRecord, point_time_ns, unique_time_ns

BASE = "eip155:8453"
OP = "eip155:10"
FOREVER = 2**62


@pytest.fixture
async def committer(tmp_path: Path) -> AsyncIterator[GroupCommitter]:
    """A ledger on a fresh file behind its writer thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    yield committer
    committer.close()
    ledger.close()


def outbox(committer: GroupCommitter) -> list[StoreRecord]:
    """Every record waiting for delivery, in commit order, its point offset checked (no two
    keys collide here: each takes its key's hash offset) and then cleared, so that the
    records compare with the expected ones field by field."""
    records = [row.record for row in committer.ledger.read_outbox(10**9)]
    for record in records:
        assert point_time_ns(record) == unique_time_ns(record.time_ms, record.key)
    return [replace(record, time_offset_ns=None) for record in records]


async def test_a_failure_of_the_unknown_payment_is_recorded_at_once(
    committer: GroupCommitter,
) -> None:
    event = failed("unknown", BASE_MS + 5, network=OP, error="rpc_down")
    prepared = prepare(event)
    await committer.submit(Submission([prepared]))
    assert outbox(committer) == [
        PaymentRecord(prepared.key, BASE_MS + 5, OP, "failed", "unknown", error="rpc_down")
    ]


async def test_a_released_orphan_failure_and_its_late_payment(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    event = failed("p", BASE_MS + 5, network=OP, error="expired")
    prepared = prepare(event)
    await committer.submit(Submission([prepared]))
    assert outbox(committer) == []  # waiting for its payment
    await committer.call(lambda: ledger.release_unjoined(FOREVER))
    assert outbox(committer) == [
        PaymentRecord(prepared.key, BASE_MS + 5, OP, "failed", "p", error="expired")
    ]
    # The payment arrives late: it has ended, so nothing is pending; a later update of it
    # is joined to the receipt's fields.
    late = await committer.submit(Submission([prepare(received("p", network=BASE))]))
    assert not [e for e in late.effects if isinstance(e, PendingChange)]
    await committer.submit(Submission([prepare(verified("p"))]))
    last = outbox(committer)[-1]
    assert isinstance(last, PaymentRecord)
    assert (last.status, last.network, last.amount_micro) == ("verified", BASE, 1_500_000)
    assert (last.payer, last.payee) == ("0x" + "a" * 40, "0x" + "b" * 40)


async def test_retention_forgets_an_ended_payment(committer: GroupCommitter) -> None:
    ledger = committer.ledger
    settled_payment = [prepare(received("q", network=OP)), prepare(settled("q"))]
    await committer.submit(Submission(settled_payment))
    await committer.submit(Submission([prepare(failed("p", BASE_MS + 5, network=OP))]))
    await committer.call(lambda: ledger.release_unjoined(FOREVER))
    last_seq = ledger.read_outbox(10**9)[-1].seq
    await committer.call(lambda: ledger.mark_delivered(last_seq))
    await committer.call(lambda: ledger.apply_retention(FOREVER))
    # Forgotten with its events: a receipt now is a new payment, pending on its network.
    late = await committer.submit(
        Submission([prepare(received("p", network=BASE)), prepare(received("q", network=BASE))])
    )
    pending = [e for e in late.effects if isinstance(e, PendingChange)]
    assert pending == [PendingChange(BASE, 1), PendingChange(BASE, 1)]


async def test_joined_records_carry_the_receipts_fields(committer: GroupCommitter) -> None:
    payer, payee = "0x" + "a" * 40, "0x" + "b" * 40
    events = [
        received("s", BASE_MS, amount="2.50", network=OP),
        settled("s", BASE_MS + 10, fee="0.02", settlement_ms=900),
        verified("s", BASE_MS + 20, ms=75),  # after its payment ended: still joined
        failed("f", BASE_MS + 30, error="insufficient_funds", network=BASE),
        received("f", BASE_MS + 25, amount="1.00", network=OP),
    ]
    prepared = [prepare(e) for e in events]
    await committer.submit(Submission(prepared))
    assert outbox(committer) == [
        PaymentRecord(
            prepared[0].key, BASE_MS, OP, "received", "s", payer, payee, amount_micro=2_500_000
        ),
        PaymentRecord(
            prepared[1].key,
            BASE_MS + 10,
            OP,
            "settled",
            "s",
            payer,
            payee,
            amount_micro=2_500_000,
            fee_micro=20_000,
            settlement_ms=900,
            tx="0x" + "c" * 64,
        ),
        PaymentRecord(
            prepared[2].key,
            BASE_MS + 20,
            OP,
            "verified",
            "s",
            payer,
            payee,
            amount_micro=2_500_000,
            verification_ms=75,
        ),
        PaymentRecord(
            prepared[4].key, BASE_MS + 25, OP, "received", "f", payer, payee, amount_micro=1_000_000
        ),
        PaymentRecord(
            prepared[3].key,
            BASE_MS + 30,
            OP,
            "failed",
            "f",
            payer,
            payee,
            amount_micro=1_000_000,
            error="insufficient_funds",
        ),
    ]
