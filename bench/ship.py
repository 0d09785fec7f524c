"""Shipping benchmark: points/s through ``InfluxStore`` against posting line protocol directly.

The InfluxDB fault-injection server (``tests/influx_fault_server.py``) runs as a
subprocess accepting every write (``--count-only``: it gunzips each body and counts its
lines, nothing more), so its work stays off this process. In this process, one run:

(a) ``InfluxStore.write`` over batches of 5,000 store records, as the forwarder calls it:
    rendering line protocol, gzip, the ``influxdb-client`` request and its answer;
(b) the same line protocol, rendered before the clock starts, posted directly with
    aiohttp: gzip (same level) and the HTTP request, nothing else;
(c) with ``--point``, also (a) with the ``influxdb_client.Point`` renderer.

Records are a deterministic mix of the eight event kinds (payments by status, batches,
revenue, websocket counts). Each path runs ``--rounds`` times, interleaved; the best
round of each is reported, with the ratio (a)/(b). The server's line count is checked
after every round, so a path that lost points fails instead of looking fast.

Targets: (a) >= 50,000 points/s and (a)/(b) >= 0.5.

Run: ``.venv/bin/python bench/ship.py [--points N] [--rounds R] [--point] [--record]``
(``--record`` makes the server parse and key every point, as in the tests).

``--engine`` measures against a real InfluxDB instead: Debian's ``influxd`` (1.x, as
``tests/influxdb_engine.py`` starts it on loopback) over the v1 write API, in one run:

(e) the exporter: simulated events committed to a ledger before the clock starts, then
    its :class:`~exporter.store.Forwarder` draining the outbox into ``InfluxStore``
    (``EXPORTER_INFLUX_API=v1``, batches of 5,000), timed until the outbox is empty;
(f) the same records' line protocol, rendered before the clock starts, gzip'd and posted
    straight to ``/write`` with aiohttp in batches of the same size, one at a time.

Each round writes to a fresh database per path; the engine's point count is checked after
each, so a path that lost points fails. Target: (e)/(f) >= 0.8.

Run: ``.venv/bin/python bench/ship.py --engine [--points N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exporter.ledger import Ledger  # noqa: E402
from exporter.records import (  # noqa: E402
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
)
from exporter.store.influx.store import (  # noqa: E402
    GZIP_LEVEL,
    MAX_LINES_PER_WRITE,
    Encoder,
    InfluxStore,
    point_line,
    to_line,
)

SERVER = ROOT / "tests" / "influx_fault_server.py"
TOKEN, ORG, BUCKET = "test-token", "test-org", "payments"
BASE_MS = 1_767_225_600_000
NETWORKS = ("eip155:8453", "eip155:84532", "eip155:42161", "eip155:10", "eip155:137")
TARGET_POINTS_PER_S = 50_000
TARGET_RATIO = 0.5
TARGET_ENGINE_RATIO = 0.8


def make_records(count: int, seed: int = 7) -> list[StoreRecord]:
    """A deterministic mix of store records, shaped like the simulator's traffic."""
    rng = random.Random(seed)
    records: list[StoreRecord] = []
    for i in range(count):
        ms = BASE_MS + i
        network = NETWORKS[i % len(NETWORKS)]
        payer = f"0x{rng.getrandbits(160):040x}"
        payee = f"0x{rng.getrandbits(160):040x}"
        amount = rng.randrange(10_000, 50_000_000)
        pick = rng.random()
        if pick < 0.30:
            records.append(PaymentRecord(
                f"payment:received:p{i}", ms, network, "received", f"p{i}", payer, payee, amount
            ))
        elif pick < 0.55:
            records.append(PaymentRecord(
                f"payment:verified:p{i}", ms, network, "verified", f"p{i}", payer, payee,
                amount, verification_ms=rng.uniform(20, 400),
            ))
        elif pick < 0.82:
            records.append(PaymentRecord(
                f"payment:settled:p{i}", ms, network, "settled", f"p{i}", payer, payee,
                amount, rng.randrange(1_000, 50_000), rng.uniform(300, 9_000),
                tx=f"0x{rng.getrandbits(256):064x}",
            ))
        elif pick < 0.87:
            records.append(PaymentRecord(
                f"payment:failed:p{i}", ms, network, "failed", f"p{i}", payer, payee, amount,
                error="insufficient_funds: balance below \"amount\"",
            ))
        elif pick < 0.93:
            records.append(BatchRecord(
                f"batch:settled:b{i}", ms, network, "settled", f"b{i}", 20, amount * 20,
                rng.randrange(1_000, 90_000), rng.randrange(21_000, 900_000),
                f"0x{rng.getrandbits(256):064x}",
            ))
        elif pick < 0.97:
            kind = "premium" if i % 2 else "gas_sponsorship"
            records.append(RevenueRecord(f"revenue:{i}", ms, network, kind, amount, f"p{i}"))
        else:
            records.append(WebsocketRecord(f"websocket:{i}", ms, rng.randrange(0, 5_000)))
    return records


@dataclass
class Result:
    """The best round of one path."""

    name: str
    points: int
    seconds: float = float("inf")

    @property
    def rate(self) -> float:
        """Points per second of the best round."""
        return self.points / self.seconds


async def _accepted(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/_fault/stats") as answer:
        stats = json.loads(await answer.read())
    return int(stats["linesAccepted"])


async def ship_through_store(url: str, records: list[StoreRecord], encoder: Encoder) -> float:
    """Seconds to write ``records`` with InfluxStore in forwarder-sized batches."""
    store = InfluxStore(url, TOKEN, ORG, BUCKET, timeout_seconds=60, encoder=encoder)
    try:
        started = time.perf_counter()
        for start in range(0, len(records), MAX_LINES_PER_WRITE):
            refused = await store.write(records[start : start + MAX_LINES_PER_WRITE])
            if refused:
                raise AssertionError(f"the server refused {len(refused)} records")
        return time.perf_counter() - started
    finally:
        await store.close()


async def post_directly(url: str, bodies: list[bytes]) -> float:
    """Seconds to gzip and POST pre-rendered line-protocol bodies with plain aiohttp."""
    params = {"org": ORG, "bucket": BUCKET, "precision": "ns"}
    headers = {
        "Authorization": f"Token {TOKEN}",
        "Content-Encoding": "gzip",
        "Content-Type": "text/plain; charset=utf-8",
    }
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        for body in bodies:
            async with session.post(
                url + "/api/v2/write",
                params=params,
                data=gzip.compress(body, GZIP_LEVEL),
                headers=headers,
            ) as answer:
                if answer.status != 204:
                    raise AssertionError(f"direct post answered {answer.status}")
        return time.perf_counter() - started


async def run(url: str, points: int, rounds: int, with_point: bool) -> list[Result]:
    """Every path ``rounds`` times, interleaved; the best round of each."""
    records = make_records(points)
    lines = [to_line(r) for r in records]
    bodies = [
        "\n".join(lines[i : i + MAX_LINES_PER_WRITE]).encode()
        for i in range(0, len(lines), MAX_LINES_PER_WRITE)
    ]
    paths: list[tuple[Result, Callable[[], Awaitable[float]]]] = [
        (Result("InfluxStore", points), lambda: ship_through_store(url, records, to_line)),
        (Result("direct aiohttp", points), lambda: post_directly(url, bodies)),
    ]
    if with_point:
        paths.append(
            (
                Result("InfluxStore, Point renderer", points),
                lambda: ship_through_store(url, records, point_line),
            )
        )
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            for result, path in paths:
                before = await _accepted(session, url)
                seconds = await path()
                arrived = await _accepted(session, url) - before
                if arrived != points:
                    raise AssertionError(f"{result.name}: {arrived} of {points} points arrived")
                result.seconds = min(result.seconds, seconds)
    return [result for result, _ in paths]


def _start_server(record: bool) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, str(SERVER)] + ([] if record else ["--count-only"])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError(f"fault server did not start (said {url!r})")
    return process, url


def _ledger_copy(ledger_file: Path, scratch: Path, sinks: tuple[str, ...]) -> Ledger:
    """A ledger opened on a fresh copy of ``ledger_file`` feeding ``sinks`` (each new
    sink's cursor starts at the outbox's first record: everything undelivered)."""
    for suffix in ("", "-wal", "-shm"):
        scratch.with_name(scratch.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(ledger_file, scratch)
    return Ledger(scratch, sinks=sinks)


async def _drain_ledger(url: str, db: str, ledger: Ledger, duckdb_file: Path) -> float:
    """Seconds for one forwarder per sink of ``ledger`` (``influxdb`` to ``db``, ``duckdb``
    to ``duckdb_file``) to ship the whole outbox, as the app runs them: at once, each with
    its own cursor. The clock stops when the last sink has everything."""
    from prometheus_client import CollectorRegistry

    from exporter.ledger import GroupCommitter
    from exporter.metrics import Metrics
    from exporter.records import Store
    from exporter.store import Forwarder
    from exporter.store.duckdb import DuckDBStore

    committer = GroupCommitter(ledger)
    metrics = Metrics(CollectorRegistry())
    stores: list[Store] = []
    for sink in ledger.sinks:
        if sink == "influxdb":
            stores.append(InfluxStore(url, None, None, db, timeout_seconds=60, api="v1"))
        else:
            stores.append(await asyncio.to_thread(DuckDBStore.open, duckdb_file))
    forwarders = [
        Forwarder(committer, store, metrics, MAX_LINES_PER_WRITE, sink=store.name)
        for store in stores
    ]
    try:
        started = time.perf_counter()
        for forwarder in forwarders:
            forwarder.start()
        while ledger.backlog:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0.002)
        seconds = time.perf_counter() - started
        if ledger.dead_letters():
            raise AssertionError("a store refused records")
        return seconds
    finally:
        for forwarder in forwarders:
            await forwarder.stop(5)
        for store in stores:
            await store.close()
        await asyncio.to_thread(committer.close)
        await asyncio.to_thread(ledger.close)


def _duckdb_points(duckdb_file: Path) -> int:
    """Rows in the DuckDB store's four measurement tables."""
    from exporter.store.duckdb import DuckDBStore

    store = DuckDBStore.open(duckdb_file)
    try:
        return sum(
            int(str(store.query(f'SELECT count(*) FROM "{table}"')[0][0]))
            for table in ("payment", "batch", "revenue", "websocket")
        )
    finally:
        asyncio.run(store.close())


async def _post_v1(url: str, db: str, bodies: list[bytes]) -> float:
    """Seconds to gzip and POST pre-rendered line-protocol bodies to ``/write``."""
    params = {"db": db, "precision": "ns"}
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        for body in bodies:
            async with session.post(
                url + "/write", params=params, data=gzip.compress(body, GZIP_LEVEL),
                headers=headers,
            ) as answer:
                if answer.status != 204:
                    raise AssertionError(f"direct post answered {answer.status}")
        return time.perf_counter() - started


def _commit_events(ledger_file: Path, payments: int) -> list[str]:
    """Commit simulated events to a new ledger; the line protocol of its outbox."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ledger_helpers import prepare

    from exporter.cli.simulate import SimulationConfig, Simulator
    from exporter.ledger import Ledger, Submission

    ledger = Ledger(ledger_file)
    try:
        events = [prepare(e) for e in Simulator(SimulationConfig(seed=11)).events(
            BASE_MS, payments, 500.0
        )]
        for start in range(0, len(events), 5_000):
            ledger.commit([Submission(events[start : start + 5_000])])
        return [to_line(row.record) for row in ledger.read_outbox(10_000_000)]
    finally:
        ledger.close()


ONE_SINK = ("influxdb",)


def run_engine(points: int, rounds: int, sinks: tuple[str, ...] = ONE_SINK) -> int:
    """The ``--engine`` comparison: forwarder + store against direct posts, on influxd;
    with ``sinks`` beyond InfluxDB, also the exporter feeding all of them at once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from influxdb_engine import SKIP_REASON, InfluxEngine, influxd_path

    if influxd_path() is None:
        sys.stderr.write(f"ship.py --engine: {SKIP_REASON}\n")
        return 2
    out = sys.stdout
    # Each path: its name and the ledger's sinks (None: the direct posts).
    paths: dict[str, tuple[str, ...] | None] = {
        "exporter (forwarder + InfluxStore)": ONE_SINK,
        "direct /write": None,
    }
    if sinks != ONE_SINK:
        paths[f"exporter -> {','.join(sinks)} at once"] = sinks
        for sink in sinks:
            if sink != "influxdb":
                paths[f"exporter -> {sink} alone"] = (sink,)
    with tempfile.TemporaryDirectory(prefix="ship-bench-") as tmp:
        root = Path(tmp)
        ledger_file = root / "template.sqlite3"
        # A payment makes about three records: commit enough for ``points``.
        lines = _commit_events(ledger_file, max(1, points // 3))
        bodies = [
            "\n".join(lines[i : i + MAX_LINES_PER_WRITE]).encode()
            for i in range(0, len(lines), MAX_LINES_PER_WRITE)
        ]
        engine = InfluxEngine(root / "influxdb")
        engine.start()
        try:
            best = dict.fromkeys(paths, math.inf)
            cpu = dict.fromkeys(paths, math.inf)
            for round_ in range(rounds):
                for index, (name, path_sinks) in enumerate(paths.items()):
                    db = f"ship_{round_}_{index}"
                    duckdb_file = root / f"ship_{round_}_{index}.duckdb"
                    engine.query(f'CREATE DATABASE "{db}"')
                    cpu_before = time.process_time()
                    if path_sinks is None:
                        seconds = asyncio.run(_post_v1(engine.url, db, bodies))
                    else:
                        ledger = _ledger_copy(ledger_file, root / "run.sqlite3", path_sinks)
                        seconds = asyncio.run(_drain_ledger(engine.url, db, ledger, duckdb_file))
                    cpu[name] = min(cpu[name], time.process_time() - cpu_before)
                    if path_sinks is None or "influxdb" in path_sinks:
                        _check_stored(name, len(lines), _engine_points(engine, db))
                    if path_sinks is not None and "duckdb" in path_sinks:
                        _check_stored(name, len(lines), _duckdb_points(duckdb_file))
                        duckdb_file.unlink()
                    engine.query(f'DROP DATABASE "{db}"')
                    best[name] = min(best[name], seconds)
        finally:
            engine.stop()
    out.write(
        f"influxd {engine.url} (v1 /write); {len(lines):,} points per path in batches of "
        f"{MAX_LINES_PER_WRITE:,}, best of {rounds}\n"
    )
    out.write(f"{'path':<40} {'seconds':>8} {'points/s':>12} {'our CPU s':>10}\n")
    for name, seconds in best.items():
        out.write(
            f"{name:<40} {seconds:>8.3f} {len(lines) / seconds:>12,.0f} {cpu[name]:>10.3f}\n"
        )
    exporter, direct, *several = best.values()
    ratio = direct / exporter
    out.write(f"ratio exporter / direct: {ratio:.2f} (target >= {TARGET_ENGINE_RATIO}: "
              f"{'met' if ratio >= TARGET_ENGINE_RATIO else 'MISSED'})\n")
    if several:
        out.write(
            f"ratio {','.join(sinks)} at once / influxdb alone: {exporter / several[0]:.2f}\n"
        )
    return 0


def _engine_points(engine: Any, db: str) -> int:
    """Points in ``db`` over the four measurements."""
    return sum(
        engine.count(db, m, f)
        for m, f in (("payment", "payment_id"), ("batch", "batch_id"),
                     ("revenue", "amount_micro"), ("websocket", "count"))
    )


def _check_stored(name: str, expected: int, stored: int) -> None:
    if stored != expected:
        raise AssertionError(f"{name}: {stored} of {expected} points stored")


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--points", type=int, default=200_000, help="points per path and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path (best is kept)")
    parser.add_argument("--point", action="store_true", help="also time the Point renderer")
    parser.add_argument(
        "--record", action="store_true", help="server parses and keys every point"
    )
    parser.add_argument(
        "--engine", action="store_true",
        help="against a real influxd over the v1 API: the forwarder and store against "
        "posting the same line protocol straight to /write",
    )
    parser.add_argument(
        "--stores", default=None, metavar="LIST",
        help="with --engine: also the exporter feeding these sinks at once, e.g. "
        "duckdb,influxdb (each its own forwarder and cursor, as EXPORTER_STORES does)",
    )
    args = parser.parse_args()
    if args.stores is not None:
        from exporter.config import parse_stores

        sinks = tuple(kind.value for kind in parse_stores(args.stores))
        if "influxdb" not in sinks:
            parser.error("--stores must include influxdb (the engine is what is measured)")
        return run_engine(args.points, args.rounds, sinks)
    if args.engine:
        return run_engine(args.points, args.rounds)
    server, url = _start_server(args.record)
    try:
        results = asyncio.run(run(url, args.points, args.rounds, args.point))
    finally:
        server.terminate()
        server.wait(10)
    out = sys.stdout
    mode = "parsing and keying every point" if args.record else "counting lines"
    out.write(f"fault server: {mode}; {args.points:,} points per path, best of {args.rounds}\n")
    out.write(f"{'path':<30} {'seconds':>8} {'points/s':>12}\n")
    for result in results:
        out.write(f"{result.name:<30} {result.seconds:>8.3f} {result.rate:>12,.0f}\n")
    store, direct = results[0], results[1]
    ratio = store.rate / direct.rate
    out.write(f"ratio InfluxStore / direct: {ratio:.2f}\n")
    out.write(
        f"targets: >= {TARGET_POINTS_PER_S:,} points/s "
        f"{'met' if store.rate >= TARGET_POINTS_PER_S else 'MISSED'}; "
        f"ratio >= {TARGET_RATIO} {'met' if ratio >= TARGET_RATIO else 'MISSED'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
