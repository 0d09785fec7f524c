"""The transaction writer's rules, record by record: what a joined, released or timed-out
event carries into the store, when a payment or batch is defined and ended, and what a
refused event leaves behind (docs/architecture.md section 2).

The ledger is driven the way the committer drives it (:meth:`Ledger.commit`,
:meth:`Ledger.release_unjoined`, :meth:`Ledger.release_overdue_settlements`), and each
store record is compared whole, so that no field it carries goes unchecked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BASE_MS,
    batch_created,
    batch_settled,
    failed,
    received,
    settled,
    verified,
)
from ledger_helpers import prepare

from exporter.ledger import (
    BatchGas,
    DeadLetter,
    DeadLetterRow,
    JoinTimeout,
    Ledger,
    NewEvent,
    Outcome,
    PendingChange,
    Submission,
    SubmissionResult,
    TerminalPayment,
)
from exporter.ledger.model import WebsocketCount
from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
)

BASE = "eip155:8453"
OP = "eip155:10"
PAYER = "0x" + "a" * 40
PAYEE = "0x" + "b" * 40
PAYMENT_TX = "0x" + "c" * 64
BATCH_TX = "0x" + "d" * 64
FOREVER = 2**62
TIMEOUT_MS = 900_000
SCHEMA_1_LEDGER = Path(__file__).parent / "fixtures" / "ledger-schema1.sqlite3"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An empty ledger, written from the test's own thread (as the committer's writer does)."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


def commit(
    ledger: Ledger,
    *events: dict[str, Any],
    derived: bool = False,
    pending: Sequence[str] = (),
) -> SubmissionResult:
    """Commit ``events`` as one request."""
    submission = Submission(
        [prepare(event) for event in events], pending_settlements=list(pending), derived=derived
    )
    [result] = ledger.commit([submission])
    return result


def records(ledger: Ledger) -> list[StoreRecord]:
    """Every record in the outbox, in order, without its point offset (compared elsewhere)."""
    return [replace(row.record, time_offset_ns=None) for row in ledger.read_outbox(10_000)]


def stored_events(ledger: Ledger) -> list[dict[str, Any]]:
    """Every event the ledger holds, as stored, in order."""
    return [json.loads(body) for _, _, body in ledger.iter_events()]


def test_batch_records_carry_the_definition_of_their_batch_created(ledger: Ledger) -> None:
    commit(ledger, batch_created("b1", count=4, total="7.25", network=OP))
    result = commit(ledger, batch_settled("b1", gas="21000"))
    assert result.effects == [NewEvent("batch:settled"), BatchGas(OP, 21_000)]
    # Settled first, created later: the settlement waits, then takes the same fields.
    commit(ledger, batch_settled("b2", gas="42000"))
    commit(ledger, batch_created("b2", count=2, total="0.5"))
    assert records(ledger) == [
        BatchRecord("batch:created:b1", BASE_MS, OP, "created", "b1", 4, 7_250_000),
        BatchRecord(
            "batch:settled:b1",
            BASE_MS + 5000,
            OP,
            "settled",
            "b1",
            4,
            7_250_000,
            20_000,
            21_000,
            BATCH_TX,
        ),
        BatchRecord("batch:created:b2", BASE_MS, BASE, "created", "b2", 2, 500_000),
        BatchRecord(
            "batch:settled:b2",
            BASE_MS + 5000,
            BASE,
            "settled",
            "b2",
            2,
            500_000,
            20_000,
            42_000,
            BATCH_TX,
        ),
    ]


def test_released_events_carry_what_they_say_and_nothing_they_do_not(ledger: Ledger) -> None:
    commit(
        ledger,
        verified("p1", ms=80),
        settled("p2", fee="0.25", settlement_ms=2500),
        batch_settled("b1", gas="63000"),
    )
    effects = ledger.release_unjoined(FOREVER)
    assert effects == [
        JoinTimeout("payment:verified"),
        TerminalPayment("unknown", "success", 0, 250_000, 2500),
        JoinTimeout("payment:settled"),
        BatchGas("unknown", 63_000),
        JoinTimeout("batch:settled"),
    ]
    assert records(ledger) == [
        PaymentRecord(
            "payment:verified:p1", BASE_MS + 100, "unknown", "verified", "p1", verification_ms=80
        ),
        PaymentRecord(
            "payment:settled:p2",
            BASE_MS + 2000,
            "unknown",
            "settled",
            "p2",
            "unknown",
            "unknown",
            0,
            250_000,
            2500,
            tx=PAYMENT_TX,
        ),
        BatchRecord(
            "batch:settled:b1", BASE_MS + 5000, "unknown", "settled", "b1", 0, 0, 20_000, 63_000,
            BATCH_TX,
        ),
    ]
    assert ledger.waiting_events() == 0


def test_a_settlement_timeout_fails_the_payment_on_its_network(ledger: Ledger) -> None:
    commit(ledger, received("p1", network=OP), derived=True, pending=["p1"])
    effects = ledger.release_overdue_settlements(FOREVER, TIMEOUT_MS)
    assert [e for e in effects if not isinstance(e, NewEvent)] == [
        TerminalPayment(OP, "failed"),
        PendingChange(OP, -1),
    ]
    failure = stored_events(ledger)[-1]
    assert failure["type"] == "payment:failed"
    # The stored failure names its network, as an export or a replay reads it.
    assert failure["data"]["network"] == OP
    assert failure["data"]["error"] == "settlement_timeout"


def test_a_payment_that_ended_in_time_is_not_failed_again(ledger: Ledger) -> None:
    commit(ledger, received("p1"), derived=True, pending=["p1"])
    commit(ledger, settled("p1"), derived=True)
    assert ledger.release_overdue_settlements(FOREVER, TIMEOUT_MS) == []
    assert [e["type"] for e in stored_events(ledger)] == ["payment:received", "payment:settled"]
    assert ledger.dead_letters() == []


def test_a_pending_settlement_of_a_payment_the_ledger_does_not_hold_ends_nothing(
    ledger: Ledger,
) -> None:
    # Marked pending, but no receipt of it is held (retention forgot it, or it never came).
    commit(ledger, pending=["ghost"])
    commit(ledger, settled("early"), pending=["early"])  # its ending waits for its receipt
    assert ledger.release_overdue_settlements(FOREVER, TIMEOUT_MS) == []
    assert [e["type"] for e in stored_events(ledger)] == ["payment:settled"]
    assert ledger.dead_letters() == []


def test_an_ending_waiting_in_an_upgraded_ledger_is_released_and_ends_its_payment(
    tmp_path: Path,
) -> None:
    # The schema 1 ledger holds a settlement of waits-1 waiting for its receipt, with no
    # payments row for it (rows for endings that wait came later).
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(SCHEMA_1_LEDGER.read_bytes())
    ledger = Ledger(path)
    try:
        effects = ledger.release_unjoined(FOREVER)
        assert JoinTimeout("payment:settled") in effects
        late = commit(ledger, received("waits-1"))
        assert late.outcomes == [Outcome.ACCEPTED]
        assert not [e for e in late.effects if isinstance(e, PendingChange | TerminalPayment)]
        again = commit(ledger, failed("waits-1"))
        assert again.outcomes == [Outcome.CONFLICT]
    finally:
        ledger.close()


def websocket(count: int, ts: int) -> dict[str, Any]:
    """A ``websocket:clients`` event."""
    return {"type": "websocket:clients", "data": {"count": count, "timestamp": ts}}


def test_the_websocket_gauge_follows_the_latest_count_and_every_count_is_recorded(
    ledger: Ledger,
) -> None:
    first = commit(ledger, websocket(3, BASE_MS + 10))
    assert first.effects == [NewEvent("websocket:clients"), WebsocketCount(3)]
    older = commit(ledger, websocket(8, BASE_MS))
    assert older.effects == [NewEvent("websocket:clients")]  # recorded, not the latest
    # Two counts in one millisecond: the one that arrived last is the latest.
    same_ms = commit(ledger, websocket(5, BASE_MS + 10))
    assert same_ms.effects == [NewEvent("websocket:clients"), WebsocketCount(5)]
    assert ledger.gauges().websocket_clients == 5
    assert records(ledger) == [
        WebsocketRecord(prepare(websocket(3, BASE_MS + 10)).key, BASE_MS + 10, 3),
        WebsocketRecord(prepare(websocket(8, BASE_MS)).key, BASE_MS, 8),
        WebsocketRecord(prepare(websocket(5, BASE_MS + 10)).key, BASE_MS + 10, 5),
    ]


def test_a_dead_letter_keeps_the_time_it_was_first_received(ledger: Ledger) -> None:
    before = int(time.time() * 1000)
    recovered = DeadLetter("invalid", "not JSON", b"{", received_at=BASE_MS, raw_size=9)
    fresh = DeadLetter("invalid", "not JSON", b"[")
    ledger.commit([Submission(dead_letters=[recovered, fresh])])
    after = int(time.time() * 1000)
    now_letter, kept = ledger.dead_letters()  # newest first
    assert kept == DeadLetterRow(kept.id, BASE_MS, "invalid", "not JSON", None, b"{", 9)
    assert (now_letter.raw, now_letter.raw_size) == (b"[", None)
    assert before <= now_letter.received_at <= after


def test_payments_keep_their_own_join_state_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    try:
        commit(ledger, received("p1", network=OP))
        commit(ledger, received("p2"))
    finally:
        ledger.close()
    ledger = Ledger(path)
    try:
        commit(ledger, received("p3"), received("p4"))
        assert ledger.gauges().pending_by_network == {OP: 1, BASE: 3}
        ended = commit(ledger, *(settled(pid) for pid in ("p1", "p2", "p3", "p4")))
        assert [e.network for e in ended.effects if isinstance(e, TerminalPayment)] == [
            OP,
            BASE,
            BASE,
            BASE,
        ]
        assert ledger.gauges().pending_by_network == {}
        assert ledger.waiting_events() == 0
    finally:
        ledger.close()


def test_an_event_is_found_again_behind_another_key_of_the_same_hash(ledger: Ledger) -> None:
    def colliding(*events: dict[str, Any]) -> list[Outcome]:
        submission = Submission([prepare(event, known_key_hash=7) for event in events])
        [result] = ledger.commit([submission])
        return result.outcomes

    first, second = websocket(3, BASE_MS), websocket(4, BASE_MS + 1)
    assert colliding({**first, "id": "w1"}, {**second, "id": "w2"}) == [Outcome.ACCEPTED] * 2
    # w2 is the second key stored under the hash: found past w1, whatever the order.
    assert colliding({**second, "id": "w2"}) == [Outcome.DUPLICATE]
    assert colliding({**first, "id": "w2"}) == [Outcome.CONFLICT]
    assert ledger.stats().events == 2


def test_a_second_ending_is_kept_as_a_conflict_under_its_key(ledger: Ledger) -> None:
    commit(ledger, received("p1"), settled("p1"))
    result = commit(ledger, failed("p1"))
    assert result.outcomes == [Outcome.CONFLICT]
    assert result.effects == []
    [letter] = ledger.dead_letters()
    assert (letter.reason, letter.key) == ("conflict", "payment:failed:p1")
    assert letter.error == "payment 'p1' has already ended (settled or failed)"
    assert json.loads(letter.raw) == failed("p1")


def test_a_receipt_whose_event_retention_deleted_is_checked_against_its_payment(
    ledger: Ledger,
) -> None:
    commit(ledger, received("p1", amount="2.00", network=OP))
    ledger.mark_delivered(ledger.read_outbox(10)[-1].seq)
    assert ledger.apply_retention(FOREVER) == 1  # the event goes, the open payment stays
    assert commit(ledger, received("p1", amount="2.00", network=OP)).outcomes == [
        Outcome.DUPLICATE
    ]
    changed = commit(ledger, received("p1", amount="3.00", network=OP))
    assert (changed.outcomes, changed.effects) == ([Outcome.CONFLICT], [])
    [letter] = ledger.dead_letters()
    assert (letter.reason, letter.key) == ("conflict", "payment:received:p1")
    assert letter.error == "payment:received 'p1' was already stored with other fields"
    assert ledger.gauges().pending_by_network == {OP: 1}


def test_an_event_repeated_within_one_request_is_a_duplicate(ledger: Ledger) -> None:
    repeated = commit(
        ledger,
        websocket(3, BASE_MS),
        websocket(3, BASE_MS),
        received("p1"),
        settled("p1"),
        settled("p1"),
    )
    assert repeated.outcomes == [
        Outcome.ACCEPTED,
        Outcome.DUPLICATE,
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
        Outcome.DUPLICATE,
    ]
    assert ledger.stats().events == 3
    assert ledger.dead_letters() == []


def test_a_replayed_exchange_failing_an_ended_payment_records_nothing(ledger: Ledger) -> None:
    commit(ledger, received("p1"), settled("p1"), derived=True)
    # The settle replayed and refused upstream: derived, a failure of an ended payment.
    replayed = commit(ledger, failed("p1", error="already_settled"), derived=True)
    assert (replayed.outcomes, replayed.effects) == ([Outcome.DUPLICATE], [])
    assert ledger.dead_letters() == []
    # A derived settlement of a payment that failed contradicts it: a conflict.
    commit(ledger, received("p2"), failed("p2"), derived=True)
    contradicted = commit(ledger, settled("p2"), derived=True)
    assert contradicted.outcomes == [Outcome.CONFLICT]
    assert [letter.key for letter in ledger.dead_letters()] == ["payment:settled:p2"]


def test_revenue_records_carry_every_field_of_their_event(ledger: Ledger) -> None:
    sponsored: dict[str, Any] = {
        "type": "revenue:recorded",
        "data": {
            "kind": "gas_sponsorship",
            "amount": "0.125",
            "network": OP,
            "timestamp": BASE_MS + 7,
            "paymentId": "p1",
        },
    }
    premium: dict[str, Any] = {
        "type": "revenue:recorded",
        "id": "r2",
        "data": {"kind": "premium", "amount": "2", "network": BASE, "timestamp": BASE_MS},
    }
    result = commit(ledger, sponsored, premium)
    assert result.effects == [NewEvent("revenue:recorded"), NewEvent("revenue:recorded")]
    assert records(ledger) == [
        RevenueRecord(prepare(sponsored).key, BASE_MS + 7, OP, "gas_sponsorship", 125_000, "p1"),
        RevenueRecord("id:r2", BASE_MS, BASE, "premium", 2_000_000),
    ]
