"""Hostile input to ``POST /v1/events`` and to the server: every answer is a clear 4xx,
every refused body is kept as a dead letter, and slow or idle clients are let go.

Bodies: deep nesting, huge numbers, invalid UTF-8, NUL bytes, a 10 MB string, gzip
bombs. Connections: a body that dribbles (or stops) after its headers, headers that never
finish, and thousands of idle sockets beside a normal request.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import resource
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import AppClient, async_wait_until, in_ci, received

from exporter import Settings, create_app
from exporter.analytics.models import ANALYTIC_NAMES
from exporter.app import COMMITTER
from exporter.cli.serve import raise_open_file_limit
from exporter.ledger import DeadLetterRow

JSON = {"Content-Type": "application/json"}
MiB = 1024 * 1024
ClientFactory = Callable[..., Awaitable[AppClient]]


def _letters(client: AppClient) -> list[DeadLetterRow]:
    return list(reversed(client.app[COMMITTER].ledger.dead_letters()))


def _event_with(field: str, literal: str) -> bytes:
    """A payment:received whose ``data.<field>`` is the JSON text ``literal``."""
    event = received("p-hostile")
    event["data"][field] = "@@"
    return json.dumps(event).replace('"@@"', literal).encode()


async def _refused(
    client: AppClient,
    body: bytes,
    status: int,
    reason: str,
    headers: dict[str, str] = JSON,
    kept: bytes | None = None,
) -> dict[str, Any]:
    """POST ``body``, expect ``status`` and a dead letter of ``reason`` holding the body
    (or ``kept``: the decoded body, when JSON inside gzip is refused)."""
    before = len(_letters(client))
    response = await client.post("/v1/events", data=io.BytesIO(body), headers=headers)
    answer: dict[str, Any] = await response.json()
    assert response.status == status, answer
    assert (answer["accepted"], answer["duplicates"]) == (0, 0)
    letters = _letters(client)
    assert len(letters) == before + 1
    assert letters[-1].reason == reason
    assert (body if kept is None else kept).startswith(letters[-1].raw[:1024])
    return answer


@pytest.fixture
def roomy(data_dir: Path) -> Settings:
    """A 16 MiB body limit, so that a 10 MB string is within it."""
    return Settings(data_dir=data_dir, listen="127.0.0.1:0", max_body_bytes=16 * MiB)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[" + json.dumps(received("p1")).encode() + b"," + b"[" * 100_000 + b"]" * 100_000 + b"]",
        _event_with("extra", "[" * 100_000 + "]" * 100_000),
    ],
    ids=["array", "object", "array-item", "inside-an-event"],
)
async def test_deep_nesting_is_a_400(client: AppClient, body: bytes) -> None:
    answer = await _refused(client, body, 400, "malformed")
    assert "recursion limit exceeded" in answer["error"]


async def test_deep_nesting_in_an_ndjson_line_is_a_400_naming_the_line(client: AppClient) -> None:
    body = json.dumps(received("p1")).encode() + b"\n" + b"[" * 100_000 + b"]" * 100_000
    answer = await _refused(
        client, body, 400, "malformed", {"Content-Type": "application/x-ndjson"}
    )
    assert answer["error"].startswith("line 2 is not valid JSON: recursion limit exceeded")
    assert answer["rejected"][0]["index"] == 1


@pytest.mark.parametrize(
    ("field", "literal", "message"),
    [
        ("amount", "1e400", "data.amount: Input should be a valid string"),
        ("amount", "1" + "0" * 4000, "data.amount: Input should be a valid string"),
        ("timestamp", "1e400", "data.timestamp: Input should be a valid integer"),
        ("timestamp", "-1e400", "data.timestamp: Input should be a valid integer"),
        ("timestamp", "1" + "0" * 4000, "data.timestamp: must not be more than a day in the"),
        ("timestamp", "-" + "9" * 4000, "data.timestamp: must be Unix epoch milliseconds"),
    ],
)
async def test_huge_numbers_are_a_422_naming_the_field(
    client: AppClient, field: str, literal: str, message: str
) -> None:
    answer = await _refused(client, _event_with(field, literal), 422, "invalid")
    assert answer["rejected"][0]["error"].startswith(message)


@pytest.mark.parametrize("field", ["amount", "timestamp"])
async def test_integers_past_the_parsers_limit_are_a_400_with_the_position(
    client: AppClient, field: str
) -> None:
    """Past 4,300 digits (CPython's int conversion limit too) the literal is not parsed:
    the error gives its position, since no field has a value yet."""
    body = _event_with(field, "1" + "0" * 5000)
    answer = await _refused(client, body, 400, "malformed")
    column = body.index(b"1" + b"0" * 5000)
    assert answer["error"].startswith("body is not valid JSON: number out of range at line 1")
    assert int(answer["error"].rsplit(" ", 1)[1]) > column


@pytest.mark.parametrize(
    "bad",
    [b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"],
    ids=bytes.hex,  # plain ids: a repr's backslashes are not found again in a second run
)
async def test_invalid_utf8_is_a_400(client: AppClient, bad: bytes) -> None:
    body = json.dumps(received("pZZ")).encode().replace(b"ZZ", bad)
    answer = await _refused(client, body, 400, "malformed")
    assert "invalid unicode code point" in answer["error"]


async def test_invalid_utf8_in_ndjson_is_a_400(client: AppClient) -> None:
    body = json.dumps(received("pZZ")).encode().replace(b"ZZ", b"\xff")
    answer = await _refused(
        client, body, 400, "malformed", {"Content-Type": "application/x-ndjson"}
    )
    assert answer["error"].startswith("line 1 is not valid JSON: invalid unicode code point")


async def test_nul_bytes(client: AppClient) -> None:
    escaped = await _refused(client, json.dumps(received("p\x00q")).encode(), 422, "invalid")
    assert escaped["rejected"][0]["error"].startswith(
        "data.paymentId: must be a non-empty id without control characters"
    )
    raw = json.dumps(received("pZq")).encode().replace(b"Z", b"\x00")
    literal = await _refused(client, raw, 400, "malformed")
    assert "control character" in literal["error"]


async def test_a_10_mb_string_within_the_limit_is_a_422(
    aiohttp_client: ClientFactory, roomy: Settings
) -> None:
    client = await aiohttp_client(create_app(roomy))
    body = json.dumps(received("x" * 10_000_000)).encode()
    answer = await _refused(client, body, 422, "invalid")
    assert answer["rejected"][0]["error"] == (
        "data.paymentId: String should have at most 256 characters"
    )


async def test_a_10_mb_string_over_the_limit_is_a_413(client: AppClient) -> None:
    body = json.dumps(received("x" * 10_000_000)).encode()
    answer = await _refused(client, body, 413, "too_large")
    assert answer["error"] == f"body of {len(body)} bytes is over the limit of {8 * MiB} bytes"
    # Refused from its Content-Length before any of it is read: nothing of it is kept.
    assert _letters(client)[-1].raw == b""


def _gzip_of_zeros(size: int) -> bytes:
    encoder = zlib.compressobj(1, zlib.DEFLATED, 31)  # the fastest level to build
    chunk = b"0" * MiB
    parts = [encoder.compress(chunk) for _ in range(size // MiB)]
    return b"".join(parts) + encoder.flush()


async def test_a_gzip_bomb_is_a_quick_413_without_decoding_it_all(client: AppClient) -> None:
    bomb = _gzip_of_zeros(256 * MiB)  # 32 times the limit, in about 1.1 MB
    assert len(bomb) < 2 * MiB
    started = time.monotonic()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    answer = await _refused(client, bomb, 413, "too_large", {**JSON, "Content-Encoding": "gzip"})
    elapsed = time.monotonic() - started
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert answer["error"] == f"gzip body decodes to more than the limit of {8 * MiB} bytes"
    assert elapsed < 10, elapsed  # decoding all 256 MiB and parsing it takes far longer
    assert grown_kib < 64 * 1024, f"peak RSS grew {grown_kib} KiB"  # 256 MiB if decoded


async def test_a_gzip_bomb_split_over_members_is_a_413(client: AppClient) -> None:
    member = _gzip_of_zeros(4 * MiB)
    answer = await _refused(
        client, member * 3, 413, "too_large", {**JSON, "Content-Encoding": "gzip"}
    )
    assert answer["error"] == f"gzip body decodes to more than the limit of {8 * MiB} bytes"


async def test_every_gzip_member_is_decoded(client: AppClient) -> None:
    """Concatenated gzip files are one valid gzip body: no member is silently dropped."""
    first = gzip.compress(json.dumps(received("p-m1")).encode() + b"\n")
    second = gzip.compress(json.dumps(received("p-m2")).encode() + b"\n")
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    response = await client.post("/v1/events", data=first + second, headers=headers)
    assert response.status == 202
    assert (await response.json())["accepted"] == 2


async def test_thousands_of_gzip_members_are_a_413_without_decoding_them(
    client: AppClient,
) -> None:
    """An 8 MiB body of empty gzip members would hold 400,000 of them, a decoder each."""
    member = gzip.compress(b"", mtime=0)
    body = member * (8 * MiB // len(member))
    started = time.process_time()
    answer = await _refused(client, body, 413, "too_large", {**JSON, "Content-Encoding": "gzip"})
    assert answer["error"] == "gzip body holds more than 1000 members (concatenated gzip files)"
    assert time.process_time() - started < 0.5  # the whole body would take about a second


async def test_gzip_of_a_nested_bomb_within_the_limit_is_a_400(client: AppClient) -> None:
    nested = b"[" * 4_000_000 + b"]" * 4_000_000
    gzipped = {**JSON, "Content-Encoding": "gzip"}
    answer = await _refused(client, gzip.compress(nested), 400, "malformed", gzipped, nested)
    assert "recursion limit exceeded" in answer["error"]


# ----------------------------------------------------------------- slow and idle clients


async def _status_line(reader: asyncio.StreamReader, within: float) -> bytes:
    return await asyncio.wait_for(reader.readline(), within)


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True once the server closed the connection (EOF), reading and discarding the rest."""
    async with asyncio.timeout(within):
        while await reader.read(65536):
            pass
    return True


@pytest.fixture
def impatient(data_dir: Path) -> Settings:
    """Short body read and idle timeouts."""
    return Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        body_read_timeout_seconds=0.5,
        idle_timeout_seconds=1.0,
    )


@pytest.mark.parametrize(
    "chunked",
    [
        pytest.param(False, marks=pytest.mark.slow, id="content-length"),
        pytest.param(True, id="chunked"),
    ],
)
async def test_a_dribbled_body_is_cut_off_with_408_and_kept(
    aiohttp_client: ClientFactory, impatient: Settings, chunked: bool
) -> None:
    client = await aiohttp_client(create_app(impatient))
    host, port = client.host, client.port
    reader, writer = await asyncio.open_connection(host, port)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 100000"
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n\r\n"
    )
    started = time.monotonic()
    sent = b""

    async def dribble() -> None:
        nonlocal sent
        for byte in b'{"type": "payment:received", "data": {':
            piece = bytes([byte])
            writer.write(b"1\r\n" + piece + b"\r\n" if chunked else piece)
            sent += piece
            await writer.drain()
            await asyncio.sleep(0.05)

    dribbling = asyncio.create_task(dribble())
    try:
        status = await _status_line(reader, 5)
        elapsed = time.monotonic() - started
        assert status.startswith(b"HTTP/1.1 408"), status
        assert 0.5 <= elapsed < 5, elapsed
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1)
        assert b"Connection: close" in head
        if not chunked:  # the same for both: aiohttp reads on for its 10 s lingering time
            assert await _closed_by_server(reader, 15)
    finally:
        dribbling.cancel()
        writer.close()
    letter = _letters(client)[-1]
    assert letter.reason == "malformed"
    assert letter.error.startswith("the body did not arrive within 0.5 s (")
    assert letter.raw and sent.startswith(letter.raw)


async def test_headers_that_never_finish_are_closed_after_the_idle_timeout(
    aiohttp_client: ClientFactory, impatient: Settings
) -> None:
    client = await aiohttp_client(create_app(impatient))
    silent = await asyncio.open_connection(client.host, client.port)
    partial = await asyncio.open_connection(client.host, client.port)
    partial[1].write(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n")
    started = time.monotonic()
    for reader, _writer in (silent, partial):
        assert await _closed_by_server(reader, 5)
    assert time.monotonic() - started < 8  # the idle timeout, not the 75 s default
    for _reader, writer in (silent, partial):
        writer.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
async def test_thousands_of_idle_connections_do_not_starve_a_normal_request(
    data_dir: Path,
) -> None:
    idle = 2000
    needed = 2 * idle + 200  # both ends of every socket live in this process
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[0] < needed:
        raise_open_file_limit()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        message = f"the hard fd limit {soft} is below the {needed} this test needs"
        if in_ci():
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    try:
        await _idle_connections_beside_a_request(data_dir, idle)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


async def _idle_connections_beside_a_request(data_dir: Path, idle: int) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", idle_timeout_seconds=3.0)
    server = TestServer(create_app(settings))
    await server.start_server()
    assert server.runner is not None
    handler = server.runner.server
    assert handler is not None

    async def accepted() -> bool:
        return len(handler.connections) >= idle

    async def all_closed() -> bool:
        return not handler.connections

    fds_before = _open_fds()
    rss_before = _rss_kib()
    connections = []
    try:
        for index in range(idle):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            if index % 2:  # half send part of a request head, half nothing
                writer.write(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Le")
            connections.append((reader, writer))
        await async_wait_until(accepted, within=10, what="every connection accepted")
        grown_kib = _rss_kib() - rss_before
        # Both ends of each connection are in this process; 32 KiB each is a loose bound.
        assert grown_kib < idle * 32, f"RSS grew {grown_kib} KiB for {idle} connections"
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(
                server.make_url("/v1/events"), data=json.dumps(received("p-x")), headers=JSON
            ) as response:
                assert response.status == 202
            assert time.monotonic() - started < 5  # a starved server takes 60 s
        await async_wait_until(all_closed, within=10, what="idle connections closed")
        for reader, _writer in connections:
            assert await _closed_by_server(reader, 1)
    finally:
        for _reader, writer in connections:
            writer.close()
        await server.close()

    async def released() -> bool:
        return _open_fds() <= fds_before + 10

    await async_wait_until(released, within=10, what="file descriptors released")


def test_serve_raises_the_open_file_limit_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = max(_open_fds() + 64, 256)
    if hard != resource.RLIM_INFINITY and lowered >= hard:
        message = f"the hard fd limit {hard} leaves nothing to raise"
        if in_ci():
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        before, after = raise_open_file_limit()
        assert before == lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (after, hard)
        assert after == hard if hard != resource.RLIM_INFINITY else after >= 1 << 20
        assert raise_open_file_limit() == (after, after)  # nothing left to raise
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("at", ["0", "253402300799999", "9999-12-31T23:59:59.999Z"])
async def test_analytics_at_the_ends_of_the_range(client: AppClient, at: str) -> None:
    for name in ANALYTIC_NAMES:
        response = await client.get(f"/v1/analytics/{name}", params={"at": at, "window": "90d"})
        assert response.status == 200, (name, await response.text())


@pytest.mark.parametrize(
    "at", ["-1", "253402300800000", "300000000000000", "9" * 5000, "0001-01-01T00:00:00Z"]
)
async def test_analytics_at_outside_the_range_is_a_400(client: AppClient, at: str) -> None:
    for name in ANALYTIC_NAMES:
        response = await client.get(f"/v1/analytics/{name}", params={"at": at})
        body = await response.json()
        assert response.status == 400, (name, body)
        assert body["error"].startswith("at: must be from 1970-01-01 to 9999-12-31")


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("at", "²"), ("at", "1²"), ("at", "١٢٣"), ("limit", "²"), ("limit", "9" * 5000)],
)
async def test_analytics_numbers_beyond_ascii_digits_are_a_400(
    client: AppClient, parameter: str, value: str
) -> None:
    """str.isdigit() admits "²" and Arabic-Indic digits, which int() refuses or reads."""
    response = await client.get("/v1/analytics/top/payers", params={parameter: value})
    body = await response.json()
    assert response.status == 400, body
    assert body["error"].startswith(f"{parameter}: ")
