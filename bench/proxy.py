"""Proxy benchmark: latency the exporter adds in front of a facilitator, p50 and p99.

Starts two subprocesses on loopback: a fake x402 facilitator (aiohttp, answers ``/verify``
with ``{"isValid": true}`` and ``/settle`` with a success at once) and the exporter in
proxy mode in front of it (``python -m exporter serve --upstream-facilitator URL``,
embedded default: SQLite ledger + DuckDB store in a temporary data dir). Then, from this
process, over one keep-alive connection each, it sends the same sequence of version 2
``/verify`` + ``/settle`` pairs (unique nonces, so every payment is recorded: 3 events)
alternately straight to the facilitator and through the proxy, one request at a time,
and reports p50/p99 of both and the difference. Interleaving makes both series see the
same machine state; the recording happens after each answer is sent, so what it costs
shows up only as contention on this machine's cores.

Run: ``.venv/bin/python bench/proxy.py [--pairs N] [--warmup N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.proxy")

_NETWORK = "eip155:84532"
_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
_PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
_PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
_TX = "0x" + "ab" * 32


import _servers  # noqa: E402
from _servers import write  # noqa: E402


def _serve_facilitator(port: int) -> None:
    """Run the fake facilitator until terminated."""
    verify_answer = json.dumps({"isValid": True, "payer": _PAYER}).encode()
    settle_answer = json.dumps(
        {"success": True, "payer": _PAYER, "transaction": _TX, "network": _NETWORK}
    ).encode()

    async def verify(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=verify_answer, content_type="application/json")

    async def settle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=settle_answer, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/verify", verify)
    app.router.add_post("/settle", settle)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _body(n: int) -> bytes:
    """A version 2 exact-EVM facilitator request with nonce ``n``."""
    requirements = {
        "scheme": "exact",
        "network": _NETWORK,
        "amount": "10000",
        "asset": _USDC,
        "payTo": _PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    authorization = {
        "from": _PAYER,
        "to": _PAY_TO,
        "value": "10000",
        "validAfter": "1740672089",
        "validBefore": "1740672154",
        "nonce": "0x" + f"{n:064x}",
    }
    request: dict[str, Any] = {
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "resource": {"url": "https://api.example.com/premium-data"},
            "accepted": requirements,
            "payload": {"signature": "0x" + "11" * 65, "authorization": authorization},
        },
        "paymentRequirements": requirements,
    }
    return json.dumps(request).encode()


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _measure(
    direct_url: str, proxy_url: str, pairs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Alternate direct and proxied verify+settle requests; latencies in ms."""
    headers = {"Content-Type": "application/json"}
    direct: list[float] = []
    proxied: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    other = aiohttp.TCPConnector(limit=1)
    async with (
        aiohttp.ClientSession(connector=connector) as to_upstream,
        aiohttp.ClientSession(connector=other) as to_proxy,
    ):
        for n in range(warmup + pairs):
            body = _body(n)
            for path in ("/verify", "/settle"):
                for session, base, sink in (
                    (to_upstream, direct_url, direct),
                    (to_proxy, proxy_url, proxied),
                ):
                    started = time.perf_counter()
                    async with session.post(base + path, data=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"{base}{path} answered {response.status}")
                    if n >= warmup:
                        sink.append((time.perf_counter() - started) * 1000)
    return direct, proxied


async def _recorded(proxy_url: str, payments: int) -> str:
    """The exporter's event counters, polled until every payment's settlement is in."""
    settled = f'exporter_events_received_total{{type="payment:settled"}} {float(payments)}'
    deadline = time.monotonic() + 10.0
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(proxy_url + "/metrics") as response:
                text = await response.text()
            if settled in text.splitlines() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # polling the exporter: recording is asynchronous
    lines = [
        line
        for line in text.splitlines()
        if line.startswith(
            ("exporter_events_received_total", "x402_proxy_recording_failures_total")
        )
        and not line.endswith(" 0.0")
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="verify+settle pairs measured")
    parser.add_argument("--warmup", type=int, default=200, help="pairs sent before measuring")
    parser.add_argument("--serve-facilitator", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_facilitator:
        _serve_facilitator(args.serve_facilitator)
        return 0
    logging.basicConfig(level=logging.WARNING)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        upstream_port, proxy_port = _servers.free_port(), _servers.free_port()
        upstream = _servers.start(
            "facilitator",
            [sys.executable, __file__, "--serve-facilitator", str(upstream_port)],
            upstream_port,
            workdir,
            env,
        )
        proxy: _servers.Server | None = None
        try:
            proxy_env = dict(
                env, EXPORTER_LOG_LEVEL="warning", EXPORTER_DATA_DIR=str(workdir / "data")
            )
            proxy = _servers.start(
                "exporter",
                _servers.exporter_serve(proxy_port, "--upstream-facilitator", upstream.url),
                proxy_port,
                workdir,
                proxy_env,
            )
            direct, proxied = asyncio.run(
                _measure(upstream.url, proxy.url, args.pairs, args.warmup)
            )
            recorded = asyncio.run(_recorded(proxy.url, args.warmup + args.pairs))
        finally:
            if proxy is not None:
                proxy.stop()
            upstream.stop()
    write(f"{len(direct)} requests each way ({args.pairs} verify+settle pairs), sequential")
    write(f"{'':<10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, values in (("direct", direct), ("proxied", proxied)):
        write(f"{name:<10}{_percentile(values, 50):>10.3f}{_percentile(values, 99):>10.3f}")
    added_p50 = _percentile(proxied, 50) - _percentile(direct, 50)
    added_p99 = _percentile(proxied, 99) - _percentile(direct, 99)
    write(f"{'added':<10}{added_p50:>10.3f}{added_p99:>10.3f}")
    write("recorded by the exporter:\n" + recorded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
