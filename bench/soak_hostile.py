"""Hostile-client soak: memory and the ledger stay bounded under abuse in proxy mode.

Starts two subprocesses on loopback: a fake x402 facilitator (``/verify`` and ``/settle``
answer at once; ``/huge`` streams an answer of ``--huge-mib`` MiB) and the exporter in
proxy mode in front of it (``python -m exporter serve --upstream-facilitator URL``,
embedded default, temporary data dir). For ``--duration`` seconds, one task per kind of
abuse keeps sending, each waiting for its answer:

- absolute-form request targets (``POST munity://x/settle``, ``POST http://evil.example/``)
  over a raw socket: each must be refused, forwarded nowhere (400, or 421 from the
  loopback Host guard, which reads the target's host);
- huge upstream answers (``GET /huge`` through the proxy): each must be a 502, relayed cut;
- tiny-line NDJSON (1 MiB of ``{}\\n`` to ``/v1/events``): each must be a 413;
- replays of one ``/verify`` + ``/settle`` pair (one nonce): recorded once;
- oversized bodies: a declared 100 MiB body (413, from its Content-Length) and 8 MB
  malformed JSON bodies (400: kept as dead letters only within their byte budget);
- small malformed bodies (400), and arrays of 2,000 invalid events of 1 KB each (422:
  each kept as a dead letter only within the budget).

Every second it samples the exporter's VmRSS and the ledger's size on disk (file and WAL)
and prints a row every ``--report`` seconds. At the end it reads the ledger read-only and
checks, printing PASS/FAIL each and exiting 1 on a failure:

1. every answer was the expected status;
2. peak RSS stayed under ``--max-rss-mib``;
3. the ledger (file and WAL) grew by less than ``--max-ledger-growth-mib`` (40: the WAL
   rewinds once it holds 8192 pages, 32 MiB, whatever fills it) plus the dead-letter
   budget (``EXPORTER_DEAD_LETTER_MAX_BYTES_PER_MINUTE``, default 1 MiB) per started minute;
4. the dead letters' bytes (body and error) are within that budget;
5. the replayed payment's events are those of one pair.

Run: ``.venv/bin/python bench/soak_hostile.py [--duration S] [--report S]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import _servers  # noqa: E402
import aiohttp
from _servers import write  # noqa: E402
from aiohttp import web
from proxy import _body as facilitator_request  # noqa: E402

MiB = 1024 * 1024
DEAD_LETTER_BUDGET_PER_MINUTE = MiB
"""The exporter's default ``EXPORTER_DEAD_LETTER_MAX_BYTES_PER_MINUTE``."""


def _serve_facilitator(port: int, huge_mib: int) -> None:
    """Run the fake facilitator until terminated."""
    verify_answer = json.dumps({"isValid": True, "payer": "0x" + "85" * 20}).encode()
    settle_answer = json.dumps(
        {
            "success": True,
            "payer": "0x" + "85" * 20,
            "transaction": "0x" + "ab" * 32,
            "network": "eip155:84532",
        }
    ).encode()
    chunk = b" " * MiB

    async def verify(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=verify_answer, content_type="application/json")

    async def settle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=settle_answer, content_type="application/json")

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(huge_mib):
                await response.write(chunk)
        except ConnectionError:  # the proxy stopped reading: what it should do
            return response
        await response.write_eof()
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/verify", verify)
    app.router.add_post("/settle", settle)
    app.router.add_get("/huge", huge)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@dataclass
class Tally:
    """Answers per kind of abuse: expected, and anything else by status (or error)."""

    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, got: int | str, want: frozenset[int]) -> None:
        """Count one answer."""
        if got in want:
            self.expected[kind] += 1
        else:
            self.unexpected[f"{kind}: {got}"] += 1


async def _raw(port: int, head: bytes, body: bytes = b"") -> int:
    """Send a request head (and body) over a fresh socket; the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 30)
        return int(status.split()[1])
    finally:
        writer.close()


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, kind: str) -> int:
    content_type = "application/x-ndjson" if kind == "ndjson" else "application/json"
    async with session.post(url, data=body, headers={"Content-Type": content_type}) as answer:
        await answer.read()
        return answer.status


def _abuses(
    url: str, port: int, session: aiohttp.ClientSession
) -> dict[str, tuple[frozenset[int], Callable[[], Awaitable[int]]]]:
    """Each kind of abuse: the status it must get, and one attempt."""
    ingest = url + "/v1/events"
    tiny_lines = b"{}\n" * (MiB // 3)
    big_malformed = b"[" + b"x" * (8_000_000 - 1)
    pair = facilitator_request(1)
    invalid = b"[" + b",".join([b'{"type": "nope", "x": "' + b"y" * 1000 + b'"}'] * 2000) + b"]"

    async def absolute_form() -> int:
        first = await _raw(
            port,
            b"POST munity://x/settle HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
        )
        second = await _raw(
            port,
            b"POST http://evil.example/settle HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        return first if first not in (400, 421) else second

    async def huge_answer() -> int:
        async with session.get(url + "/huge") as answer:
            await answer.read()
            return answer.status

    async def replay() -> int:
        for path in ("/verify", "/settle"):
            status = await _post(session, url + path, pair, "json")
            if status != 200:
                return status
        return 200

    async def declared_oversize() -> int:
        head = (
            b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n"
        )
        return await _raw(port, head, b"[" * 65536)

    return {
        "absolute-form target": (frozenset({400, 421}), absolute_form),
        "huge upstream answer": (frozenset({502}), huge_answer),
        "tiny-line NDJSON": (
            frozenset({413}),
            lambda: _post(session, ingest, tiny_lines, "ndjson"),
        ),
        "replayed verify+settle": (frozenset({200}), replay),
        "declared 100 MiB body": (frozenset({413}), declared_oversize),
        "8 MB malformed body": (
            frozenset({400}),
            lambda: _post(session, ingest, big_malformed, "json"),
        ),
        "small malformed body": (
            frozenset({400}),
            lambda: _post(session, ingest, b'{"type": ', "json"),
        ),
        "2 MB of invalid events": (
            frozenset({422}),
            lambda: _post(session, ingest, invalid, "json"),
        ),
    }


def _ledger_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("ledger.sqlite3*"))


def _ledger_rows(data_dir: Path) -> tuple[int, int, int]:
    """(events, dead letters, dead letters' body and error bytes), read-only."""
    uri = f"file:{data_dir / 'ledger.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=30) as conn:
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        letters, letter_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(raw) + length(error)), 0) FROM dead_letters"
        ).fetchone()
    return int(events), int(letters), int(letter_bytes)


async def _soak(
    exporter: _servers.Server,
    port: int,
    data_dir: Path,
    duration: float,
    report: float,
    only: list[str] | None,
) -> tuple[Tally, list[tuple[float, float, int]], int]:
    """Run every abuse until the deadline; (tally, samples, events of one pair)."""
    tally = Tally()
    samples: list[tuple[float, float, int]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        abuses = _abuses(exporter.url, port, session)
        sent = {k: v for k, v in abuses.items() if not only or any(o in k for o in only)}
        want, replay = abuses["replayed verify+settle"]
        tally.record("replayed verify+settle", await replay(), want)
        await asyncio.sleep(1.0)  # recording happens after the answer: let it land
        one_pair = _ledger_rows(data_dir)[0]
        started = time.monotonic()
        deadline = started + duration

        async def keep_sending(
            kind: str, want: frozenset[int], attempt: Callable[[], Awaitable[int]]
        ) -> None:
            while time.monotonic() < deadline:
                try:
                    got: int | str = await attempt()
                except (aiohttp.ClientError, OSError, TimeoutError) as error:
                    got = type(error).__name__
                tally.record(kind, got, want)

        async def sample() -> None:
            next_report = 0.0
            while time.monotonic() < deadline:
                rss = exporter.rss_mib() or 0.0
                size = _ledger_bytes(data_dir)
                now = time.monotonic() - started
                samples.append((now, rss, size))
                if now >= next_report:
                    write(
                        f"{now:>8.0f}{rss:>12.1f}{size / MiB:>14.2f}"
                        f"{sum(tally.expected.values()):>12}"
                    )
                    next_report += report
                await asyncio.sleep(1.0)  # a sampling period, not a wait for a condition

        write(f"{'t s':>8}{'RSS MiB':>12}{'ledger MiB':>14}{'requests':>12}")
        await asyncio.gather(sample(), *(keep_sending(kind, w, a) for kind, (w, a) in sent.items()))
    return tally, samples, one_pair


def main() -> int:
    """Run the soak and print the checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of abuse")
    parser.add_argument("--report", type=float, default=10.0, help="seconds between rows")
    parser.add_argument("--huge-mib", type=int, default=256, help="size of /huge's answer")
    parser.add_argument("--max-rss-mib", type=float, default=400.0, help="RSS bound")
    parser.add_argument(
        "--max-ledger-growth-mib",
        type=float,
        default=40.0,
        help="ledger growth allowed beyond the dead-letter budget: the WAL, which the "
        "ledger rewinds once it holds 8192 pages (32 MiB), and a few pages",
    )
    parser.add_argument(
        "--only",
        action="append",
        help="only the abuses whose name contains this (repeatable), to find which one grows",
    )
    parser.add_argument("--serve-facilitator", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_facilitator:
        _serve_facilitator(args.serve_facilitator, args.huge_mib)
        return 0
    env = _servers.clean_env()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "data"
        upstream_port, port = _servers.free_port(), _servers.free_port()
        upstream = _servers.start(
            "facilitator",
            [
                sys.executable,
                __file__,
                "--serve-facilitator",
                str(upstream_port),
                "--huge-mib",
                str(args.huge_mib),
            ],
            upstream_port,
            workdir,
            env,
        )
        exporter: _servers.Server | None = None
        try:
            exporter_env = dict(env, EXPORTER_LOG_LEVEL="error", EXPORTER_DATA_DIR=str(data_dir))
            exporter = _servers.start(
                "exporter",
                _servers.exporter_serve(port, "--upstream-facilitator", upstream.url),
                port,
                workdir,
                exporter_env,
            )
            before = _ledger_bytes(data_dir)
            tally, samples, one_pair = asyncio.run(
                _soak(exporter, port, data_dir, args.duration, args.report, args.only)
            )
            peak_rss = exporter.peak_rss_mib() or 0.0
            after = _ledger_bytes(data_dir)
            events, letters, letter_bytes = _ledger_rows(data_dir)
        finally:
            if exporter is not None:
                exporter.stop()
            upstream.stop()
    minutes = math.ceil(args.duration / 60) + 1
    budget = minutes * DEAD_LETTER_BUDGET_PER_MINUTE
    growth = after - before
    write("answers:")
    for kind, count in sorted(tally.expected.items()):
        write(f"  {count:>8}  {kind}")
    for kind, count in sorted(tally.unexpected.items()):
        write(f"  {count:>8}  UNEXPECTED {kind}")
    write(f"peak RSS {peak_rss:.1f} MiB (sampled max {max(s[1] for s in samples):.1f})")
    write(
        f"ledger grew {growth / MiB:.2f} MiB; {letters} dead letters of "
        f"{letter_bytes / MiB:.2f} MiB; {events} events"
    )
    checks = [
        ("every answer as expected", not tally.unexpected),
        (f"peak RSS under {args.max_rss_mib:g} MiB", peak_rss < args.max_rss_mib),
        (
            f"ledger growth under {args.max_ledger_growth_mib:g} MiB + {minutes} MiB budget",
            growth < args.max_ledger_growth_mib * MiB + budget,
        ),
        (f"dead letters within {minutes} minutes' budget", letter_bytes <= budget),
        (f"replays recorded once ({one_pair} events)", events == one_pair),
    ]
    for name, ok in checks:
        write(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
