"""Optional fields: payment:settled without transaction or settlementTime, payment:verified
without verificationTime; amounts, fees, ids and timestamps stay required."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import BASE_MS, AppClient, received
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER
from exporter.events import EventError, parse_event
from exporter.records import PaymentRecord
from exporter.store.influx.line_protocol import to_line

BASE = "eip155:8453"


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_the_briefs_settlement_shape_is_accepted_and_counted(
    client: AppClient, registry: CollectorRegistry
) -> None:
    bare = {"type": "payment:settled", "data": {"paymentId": "p1", "fee": "0.01",
                                                "timestamp": BASE_MS + 2000}}
    response = await client.post("/v1/events", json=[received("p1"), bare])
    assert response.status == 202
    assert (await response.json())["accepted"] == 2
    assert _sample(registry, "facilitator_payments_total", network=BASE, status="success") == 1
    assert _sample(registry, "facilitator_volume_usd_total", network=BASE) == 1.5
    # No time, no histogram observation.
    count = _sample(registry, "facilitator_settlement_duration_seconds_count", network=BASE)
    assert count in (None, 0)
    [_, settled_record] = [r.record for r in client.app[COMMITTER].ledger.read_outbox(10)]
    assert isinstance(settled_record, PaymentRecord)
    assert (settled_record.tx, settled_record.settlement_ms) == (None, None)
    line = to_line(settled_record)
    assert "tx=" not in line and "settlement_ms=" not in line


async def test_a_verification_without_its_time_is_accepted(client: AppClient) -> None:
    bare = {"type": "payment:verified", "data": {"paymentId": "p1", "timestamp": BASE_MS + 1}}
    response = await client.post("/v1/events", json=[received("p1"), bare])
    assert (await response.json())["accepted"] == 2
    records = [r.record for r in client.app[COMMITTER].ledger.read_outbox(10)]
    assert isinstance(records[-1], PaymentRecord)
    assert (records[-1].status, records[-1].verification_ms) == ("verified", None)


@pytest.mark.parametrize("missing", ["paymentId", "fee", "timestamp"])
def test_the_rest_of_a_settlement_is_still_required(missing: str) -> None:
    data: dict[str, Any] = {"paymentId": "p1", "fee": "0.01", "timestamp": BASE_MS}
    del data[missing]
    with pytest.raises(EventError, match=f"data.{missing}: field required"):
        parse_event({"type": "payment:settled", "data": data})
