"""Per-connection body limits apply before buffering: a declared body over the limit is
refused from its Content-Length without reading any of it (and without inviting it with
``100 Continue``), a chunked body stops being read at the limit, and either way the
answer says ``Connection: close`` (the server discards what still arrives for a moment,
so that the client reads the answer, and keeps none of it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import AppClient, async_wait_until, received
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER, RECEIVER

MiB = 1024 * 1024
ClientFactory = Callable[..., Awaitable[AppClient]]
JSON_HEADERS = {"Content-Type": "application/json"}
HEAD = b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


@pytest.fixture
async def client(aiohttp_client: ClientFactory, data_dir: Path) -> AppClient:
    """An exporter with a 1 MiB body limit."""
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", max_body_bytes=MiB)
    return await aiohttp_client(create_app(settings))


async def _answer(reader: asyncio.StreamReader, within: float) -> tuple[bytes, bytes]:
    """The status line and the headers of the next answer."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
    status, _, headers = head.partition(b"\r\n")
    return status, headers


async def test_a_declared_body_over_the_limit_is_refused_before_any_of_it_is_sent(
    client: AppClient,
) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        # Headers only: the 413 must not wait for a single byte of the 100 MiB announced.
        writer.write(HEAD + b"Content-Length: 104857600\r\n\r\n")
        await writer.drain()
        status, headers = await _answer(reader, 5)
        assert status.startswith(b"HTTP/1.1 413"), status
        assert b"Connection: close" in headers
    finally:
        writer.close()
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.reason, letter.raw) == ("too_large", b"")
    assert "body of 104857600 bytes is over the limit of 1048576 bytes" in letter.error


async def test_expect_100_continue_is_not_granted_to_a_body_over_the_limit(
    client: AppClient,
) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(HEAD + b"Expect: 100-continue\r\nContent-Length: 2097152\r\n\r\n")
        await writer.drain()
        status, _ = await _answer(reader, 5)
        assert status.startswith(b"HTTP/1.1 413"), status  # and not "100 Continue"
    finally:
        writer.close()


async def test_expect_100_continue_is_granted_within_the_limit(client: AppClient) -> None:
    body = json.dumps(received("p-expect")).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(HEAD + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        status, _ = await _answer(reader, 5)
        assert status.startswith(b"HTTP/1.1 100"), status
        writer.write(body)
        await writer.drain()
        status, _ = await _answer(reader, 5)
        assert status.startswith(b"HTTP/1.1 202"), status
    finally:
        writer.close()
    assert client.app[COMMITTER].ledger.stats().events == 1


async def test_a_chunked_body_is_cut_off_at_the_limit_and_the_connection_closed(
    client: AppClient,
) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"[" * (256 * 1024)
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent = 0

    async def send_forever() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while sent < 256 * MiB:
                writer.write(framed)
                await writer.drain()
                sent += len(chunk)

    sending = asyncio.create_task(send_forever())
    try:
        status, headers = await _answer(reader, 10)
        assert status.startswith(b"HTTP/1.1 413"), status
        assert b"Connection: close" in headers
        assert not sending.done()  # the answer came while the client was still sending
    finally:
        sending.cancel()
        writer.close()
    # Past the limit, only what socket buffers held was sent: the body was not drained.
    assert sent < 64 * MiB, sent
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert letter.reason == "too_large"
    assert len(letter.raw) == 64 * 1024 and letter.raw_size is not None
    assert MiB < letter.raw_size <= MiB + 256 * 1024  # read up to the limit, no further


async def test_proxy_mode_does_not_invite_a_body_over_its_limit(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        upstream_facilitator="http://127.0.0.1:9",  # never reached: refused before
        proxy_max_request_bytes=MiB,
    )
    client = await aiohttp_client(create_app(settings))
    for path in (b"/settle", b"/anything/else"):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            writer.write(
                b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                b"Content-Length: 2097152\r\n\r\n"
            )
            await writer.drain()
            status, _ = await _answer(reader, 5)
            assert status.startswith(b"HTTP/1.1 413"), (path, status)
        finally:
            writer.close()


async def test_bodies_in_flight_are_bounded_across_connections(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    """Two slow senders each holding a declared 1 MiB body fill a 2 MiB budget: a third
    request is answered 503 with Retry-After before its body is read, and counted; once
    the slow ones are gone, the budget is free again."""
    registry = CollectorRegistry()
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        max_body_bytes=MiB,
        max_inflight_body_bytes=2 * MiB,
    )
    client = await aiohttp_client(create_app(settings, registry))
    held = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(HEAD + f"Content-Length: {MiB}\r\n\r\n".encode() + b"[")
        await writer.drain()
        held.append((reader, writer))
    receiver = client.app[RECEIVER]
    await async_wait_until(
        lambda: _true(receiver.inflight.held == 2 * MiB), what="both bodies in flight"
    )
    event = received("busy-1")
    busy = await client.post("/v1/events", data=json.dumps(event), headers=JSON_HEADERS)
    assert busy.status == 503
    assert busy.headers["Retry-After"] == "1"
    assert "EXPORTER_MAX_INFLIGHT_BODY_BYTES" in (await busy.json())["error"]
    assert registry.get_sample_value("exporter_ingest_busy_total") == 1.0
    assert client.app[COMMITTER].ledger.dead_letters() == []
    for _, writer in held:
        writer.close()
    await async_wait_until(lambda: _true(receiver.inflight.held == 0), what="budget returned")
    accepted = await client.post("/v1/events", data=json.dumps(event), headers=JSON_HEADERS)
    assert accepted.status == 202, await accepted.text()


async def _true(value: bool) -> bool:
    return value


def test_the_inflight_budget_must_hold_a_gzipped_body_of_the_largest_size(data_dir: Path) -> None:
    """A budget below twice the body limit could never admit a largest gzipped body."""
    with pytest.raises(ValueError, match="EXPORTER_MAX_INFLIGHT_BODY_BYTES"):
        Settings(data_dir=data_dir, max_body_bytes=MiB, max_inflight_body_bytes=MiB)
