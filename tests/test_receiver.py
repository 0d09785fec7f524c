"""POST /v1/events: body forms, gzip, limits, every status code, auth and the loopback rule."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import AppClient, failed, received, settled
from ledger_faults import refusing_inserts
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.ingest.receiver import IngestLimits, Receiver
from exporter.ledger import GroupCommitter, Ledger
from exporter.metrics import Metrics

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(*events: dict[str, Any]) -> bytes:
    """Events as NDJSON."""
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def dead_letters(client: AppClient, reason: str | None = None) -> list[tuple[str, str, bytes]]:
    """(reason, error, raw) of the stored dead letters, oldest first."""
    ledger = client.app[COMMITTER].ledger
    return [(d.reason, d.error, d.raw) for d in reversed(ledger.dead_letters(reason))]


def rejected_count(registry: CollectorRegistry, reason: str) -> float:
    """exporter_events_rejected_total{reason}."""
    value = registry.get_sample_value("exporter_events_rejected_total", {"reason": reason})
    assert value is not None
    return value


async def test_single_event_is_acknowledged(client: AppClient) -> None:
    response = await client.post("/v1/events", json=received("p1"))
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}


async def test_json_array_reports_each_rejection_by_index(
    client: AppClient, registry: CollectorRegistry
) -> None:
    bad = received("p2", amount="-3")
    response = await client.post("/v1/events", json=[received("p1"), bad, settled("p1")])
    assert response.status == 202
    body = await response.json()
    assert body["accepted"] == 2
    assert body["rejected"] == [{"index": 1, "error": body["rejected"][0]["error"]}]
    assert body["rejected"][0]["error"].startswith("data.amount: must be a plain")
    [(reason, error, raw)] = dead_letters(client)
    assert (reason, json.loads(raw)) == ("invalid", bad)
    assert rejected_count(registry, "invalid") == 1


async def test_ndjson_body(client: AppClient) -> None:
    body = ndjson(received("p1"), received("p2")) + b"\n\n" + ndjson(settled("p1"))
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 202
    assert (await response.json())["accepted"] == 3


async def test_ndjson_lines_of_whitespace_are_skipped(client: AppClient) -> None:
    body = ndjson(received("p1")) + b" \t\x0b\x0c\r\n\r\n" + ndjson(received("p2")) + b"\x0c"
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 202
    assert await response.json() == {"accepted": 2, "duplicates": 0, "rejected": []}


async def test_six_decimal_amounts_are_the_same_event_as_shortest_ones(
    client: AppClient,
) -> None:
    # Facilitators write USDC with six decimals: "1.500000" is stored as "1.5", so the
    # same payment sent both ways is a duplicate, never a conflict.
    first = await client.post(
        "/v1/events", data=ndjson(received("p1", amount="1.5")), headers=NDJSON
    )
    assert first.status == 202
    again = ndjson(received("p1", amount="1.500000"), received("p2", amount="0.010000"))
    response = await client.post("/v1/events", data=again, headers=NDJSON)
    assert await response.json() == {"accepted": 1, "duplicates": 1, "rejected": []}
    changed = ndjson(received("p2", amount="0.011000"))
    response = await client.post("/v1/events", data=changed, headers=NDJSON)
    assert response.status == 409  # every event conflicts, whatever the framing
    assert "conflict" in (await response.json())["rejected"][0]["error"]


async def test_gzip_body(client: AppClient) -> None:
    body = gzip.compress(json.dumps([received("p1"), received("p2")]).encode())
    response = await client.post(
        "/v1/events", data=body, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert response.status == 202
    assert (await response.json())["accepted"] == 2


async def test_duplicates_only_is_202(client: AppClient, registry: CollectorRegistry) -> None:
    await client.post("/v1/events", json=received("p1"))
    response = await client.post("/v1/events", json=[received("p1"), received("p1")])
    assert response.status == 202
    assert await response.json() == {"accepted": 0, "duplicates": 2, "rejected": []}
    assert registry.get_sample_value("exporter_events_duplicate_total") == 2


async def test_malformed_json_is_400_with_parser_message_and_kept(client: AppClient) -> None:
    response = await client.post("/v1/events", data=b'{"type": ', headers=JSON)
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "body is not valid JSON: EOF while parsing a value at line 1 column 9"
    assert body["accepted"] == 0 and body["rejected"] == []
    assert dead_letters(client, "malformed")[0][2] == b'{"type": '


async def test_malformed_ndjson_line_names_line_and_index(client: AppClient) -> None:
    body = ndjson(received("p1")) + b"{oops\n"
    response = await client.post("/v1/events", data=body, headers=NDJSON)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"].startswith("line 2 is not valid JSON")
    assert answer["rejected"][0]["index"] == 1
    assert client.app[COMMITTER].ledger.stats().events == 0  # the whole body is refused


async def test_invalid_utf8_is_400(client: AppClient) -> None:
    response = await client.post("/v1/events", data=b'{"type": "\xff"}', headers=JSON)
    assert response.status == 400


async def test_no_valid_event_is_422_naming_every_field(client: AppClient) -> None:
    response = await client.post(
        "/v1/events", json=[received("p1", amount="NaN"), {"type": "nope", "data": {}}]
    )
    assert response.status == 422
    body = await response.json()
    assert [r["index"] for r in body["rejected"]] == [0, 1]
    assert body["rejected"][0]["error"].startswith("data.amount:")
    assert body["rejected"][1]["error"].startswith("type: unknown event type 'nope'")
    assert body["error"] == "no event in the body is valid"
    assert len(dead_letters(client, "invalid")) == 2


async def test_empty_array_is_422(client: AppClient) -> None:
    response = await client.post("/v1/events", json=[])
    assert response.status == 422


async def test_single_event_conflict_is_409(client: AppClient, registry: CollectorRegistry) -> None:
    await client.post("/v1/events", json=settled("p1", fee="0.01"))
    response = await client.post("/v1/events", json=settled("p1", fee="0.09"))
    assert response.status == 409
    body = await response.json()
    assert body["rejected"][0]["error"].startswith("conflict:")
    assert rejected_count(registry, "conflict") == 1
    assert dead_letters(client, "conflict")[0][0] == "conflict"


async def test_unsupported_content_type_is_415(
    client: AppClient, registry: CollectorRegistry
) -> None:
    response = await client.post(
        "/v1/events", data=b"type=x", headers={"Content-Type": "text/plain"}
    )
    assert response.status == 415
    assert "application/x-ndjson" in (await response.json())["error"]
    assert rejected_count(registry, "unsupported_media_type") == 1
    assert dead_letters(client)[0][2] == b"type=x"


async def test_unsupported_content_encoding_is_415(client: AppClient) -> None:
    response = await client.post(
        "/v1/events", data=b"{}", headers={**JSON, "Content-Encoding": "br"}
    )
    assert response.status == 415


async def test_bad_gzip_is_400(client: AppClient) -> None:
    response = await client.post(
        "/v1/events", data=b"\x1f\x8b not gzip", headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert response.status == 400
    assert "not valid gzip" in (await response.json())["error"]


@pytest.fixture
def small_limits(data_dir: Path) -> Settings:
    """Settings with tiny limits."""
    return Settings(data_dir=data_dir, max_body_bytes=2048, max_batch_events=3)


async def test_limits(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    small_limits: Settings,
    registry: CollectorRegistry,
) -> None:
    client = await aiohttp_client(create_app(small_limits, registry))
    too_many = await client.post("/v1/events", json=[received(f"p{i}") for i in range(4)])
    assert too_many.status == 413
    assert "4 events in one request; the limit is 3" in (await too_many.json())["error"]

    too_big = await client.post("/v1/events", data=b"[" + b" " * 4096 + b"]", headers=JSON)
    assert too_big.status == 413
    assert "over the limit of 2048 bytes" in (await too_big.json())["error"]

    bomb = gzip.compress(b"[" + b" " * 1_000_000 + b"]")
    assert len(bomb) < 2048
    response = await client.post(
        "/v1/events", data=bomb, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert response.status == 413
    assert "decodes to more than the limit" in (await response.json())["error"]
    assert rejected_count(registry, "too_large") == 3


async def test_a_chunked_body_is_refused_at_the_limit_while_it_still_arrives(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    small_limits: Settings,
    registry: CollectorRegistry,
) -> None:
    # The body never ends (no last chunk), so the receiver reads it as it arrives and
    # must refuse it once it passes the limit rather than wait for the rest.
    client = await aiohttp_client(create_app(small_limits, registry))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        piece = b"[" + b" " * 2999
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(piece) + piece + b"\r\n"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 413"), status
    finally:
        writer.close()
    assert rejected_count(registry, "too_large") == 1


async def test_backlog_over_limit_is_503_with_retry_after(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    tmp_path: Path,
    registry: CollectorRegistry,
) -> None:
    # No forwarder here, so the backlog stays where the test puts it.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    receiver = Receiver(committer, Metrics(registry), IngestLimits(1 << 20, 100, 2), None)
    app = web.Application()
    app.router.add_post("/v1/events", receiver.handle)
    client = await aiohttp_client(app)
    try:
        first = await client.post("/v1/events", json=[received("p1"), received("p2")])
        assert first.status == 202
        assert ledger.backlog == 2
        refused = await client.post("/v1/events", json=received("p3"))
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "30"
        assert "backlog" in (await refused.json())["error"]
        assert ledger.stats().events == 2
    finally:
        committer.close()
        ledger.close()


@pytest.fixture
def with_token(data_dir: Path) -> Settings:
    """Settings requiring a bearer token."""
    return Settings(data_dir=data_dir, ingest_token="s3cret-token")


async def test_bearer_token_is_required_when_configured(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    with_token: Settings,
) -> None:
    client = await aiohttp_client(create_app(with_token))
    missing = await client.post("/v1/events", json=received("p1"))
    wrong = await client.post(
        "/v1/events", json=received("p1"), headers={"Authorization": "Bearer nope"}
    )
    right = await client.post(
        "/v1/events", json=received("p1"), headers={"Authorization": "Bearer s3cret-token"}
    )
    assert (missing.status, wrong.status, right.status) == (401, 401, 202)
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await missing.json())["error"] == "missing or wrong bearer token"
    metrics = await client.get("/metrics")  # open without a token
    assert metrics.status == 200


@pytest.mark.parametrize("listen", ["0.0.0.0:9402", "[::]:9402", "192.0.2.10:9402"])
def test_non_loopback_listen_without_token_refuses_to_start(listen: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(listen=listen)
    assert "EXPORTER_INGEST_TOKEN" in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:9402", "[::1]:9402", "localhost:9402"])
def test_loopback_listen_needs_no_token(listen: str) -> None:
    assert Settings(listen=listen).listen == listen


def test_non_loopback_listen_with_token_is_allowed() -> None:
    assert Settings(listen="0.0.0.0:9402", ingest_token="t" * 16).host == "0.0.0.0"


async def test_failed_unknown_payment_is_accepted(client: AppClient) -> None:
    response = await client.post("/v1/events", json=failed("unknown"))
    assert response.status == 202


async def test_deeply_nested_json_is_400_not_a_crash(client: AppClient) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]"):
        response = await client.post("/v1/events", data=body, headers=JSON)
        assert response.status in (400, 422)
    nested = b'{"type":"payment:received","data":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = await client.post("/v1/events", data=nested, headers=NDJSON)
    assert response.status in (400, 422)


async def test_lone_surrogate_escape_is_refused_not_stored(client: AppClient) -> None:
    event = json.dumps(received("p1")).replace("p1", "\\ud800").encode()
    for headers in (JSON, NDJSON):
        response = await client.post("/v1/events", data=event, headers=headers)
        assert response.status == 400
    assert client.app[COMMITTER].ledger.stats().events == 0


async def test_array_with_one_invalid_item_keeps_the_others(client: AppClient) -> None:
    body = [received("p1"), {"type": "payment:received"}, [1]]
    response = await client.post("/v1/events", json=body)
    assert response.status == 202
    answer = await response.json()
    assert answer["accepted"] == 1
    assert [(r["index"], r["error"]) for r in answer["rejected"]] == [
        (1, "data: field required"),
        (2, "event: must be a JSON object, got list"),
    ]


async def test_chunked_body_is_read_within_the_limit(
    aiohttp_client: Callable[..., Awaitable[AppClient]], small_limits: Settings
) -> None:
    client = await aiohttp_client(create_app(small_limits))

    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    event = json.dumps(received("p1")).encode()
    fits = await client.post("/v1/events", data=chunks(event[:10], event[10:]), headers=JSON)
    assert fits.status == 202
    over = await client.post("/v1/events", data=chunks(b"[", b" " * 3000, b"]"), headers=JSON)
    assert over.status == 413


async def test_a_ledger_that_cannot_commit_is_a_503_and_one_log_line_naming_the_cause(
    client: AppClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="exporter.ingest.receiver")
    with refusing_inserts(settings.ledger_path, "events"):
        response = await client.post("/v1/events", json=[received("p1")])
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert (await response.json())["error"] == (
        "the ledger cannot commit right now (disk full or I/O error); retry later"
    )
    [record] = [r for r in caplog.records if r.name == "exporter.ingest.receiver"]
    assert record.getMessage() == "ingest refused: ledger cannot commit"
    assert "database or disk is full" in vars(record)["error"]


_CONFLICT = (
    "conflict: a stored event has the same key with a different body, or its payment has "
    "already ended"
)


async def test_conflicts_are_a_409_worded_for_one_event_or_every_event(
    client: AppClient, registry: CollectorRegistry
) -> None:
    assert (await client.post("/v1/events", json=[settled("p1"), settled("p2")])).status == 202
    single = await client.post("/v1/events", json=settled("p1", fee="0.99"))
    assert single.status == 409
    assert await single.json() == {
        "accepted": 0,
        "duplicates": 0,
        "rejected": [{"index": 0, "error": _CONFLICT}],
        "error": "the event conflicts with a stored one",
    }
    both = await client.post(
        "/v1/events", json=[settled("p2", fee="0.9"), settled("p1", fee="0.9")]
    )
    assert both.status == 409
    assert (await both.json())["error"] == "every event conflicts with a stored one"
    assert rejected_count(registry, "conflict") == 3
    assert rejected_count(registry, "invalid") == 0


async def test_invalid_and_conflicting_items_are_counted_each_under_its_reason(
    client: AppClient, registry: CollectorRegistry
) -> None:
    assert (await client.post("/v1/events", json=settled("p1"))).status == 202
    body = [settled("p1", fee="0.99"), {"type": "nope"}, received("p3"), {"type": "nope"}]
    response = await client.post("/v1/events", json=body)
    assert response.status == 202
    answer = await response.json()
    assert [r["index"] for r in answer["rejected"]] == [0, 1, 3]
    assert (rejected_count(registry, "invalid"), rejected_count(registry, "conflict")) == (2, 1)


async def test_an_array_after_leading_whitespace_is_read_as_an_array(client: AppClient) -> None:
    body = b" \n\t" + json.dumps([received("p1"), received("p2")]).encode()
    response = await client.post(
        "/v1/events", data=body, headers={"Content-Type": "application/json"}
    )
    assert (response.status, (await response.json())["accepted"]) == (202, 2)


async def test_a_batch_at_the_event_limit_is_accepted_and_one_more_kept_as_too_large(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", max_batch_events=2)
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    at_limit = await client.post("/v1/events", json=[received("p1"), received("p2")])
    assert at_limit.status == 202
    over = json.dumps([received("p3"), received("p4"), received("p5")]).encode()
    response = await client.post(
        "/v1/events", data=over, headers={"Content-Type": "application/json"}
    )
    assert response.status == 413
    assert dead_letters(client, "too_large") == [
        ("too_large", "3 events in one request; the limit is 2", over)
    ]


async def test_an_unsupported_content_type_is_a_415_kept_with_its_size(client: AppClient) -> None:
    body = json.dumps(received("p1")).encode()
    response = await client.post("/v1/events", data=body, headers={"Content-Type": "text/plain"})
    assert response.status == 415
    assert response.headers.get("Connection", "").lower() != "close"  # the body was all read
    assert (await response.json())["error"] == (
        "unsupported Content-Type 'text/plain': send application/json (an event or an array "
        "of events) or application/x-ndjson"
    )
    [letter] = client.app[COMMITTER].ledger.dead_letters("unsupported_media_type")
    assert (letter.raw, letter.raw_size) == (body, len(body))


async def test_a_malformed_array_is_a_400_kept_whole(client: AppClient) -> None:
    body = b'[{"type": "payment:received"},'
    response = await client.post(
        "/v1/events", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"].startswith("body is not valid JSON: ")
    assert [(reason, raw) for reason, _, raw in dead_letters(client)] == [("malformed", body)]
