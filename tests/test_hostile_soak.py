"""A short soak of hostile clients against proxy mode, checked by what it leaves behind:
the ledger's size and row counts stay within the dead-letter budget, replays record
nothing new, and refused bodies leave no reference cycles behind (the serving process
raises the collector's threshold, so a body held by a cycle lives for many requests).

The long version, with memory sampled over minutes, is ``bench/soak_hostile.py``.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import AppClient

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.events import MalformedJSONError, parse_event_array_json, parse_event_json
from exporter.ingest.proxy import PROXY

MiB = 1024 * 1024
JSON = {"Content-Type": "application/json"}
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


def _facilitator_request(nonce: int) -> bytes:
    requirements = {
        "scheme": "exact",
        "network": "eip155:84532",
        "amount": "10000",
        "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    authorization = {
        "from": PAYER,
        "to": PAY_TO,
        "value": "10000",
        "validAfter": "1740672089",
        "validBefore": "1740672154",
        "nonce": "0x" + f"{nonce:064x}",
    }
    return json.dumps(
        {
            "x402Version": 2,
            "paymentPayload": {
                "x402Version": 2,
                "resource": {"url": "https://api.example.com/premium-data"},
                "accepted": requirements,
                "payload": {"signature": "0x" + "11" * 65, "authorization": authorization},
            },
            "paymentRequirements": requirements,
        }
    ).encode()


@pytest.fixture
async def facilitator(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    """A facilitator that verifies and settles everything, and answers /huge with 8 MiB."""

    async def verify(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"isValid": True, "payer": PAYER})

    async def settle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {
                "success": True,
                "payer": PAYER,
                "transaction": "0x" + "ab" * 32,
                "network": "eip155:84532",
            }
        )

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b" " * (8 * MiB), content_type="application/json")

    app = web.Application()
    app.router.add_post("/verify", verify)
    app.router.add_post("/settle", settle)
    app.router.add_get("/huge", huge)
    server = await aiohttp_server(app, port=0)
    return str(server.make_url("")).rstrip("/")


async def _raw_status(client: AppClient, head: bytes) -> int:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        await writer.drain()
        return int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    finally:
        writer.close()


def _ledger_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("ledger.sqlite3*"))


async def test_hostile_rounds_leave_the_ledger_bounded(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path, facilitator: str
) -> None:
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        upstream_facilitator=facilitator,
        proxy_max_response_bytes=MiB,
        dead_letter_max_bytes_per_minute=256 * 1024,
    )
    client = await aiohttp_client(create_app(settings))
    ledger = client.app[COMMITTER].ledger
    pair = _facilitator_request(1)
    for path in ("/verify", "/settle"):
        assert (await client.post(path, data=pair, headers=JSON)).status == 200
    await client.app[PROXY].drain()  # recording follows the answer
    events_of_one_pair = ledger.stats().events
    before = _ledger_bytes(data_dir)
    malformed = b"[" + b"x" * (8_000_000 - 1)
    tiny_lines = b"{}\n" * (MiB // 3)
    started = time.monotonic()
    for _ in range(4):
        statuses = [
            await _raw_status(
                client,
                b"POST munity://x/settle HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: 2\r\n\r\n{}",
            ),
            await _raw_status(
                client,
                b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                b"\r\nContent-Length: 104857600\r\n\r\n",
            ),
        ]
        for body, headers in (
            (malformed, JSON),
            (malformed, JSON),
            (tiny_lines, {"Content-Type": "application/x-ndjson"}),
            (b'{"type": ', JSON),
        ):
            response = await client.post("/v1/events", data=io.BytesIO(body), headers=headers)
            statuses.append(response.status)
        statuses.append((await client.get("/huge")).status)
        for path in ("/verify", "/settle"):
            statuses.append((await client.post(path, data=pair, headers=JSON)).status)
        assert statuses[0] in (400, 421)
        assert statuses[1:] == [413, 400, 400, 413, 400, 502, 200, 200]

    await client.app[PROXY].drain()
    refilled = 256 * 1024 * (time.monotonic() - started) / 60  # the budget refills meanwhile
    # 32 MB of refused bodies: at most the budget of 256 KiB (a burst may spend one
    # minute's worth at once) is stored, plus the pages and WAL frames of its rows.
    assert _ledger_bytes(data_dir) - before < 2 * MiB
    stats = ledger.stats()
    letters = ledger.dead_letters()
    assert sum(len(d.raw) + len(d.error) for d in letters) <= 256 * 1024 + refilled
    assert all(len(d.raw) <= 64 * 1024 for d in letters)
    assert stats.events == events_of_one_pair  # replays recorded nothing new
    assert events_of_one_pair > 0


@pytest.mark.parametrize(
    "parse",
    [parse_event_array_json, parse_event_json],
    ids=["array", "single"],
)
def test_a_malformed_body_leaves_no_reference_cycle(parse: Callable[[bytes], object]) -> None:
    body = b"[" + b"x" * MiB
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises(MalformedJSONError):
                parse(body)
        assert gc.collect() == 0  # nothing was left for the cyclic collector
    finally:
        gc.enable()


def _cyclic_frames_holding_big_bytes() -> list[str]:
    """Frames only the cyclic collector would free that hold a large bytes object."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    return [
        o.f_code.co_name
        for o in garbage
        if isinstance(o, types.FrameType)
        and any(isinstance(v, bytes) and len(v) > 500_000 for v in o.f_locals.values())
    ]


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"[" + b"x" * MiB, "application/json", 400),
        (b"{" + b"x" * MiB, "application/json", 400),
        (b'{"type": "nope"}\n' + b"x" * MiB, "application/x-ndjson", 400),
        (
            b"[" + b",".join([b'{"type": "nope", "x": "' + b"y" * 1000 + b'"}'] * 1000) + b"]",
            "application/json",
            422,
        ),
        (
            b"\n".join([b'{"type": "nope", "x": "' + b"y" * 1000 + b'"}'] * 1000),
            "application/x-ndjson",
            422,
        ),
    ],
    ids=["array", "object", "ndjson-line", "invalid-items", "invalid-lines"],
)
async def test_a_refused_body_is_not_held_by_a_reference_cycle(
    client: AppClient, body: bytes, content_type: str, status: int
) -> None:
    headers = {"Content-Type": content_type}
    gc.collect()
    response = await client.post("/v1/events", data=io.BytesIO(body), headers=headers)
    assert response.status == status
    assert _cyclic_frames_holding_big_bytes() == []
