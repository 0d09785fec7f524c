"""How ``POST /v1/events`` reads a body, decodes it, and what it keeps of a refused one.

A refusal answered before the whole body has come (an unsupported Content-Type, a declared
size over the limit, a stalled sender) says ``Connection: close`` and the server closes the
connection once the client stops sending: the unread rest would otherwise be taken for the
next request. Tests of that speak HTTP over a real TCP connection, so that the body can be
held back while the handler answers. A gzip body is decoded up to the limit and no further,
in bytes answered and in memory held; a refused one is kept as it was sent. Refusals that
cannot be kept (an unverified sender, a ledger that cannot write) say so in one log line.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import AppClient, async_wait_until, free_port, received
from hooks_helpers import start_on
from ledger_faults import refusing_inserts
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER, RECEIVER
from exporter.ingest.receiver import IngestLimits, Receiver
from exporter.ingest.signing import SIGNATURE_HEADER
from exporter.ledger import GroupCommitter, Ledger
from exporter.metrics import Metrics

ClientFactory = Callable[..., Awaitable[AppClient]]
KiB = 1024
MiB = 1024 * KiB
LIMIT = 64 * KiB
GZIP_JSON = {"Content-Type": "application/json", "Content-Encoding": "gzip"}


@pytest.fixture
async def client(aiohttp_client: ClientFactory, data_dir: Path) -> AppClient:
    """An exporter with a 64 KiB body limit and a body read timeout long enough that no
    test here meets it."""
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        max_body_bytes=LIMIT,
        body_read_timeout_seconds=20.0,
    )
    return await aiohttp_client(create_app(settings))


async def _answer(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, bytes, bytes]:
    """The status, the raw header block and the body of the next answer."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, _, headers = head.partition(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in headers.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
    return int(status_line.split()[1]), headers, body


async def _closed(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True once the server closed the connection (EOF)."""
    async with asyncio.timeout(within):
        while await reader.read(65536):
            pass
    return True


def _head(content_type: bytes, length: int) -> bytes:
    return (
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: %d\r\n\r\n" % length
    )


async def test_a_415_answered_while_the_body_arrives_closes_the_connection(
    client: AppClient,
) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        first = b"not json, and more to come"
        writer.write(_head(b"text/plain", 4 * KiB) + first)
        await writer.drain()
        status, headers, body = await _answer(reader)
        assert status == 415, body
        assert b"Connection: close" in headers.split(b"\r\n")
        assert b"unsupported Content-Type 'text/plain'" in body
        # The rest of the body is discarded, then the connection ends: nothing of it is
        # read as another request.
        writer.write(b"x" * (4 * KiB - len(first)))
        await writer.drain()
        assert await _closed(reader)
    finally:
        writer.close()
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert letter.reason == "unsupported_media_type"
    assert first.startswith(letter.raw) and letter.raw
    assert letter.raw_size == 4 * KiB


async def test_a_415_whose_body_never_comes_is_answered_after_the_read_timeout(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", body_read_timeout_seconds=0.2)
    client = await aiohttp_client(create_app(settings))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(_head(b"text/plain", 100))  # and not a byte of the body
        await writer.drain()
        status, headers, _ = await _answer(reader)
        assert status == 415
        assert b"Connection: close" in headers.split(b"\r\n")
    finally:
        writer.close()
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.reason, letter.raw, letter.raw_size) == ("unsupported_media_type", b"", 100)


# ------------------------------------------------------------------------------ gzip


def _event_of_size(size: int) -> bytes:
    """One valid event as JSON, padded with trailing blanks to exactly ``size`` bytes."""
    event = json.dumps(received("p-gzip-size")).encode()
    return event + b" " * (size - len(event))


async def test_a_gzip_body_may_decode_to_exactly_the_limit(client: AppClient) -> None:
    response = await client.post(
        "/v1/events", data=gzip.compress(_event_of_size(LIMIT)), headers=GZIP_JSON
    )
    assert response.status == 202, await response.text()
    assert (await response.json())["accepted"] == 1


async def test_a_gzip_body_one_byte_over_the_limit_is_a_413_kept_as_sent(
    client: AppClient,
) -> None:
    sent = gzip.compress(_event_of_size(LIMIT + 1))
    response = await client.post("/v1/events", data=sent, headers=GZIP_JSON)
    assert response.status == 413
    assert (await response.json())["error"] == (
        f"gzip body decodes to more than the limit of {LIMIT} bytes"
    )
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.reason, letter.raw) == ("too_large", sent)
    assert client.app[COMMITTER].ledger.stats().events == 0


async def test_a_truncated_gzip_body_is_a_400_kept_as_sent(client: AppClient) -> None:
    whole = gzip.compress(json.dumps(received("p-truncated")).encode())
    sent = whole[:-4]  # the last bytes of the trailer never came
    response = await client.post("/v1/events", data=sent, headers=GZIP_JSON)
    assert response.status == 400
    assert (await response.json())["error"] == "body is not valid gzip: truncated gzip stream"
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.reason, letter.raw) == ("malformed", sent)


async def test_a_zlib_stream_sent_as_gzip_is_a_400(client: AppClient) -> None:
    """Content-Encoding: gzip means the gzip format: a bare zlib stream of a valid event
    (what ``deflate`` senders produce) is not read as one."""
    sent = zlib.compress(json.dumps(received("p-zlib")).encode())
    response = await client.post("/v1/events", data=sent, headers=GZIP_JSON)
    assert response.status == 400
    assert (await response.json())["error"].startswith("body is not valid gzip: ")
    assert client.app[COMMITTER].ledger.stats().events == 0


async def test_too_many_gzip_members_are_a_413_kept_as_sent(client: AppClient) -> None:
    sent = gzip.compress(b"", mtime=0) * 1001
    response = await client.post("/v1/events", data=sent, headers=GZIP_JSON)
    assert response.status == 413
    assert (await response.json())["error"] == (
        "gzip body holds more than 1000 members (concatenated gzip files)"
    )
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.reason, letter.raw) == ("too_large", sent)


async def test_a_gzip_body_is_never_decoded_past_the_limit_in_memory(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    """A first member that decodes to nearly the limit leaves the next one (a bomb of 64
    MiB) only what remains of the limit: the bytes held stay within a small multiple of
    the limit, never the bomb's size."""
    limit = 4 * MiB
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", max_body_bytes=limit)
    client = await aiohttp_client(create_app(settings))
    encoder = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(encoder.compress(bytes(MiB)) for _ in range(64)) + encoder.flush()
    sent = gzip.compress(b" " * (limit - 16), compresslevel=9) + bomb
    tracemalloc.start()
    try:
        response = await client.post("/v1/events", data=sent, headers=GZIP_JSON)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 413
    assert peak < 3 * limit, f"{peak} bytes held at peak"


# ------------------------------------------------------------ refusals that keep nothing


async def test_an_unsigned_refusal_is_counted_and_logged_once_without_its_body(
    aiohttp_client: ClientFactory,
    data_dir: Path,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="exporter.ingest.receiver")
    settings = Settings(
        data_dir=data_dir, listen="127.0.0.1:0", ingest_signing_secret="whsec_rules-5e1d"
    )
    client = await aiohttp_client(create_app(settings, registry))
    response = await client.post("/v1/events", json=received("p-unsigned"))
    assert response.status == 401
    [record] = [r for r in caplog.records if r.name == "exporter.ingest.receiver"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "ingest refused without a signature over its body and headers; body not kept"
    )
    fields = vars(record)
    assert (fields["reason"], fields["status"], fields["remote"]) == (
        "bad_signature",
        401,
        "127.0.0.1",
    )
    assert fields["error"].startswith(f"missing {SIGNATURE_HEADER} header")
    assert (
        registry.get_sample_value("exporter_events_rejected_total", {"reason": "bad_signature"})
        == 1.0
    )
    assert client.app[COMMITTER].ledger.dead_letters() == []


async def test_a_dead_letter_the_ledger_cannot_write_is_answered_and_logged(
    aiohttp_client: ClientFactory,
    data_dir: Path,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="exporter.ingest.receiver")
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0")
    client = await aiohttp_client(create_app(settings, registry))
    with refusing_inserts(settings.ledger_path, "dead_letters"):
        response = await client.post(
            "/v1/events", data=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert response.status == 400
    assert (await response.json())["error"].startswith("body is not valid JSON: ")
    [record] = [r for r in caplog.records if r.name == "exporter.ingest.receiver"]
    assert record.getMessage() == "dead letter not stored"
    assert vars(record)["reason"] == "malformed"
    assert "database or disk is full" in vars(record)["error"]
    assert (
        registry.get_sample_value("exporter_events_rejected_total", {"reason": "malformed"}) == 1.0
    )
    assert client.app[COMMITTER].ledger.dead_letters() == []


# ------------------------------------------------------------------ Expect: 100-continue


async def test_expect_100_continue_is_granted_to_a_body_of_exactly_the_limit(
    client: AppClient,
) -> None:
    body = _event_of_size(LIMIT)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            _head(b"application/json", len(body)).replace(
                b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"
            )
        )
        await writer.drain()
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        status, _, answer = await _answer(reader)
        assert status == 202, answer
    finally:
        writer.close()
    assert client.app[COMMITTER].ledger.stats().events == 1


async def test_an_unknown_expectation_is_a_417_naming_it(client: AppClient) -> None:
    expectation = b"x-ask-for-" + b"more" * 20  # 90 characters: the answer shows 40
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            _head(b"application/json", 2).replace(
                b"\r\n\r\n", b"\r\nExpect: " + expectation + b"\r\n\r\n"
            )
        )
        await writer.drain()
        status, _, answer = await _answer(reader)
    finally:
        writer.close()
    assert status == 417
    assert answer == b"unknown Expect: " + expectation[:40]
    assert client.app[COMMITTER].ledger.stats().events == 0


# ----------------------------------------------------------------------- the answers


async def test_answers_are_json_in_utf_8(client: AppClient) -> None:
    accepted = await client.post("/v1/events", json=received("p-charset"))
    refused = await client.post(
        "/v1/events", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert (accepted.status, refused.status) == (202, 400)
    for response in (accepted, refused):
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"


async def test_a_full_backlog_is_a_503_naming_its_limit(
    aiohttp_client: ClientFactory, tmp_path: Path, registry: CollectorRegistry
) -> None:
    # No forwarder here, so the backlog stays where the test puts it.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    receiver = Receiver(committer, Metrics(registry), IngestLimits(LIMIT, 100, 1), None)
    app = web.Application()
    app.router.add_post("/v1/events", receiver.handle)
    client = await aiohttp_client(app)
    try:
        assert (await client.post("/v1/events", json=received("p-backlog-1"))).status == 202
        refused = await client.post("/v1/events", json=received("p-backlog-2"))
        assert refused.status == 503
        assert await refused.json() == {
            "accepted": 0,
            "duplicates": 0,
            "rejected": [],
            "error": "store backlog is over its limit of 1 events; retry later",
        }
        assert ledger.stats().events == 1
    finally:
        committer.close()
        ledger.close()


# ----------------------------------------------------------------- reading the body


async def test_an_empty_content_encoding_and_x_gzip_are_read(client: AppClient) -> None:
    event = json.dumps(received("p-encodings-1")).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            _head(b"application/json", len(event)).replace(
                b"\r\n\r\n", b"\r\nContent-Encoding: \r\n\r\n"
            )
            + event
        )
        await writer.drain()
        status, _, answer = await _answer(reader)
        assert status == 202, answer
    finally:
        writer.close()
    x_gzip = await client.post(
        "/v1/events",
        data=gzip.compress(json.dumps(received("p-encodings-2")).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "x-gzip"},
    )
    assert x_gzip.status == 202, await x_gzip.text()
    assert client.app[COMMITTER].ledger.stats().events == 2


async def test_an_unsupported_content_encoding_is_a_415_counted_and_kept(
    aiohttp_client: ClientFactory, data_dir: Path, registry: CollectorRegistry
) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0")
    client = await aiohttp_client(create_app(settings, registry))
    sent = json.dumps(received("p-brotli")).encode()
    response = await client.post(
        "/v1/events",
        data=sent,
        headers={"Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert response.status == 415
    assert (await response.json())["error"] == (
        "unsupported Content-Encoding 'br': send gzip or no encoding"
    )
    assert (
        registry.get_sample_value(
            "exporter_events_rejected_total", {"reason": "unsupported_media_type"}
        )
        == 1.0
    )
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.reason, letter.raw) == ("unsupported_media_type", sent)


async def test_a_body_that_came_whole_may_be_exactly_the_limit(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    limit = 512  # small enough to arrive with the headers
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", max_body_bytes=limit)
    client = await aiohttp_client(create_app(settings))
    json_headers = {"Content-Type": "application/json"}
    fits = await client.post("/v1/events", data=_event_of_size(limit), headers=json_headers)
    assert fits.status == 202, await fits.text()
    over = await client.post("/v1/events", data=_event_of_size(limit + 1), headers=json_headers)
    assert over.status == 413


async def test_a_chunked_body_over_the_limit_is_refused_naming_it_and_kept_as_it_came(
    client: AppClient,
) -> None:
    pieces = [b"[" + b" " * (40 * KiB - 1), b" " * (40 * KiB)]
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for piece in pieces:
            writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            await writer.drain()
            # Apart, so that the receiver reads them as two pieces of the body.
            await asyncio.sleep(0.2)
        status, headers, answer = await _answer(reader)
    finally:
        writer.close()
    assert status == 413
    assert b"Connection: close" in headers.split(b"\r\n")
    assert json.loads(answer)["error"] == f"body is over the limit of {LIMIT} bytes"
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert letter.reason == "too_large"
    assert letter.raw == b"".join(pieces)[: len(letter.raw)] and len(letter.raw) == 64 * KiB


async def test_a_busy_503_says_why_and_closes_the_connection(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    """Two held bodies fill the budget; a third request, its body still arriving, is
    answered 503 naming the setting, and its connection ends once the client stops."""
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        max_body_bytes=LIMIT,
        max_inflight_body_bytes=2 * LIMIT,
        body_read_timeout_seconds=20.0,
    )
    client = await aiohttp_client(create_app(settings))
    held = []
    for _ in range(2):
        held.append(await asyncio.open_connection(client.host, client.port))
        held[-1][1].write(_head(b"application/json", LIMIT) + b"[")
        await held[-1][1].drain()
    receiver = client.app[RECEIVER]

    async def full() -> bool:
        return bool(receiver.inflight.held == 2 * LIMIT)

    await async_wait_until(full, what="both bodies in flight")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(_head(b"application/json", 100) + b"[")
        await writer.drain()
        status, headers, answer = await _answer(reader)
        assert status == 503
        assert {b"Retry-After: 1", b"Connection: close"} <= set(headers.split(b"\r\n"))
        assert json.loads(answer)["error"] == (
            "too many request bodies in flight (EXPORTER_MAX_INFLIGHT_BODY_BYTES); retry shortly"
        )
        writer.write(b" " * 99)
        await writer.drain()
        assert await _closed(reader)
    finally:
        writer.close()
        for _, held_writer in held:
            held_writer.close()


def test_a_malformed_chunk_mid_body_is_a_400_that_keeps_what_came(tmp_path: Path) -> None:
    # aiohttp's pure-Python parser (chosen by AIOHTTP_NO_EXTENSIONS, or where its C parser
    # is not built) fails the body stream on a broken chunk; that must be a refusal, not a 500.
    token = "t" * 24
    exporter = start_on(
        free_port(),
        tmp_path / "data",
        tmp_path / "exporter.log",
        AIOHTTP_NO_EXTENSIONS="1",
        EXPORTER_INGEST_TOKEN=token,
    )
    try:
        head = (
            "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n"
        )

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", exporter.port)
            writer.write(head.encode())
            await writer.drain()
            await asyncio.sleep(0.2)  # the handler is reading the body when the bad chunk comes
            writer.write(b"zz\r\n1}\r\n0\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return answer

        answer = asyncio.run(exchange())
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 400 Bad Request", answer
        assert b"Connection: close" in rest
        body = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert body["error"] == "the body's chunked framing is malformed after 5 bytes"
        rejected = exporter.metric("exporter_events_rejected_total")
        assert sum(rejected.values()) == 1
    finally:
        exporter.terminate()
    ledger = Ledger(tmp_path / "data" / "ledger.sqlite3")
    try:
        (letter,) = ledger.dead_letters()
    finally:
        ledger.close()
    assert letter.reason == "malformed" and letter.raw == b'{"a":'
