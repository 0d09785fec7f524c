"""Lifecycle events are identified by type and payment or batch id, whatever ``id`` they carry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_MS, AppClient, batch_created, received, settled
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER
from exporter.ledger import (
    GroupCommitter,
    Ledger,
    Outcome,
    PendingChange,
    PreparedEvent,
    Submission,
    TerminalPayment,
)

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


def _with_id(event: dict[str, Any], event_id: str) -> dict[str, Any]:
    return {**event, "id": event_id}


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_retried_receipt_under_a_new_id_counts_once(
    client: AppClient, registry: CollectorRegistry
) -> None:
    first = await client.post("/v1/events", json=_with_id(received("p1"), "evt-1"))
    retry = await client.post("/v1/events", json=_with_id(received("p1"), "evt-2"))
    assert first.status == 202
    assert retry.status == 202
    assert await retry.json() == {"accepted": 0, "duplicates": 1, "rejected": []}
    assert _sample(registry, "exporter_events_received_total", type="payment:received") == 1
    assert _sample(registry, "exporter_events_duplicate_total") == 1
    pending = _sample(registry, "facilitator_pending_payments", network="eip155:8453")
    assert pending == 1
    assert client.app[COMMITTER].ledger.stats().events == 1


async def test_a_settlement_under_a_new_id_counts_once(
    client: AppClient, registry: CollectorRegistry
) -> None:
    await client.post("/v1/events", json=received("p1"))
    for event_id in ("a", "b"):
        response = await client.post("/v1/events", json=_with_id(settled("p1"), event_id))
        assert response.status == 202
    assert (
        _sample(registry, "facilitator_payments_total", network="eip155:8453", status="success")
        == 1
    )
    assert _sample(registry, "facilitator_volume_usd_total", network="eip155:8453") == 1.5


async def test_the_same_natural_key_with_another_body_is_a_conflict(
    client: AppClient, registry: CollectorRegistry
) -> None:
    await client.post("/v1/events", json=_with_id(received("p1"), "evt-1"))
    changed = _with_id(received("p1", amount="9"), "evt-2")
    response = await client.post("/v1/events", json=changed)
    assert response.status == 409
    body = await response.json()
    assert body["accepted"] == 0
    assert body["rejected"][0]["error"].startswith("conflict:")
    [letter] = client.app[COMMITTER].ledger.dead_letters("conflict")
    assert json.loads(letter.raw) == changed
    assert letter.key == "payment:received:p1"
    assert _sample(registry, "exporter_events_rejected_total", reason="conflict") == 1


@pytest.mark.parametrize("framing", ["object", "array", "ndjson"])
async def test_a_body_whose_every_event_conflicts_answers_409(
    client: AppClient, registry: CollectorRegistry, framing: str
) -> None:
    await client.post("/v1/events", json=[received("p1"), batch_created("b1")])
    conflicting = [received("p1", amount="9"), batch_created("b1", count=9)]
    if framing == "object":
        response = await client.post("/v1/events", json=conflicting[0])
    elif framing == "array":
        response = await client.post("/v1/events", json=conflicting)
    else:
        body = b"".join(json.dumps(e).encode() + b"\n" for e in conflicting)
        response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 409
    answer = await response.json()
    assert answer["accepted"] == 0
    assert [r["index"] for r in answer["rejected"]] == list(range(1 if framing == "object" else 2))
    wanted = 1 if framing == "object" else 2
    assert _sample(registry, "exporter_events_rejected_total", reason="conflict") == wanted


async def test_a_body_with_one_new_event_and_one_conflict_is_accepted(
    client: AppClient,
) -> None:
    await client.post("/v1/events", json=received("p1"))
    response = await client.post("/v1/events", json=[received("p1", amount="9"), received("p2")])
    assert response.status == 202
    answer = await response.json()
    assert answer["accepted"] == 1
    assert [r["index"] for r in answer["rejected"]] == [0]


async def test_events_that_never_join_keep_their_id_as_key(client: AppClient) -> None:
    revenue = {
        "type": "revenue:recorded",
        "id": "rev-1",
        "data": {"kind": "premium", "amount": "2", "network": "eip155:1", "timestamp": BASE_MS},
    }
    await client.post("/v1/events", json=revenue)
    other = {**revenue, "id": "rev-2"}
    response = await client.post("/v1/events", json=other)
    assert await response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}


async def test_an_event_stored_under_an_old_id_key_is_not_counted_again(
    tmp_path: Path,
) -> None:
    # Earlier versions keyed lifecycle events that carried an id by that id; the join
    # tables still know their payment and batch after an upgrade.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    try:
        old = []
        for event in (received("p1"), batch_created("b1"), settled("p1")):
            new = prepare({**event, "id": f"old-{event['type']}"})
            old.append(PreparedEvent.keyed(new.event, f"id:old-{event['type']}", new.body, new.raw))
        await committer.submit(Submission(old))
        retried = [
            prepare({**received("p1"), "id": "new-1"}),
            prepare({**batch_created("b1"), "id": "new-2"}),
            prepare({**received("p1", amount="9"), "id": "new-3"}),
            prepare({**settled("p1"), "id": "new-4"}),
        ]
        result = await committer.submit(Submission(retried))
        assert result.outcomes == [
            Outcome.DUPLICATE,
            Outcome.DUPLICATE,
            Outcome.CONFLICT,
            Outcome.CONFLICT,  # the payment has ended
        ]
        assert not [e for e in result.effects if isinstance(e, PendingChange | TerminalPayment)]
    finally:
        committer.close()
        ledger.close()


async def test_an_event_under_a_given_key_joins_on_its_payment_and_keeps_its_bytes(
    tmp_path: Path,
) -> None:
    # What backfill sends: events under the keys another ledger stored them by.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)

    def keyed(event: dict[str, Any], key: str, raw: bytes) -> PreparedEvent:
        parsed = prepare(event)
        return PreparedEvent.keyed(parsed.event, key, parsed.body, raw)

    try:
        # A settlement before its receipt waits, in the table, for its payment...
        early = await committer.submit(Submission([keyed(settled("p1"), "id:s-1", b"first")]))
        assert not [e for e in early.effects if isinstance(e, TerminalPayment)]
        joined = await committer.submit(Submission([prepare(received("p1"))]))
        assert [e for e in joined.effects if isinstance(e, TerminalPayment)] == [
            TerminalPayment("eip155:8453", "success", 1_500_000, 10_000, 1500)
        ]
        # ... and a second ending, under another key, is refused with its own bytes kept.
        late = await committer.submit(Submission([keyed(settled("p1"), "id:s-2", b"second")]))
        assert late.outcomes == [Outcome.CONFLICT]
        (letter,) = ledger.dead_letters("conflict")
        assert letter.raw == b"second"
    finally:
        committer.close()
        ledger.close()
