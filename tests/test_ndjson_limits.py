"""The NDJSON batch limit is checked by counting lines, before any line is parsed."""

from __future__ import annotations

import json

from conftest import AppClient, received
from prometheus_client import CollectorRegistry

NDJSON = {"Content-Type": "application/x-ndjson"}


async def test_too_many_lines_are_refused_before_any_is_parsed(
    client: AppClient, registry: CollectorRegistry
) -> None:
    # Unparseable lines: a body parsed first would be answered 400 for its first line.
    body = b"not json\n" * 10_001
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 413
    answer = await response.json()
    assert answer["error"] == "10001 events in one request; the limit is 10000"
    labels = {"reason": "too_large"}
    assert registry.get_sample_value("exporter_events_rejected_total", labels) == 1


async def test_a_megabyte_of_tiny_lines_is_refused_and_the_server_keeps_answering(
    client: AppClient,
) -> None:
    body = b"{}\n" * 349_525
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 413
    assert (await client.get("/healthz")).status == 200


async def test_blank_lines_do_not_count_against_the_limit(client: AppClient) -> None:
    lines = [json.dumps(received(f"p{n}")).encode() for n in range(3)]
    body = b"\n\n  \n".join(lines) + b"\n" * 20_000
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 202
    assert (await response.json())["accepted"] == 3
