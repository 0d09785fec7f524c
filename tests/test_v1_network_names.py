"""x402 version 1 network names are accepted on ingest and stored, labelled and analysed as
their CAIP-2 ids, so one chain is one series whatever name the facilitator used."""

from __future__ import annotations

import time

import pytest
from conftest import AppClient, async_wait_until, received, settled
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER
from exporter.events import parse_event, parse_event_json


@pytest.mark.parametrize(
    ("name", "caip2"),
    [
        ("base", "eip155:8453"),
        ("base-sepolia", "eip155:84532"),
        ("monad", "eip155:143"),
        ("celo", "eip155:42220"),
        ("solana", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"),
        ("eip155:8453", "eip155:8453"),
    ],
)
def test_a_v1_name_is_normalised_to_caip2_on_both_parse_paths(name: str, caip2: str) -> None:
    event = received("p", network=name)
    assert dict(parse_event(event)["data"])["network"] == caip2
    raw = (
        '{"type":"payment:received","data":{"paymentId":"p","payer":"0x'
        + "a" * 40
        + '","payee":"0x'
        + "b" * 40
        + f'","amount":"1.5","network":"{name}","timestamp":1767225600000}}}}'
    )
    assert dict(parse_event_json(raw.encode())["data"])["network"] == caip2


async def test_a_payment_named_base_counts_on_eip155_8453_and_a_retry_in_caip2_is_a_duplicate(
    client: AppClient, registry: CollectorRegistry
) -> None:
    now = int(time.time() * 1000)
    first = await client.post(
        "/v1/events", json=[received("p1", now - 5000, network="base"), settled("p1", now - 1000)]
    )
    assert first.status == 202
    retry = await client.post("/v1/events", json=received("p1", now - 5000, network="eip155:8453"))
    assert (await retry.json())["duplicates"] == 1
    labels = {"network": "eip155:8453", "status": "success"}
    assert registry.get_sample_value("facilitator_payments_total", labels) == 1
    ledger = client.app[COMMITTER].ledger

    async def delivered() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(delivered, what="store caught up")
    answer = await client.get(f"/v1/analytics/networks?window=1h&at={now}")
    rows = await answer.json()
    assert [(row["chainId"], row["chainName"]) for row in rows] == [("eip155:8453", "Base")]
