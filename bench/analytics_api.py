"""Analytics API benchmark: ``GET /v1/analytics/*`` served from the cache, against a no-op.

Loads ``--payments`` simulated payments over ``--days`` into a DuckDB store (or reuses
``--db``), starts the exporter on a data directory holding that store, waits until every
window's analytics are cached, then sends ``--requests`` GETs over ``--connections``
keep-alive connections, cycling through every analytic and window. In the same run a
no-op aiohttp handler answering a JSON body of the same size takes the same load. Prints
requests/s, p50/p99 latency and the exporter/no-op ratio.

Run: ``.venv/bin/python bench/analytics_api.py [--payments N] [--db PATH] [--requests N]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _servers  # noqa: E402

from exporter.analytics.models import Window  # noqa: E402
from exporter.store.duckdb import DuckDBStore  # noqa: E402

NAMES = ("payments", "networks", "revenue", "revenue/breakdown", "top/payers", "health")


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _paths() -> list[str]:
    paths = [f"/v1/analytics/{name}?window={w.value}" for name in NAMES for w in Window]
    return [*paths, "/v1/analytics/realtime", "/v1/analytics/timeseries?window=7d&metric=fees"]


def _serve_noop(port: int, body_bytes: int) -> None:
    """The baseline: answers every GET with a JSON body of the exporter's typical size."""
    body = b'{"x":"' + b"0" * max(0, body_bytes - 8) + b'"}'

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def _load(url: str, paths: list[str], requests: int, connections: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for n in counter:
                started = time.perf_counter()
                async with session.get(url + paths[n % len(paths)]) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{paths[n % len(paths)]}: {response.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return latencies


async def _cached(url: str) -> bool:
    async with aiohttp.ClientSession() as session:
        for path in _paths():
            async with session.get(url + path) as response:
                if "X-Analytics-Stale" not in response.headers:
                    return False
    return True


async def _typical_body(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        sizes = []
        for path in _paths():
            async with session.get(url + path) as response:
                sizes.append(len(await response.read()))
    return int(statistics.median(sizes))


async def _measure(name: str, url: str, args: argparse.Namespace) -> tuple[float, float, float]:
    paths = _paths()
    await _load(url, paths, min(500, args.requests), args.connections)  # warm up
    started = time.perf_counter()
    latencies = await _load(url, paths, args.requests, args.connections)
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    rate = len(latencies) / elapsed
    _write(
        f"{name:<9} {len(latencies):>8,} requests  {rate:>9,.0f} req/s  "
        f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
    )
    return rate, p50, p99


async def _load_store(store_path: Path, args: argparse.Namespace) -> None:
    loader = _bench_module("analytics")
    store = DuckDBStore.open(store_path, memory_limit="1GB")
    _write(f"loading {args.payments:,} payments over {args.days:g} days (not timed) ...")
    # The history ends now, so every cached window holds traffic.
    await loader.load(store, args.payments, args.days, args.seed, int(time.time() * 1000))
    await store.close()


def _prepare(args: argparse.Namespace) -> Path:
    """A data directory holding the loaded store (copied from ``--db`` when it exists)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-analytics-api-"))
    data_dir = workdir / "data"
    data_dir.mkdir()
    store_path = data_dir / "store.duckdb"
    if args.db and Path(args.db).exists() and time.time() - Path(args.db).stat().st_mtime < 3600:
        shutil.copy(args.db, store_path)
    else:
        asyncio.run(_load_store(store_path, args))
        if args.db:
            shutil.copy(store_path, args.db)
    return data_dir


async def _main(args: argparse.Namespace, data_dir: Path) -> None:
    workdir = data_dir.parent
    port = _servers.free_port()
    exporter = _servers.start(
        "exporter",
        _servers.exporter_serve(port, "--data-dir", str(data_dir)),
        port,
        workdir,
    )
    try:
        deadline = time.monotonic() + 120
        while not await _cached(exporter.url):
            if time.monotonic() > deadline:
                raise RuntimeError("analytics were not cached within 120 s")
            await asyncio.sleep(0.5)
        body_bytes = await _typical_body(exporter.url)
        noop_port = _servers.free_port()
        noop = _servers.start(
            "no-op",
            [
                sys.executable,
                __file__,
                "--serve-noop",
                str(noop_port),
                "--body-bytes",
                str(body_bytes),
            ],
            noop_port,
            workdir,
        )
        try:
            _write(
                f"{len(_paths())} endpoints, median body {body_bytes} bytes, "
                f"{args.connections} connections; client and servers share the cores"
            )
            mine = await _measure("exporter", exporter.url, args)
            base = await _measure("no-op", noop.url, args)
        finally:
            noop.stop()
    finally:
        exporter.stop()
    _write(
        f"ratio exporter/no-op: {mine[0] / base[0]:.2f} (requests/s); "
        f"target >= 2,000 req/s from cache: {'met' if mine[0] >= 2000 else 'NOT met'}"
    )


def main() -> None:
    """Parse arguments and run the benchmark (or the no-op server)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--db", help="store file to reuse, or to keep after loading")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--serve-noop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body-bytes", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        _serve_noop(args.serve_noop, args.body_bytes)
        return
    asyncio.run(_main(args, _prepare(args)))


if __name__ == "__main__":
    main()
