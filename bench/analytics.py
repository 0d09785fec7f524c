"""Analytics benchmark: a full refresh of every analytic for every window on the DuckDB store.

Loads ``--payments`` simulated payments (1,000,000 by default) spread over ``--days`` (30)
into a DuckDB store, building the store records directly from the simulator's events with
an in-memory join (the records the ledger would emit: settled and failed events carry
their ``payment:received`` fields, ``batch:settled`` its ``batch:created`` network),
written through :meth:`DuckDBStore.write` in batches of 100,000 with a 1GB buffer pool
(loading is not timed).

Then reopens the store as the exporter does (its default buffer pool and threads,
``EXPORTER_DUCKDB_MEMORY_LIMIT`` and ``_THREADS``, unless ``--memory-limit`` /
``--threads`` say otherwise), times :meth:`Analytics.compute_all`
(every analytic of docs/architecture.md section 5, every window) ``--runs`` times at successive
instants a minute apart, and prints the median and the maximum against the 2 s target,
then the seconds each store query took in one more refresh, then the CPU seconds of the
refreshes due together each minute (realtime, 1h, 6h, 24h) computed one by one against
one shared computation (the exporter shares it: :class:`SharedRefreshes`).

``--db PATH`` keeps the loaded store file and reuses it on the next run (loading 1M
payments takes a minute or two on the build machine).

Run: ``.venv/bin/python bench/analytics.py [--payments N] [--days D] [--runs R] [--db PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exporter.analytics.compute import Analytics  # noqa: E402
from exporter.analytics.duckdb import DuckDBAnalyticsSource  # noqa: E402
from exporter.analytics.models import (  # noqa: E402
    HOUR_MS,
    BucketTotals,
    PointInTime,
    RankRequest,
    RankValues,
    TopLists,
    Window,
    WindowTotals,
)
from exporter.cli.simulate import SimulationConfig, Simulator  # noqa: E402
from exporter.config import DUCKDB_MEMORY_LIMIT, DUCKDB_THREADS  # noqa: E402
from exporter.events import to_micro  # noqa: E402
from exporter.records import (  # noqa: E402
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
)
from exporter.store.duckdb import DuckDBStore  # noqa: E402

END_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TARGET_S = 2.0
_T = TypeVar("_T")
_WRITE_BATCH = 100_000
_LOAD_MEMORY_LIMIT = "1GB"  # large batches load faster; the timed store is reopened


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _anonymous_key(event: dict[str, Any]) -> str:
    data = event["data"]
    digest = hashlib.sha256(json.dumps(event, sort_keys=True).encode()).hexdigest()[:32]
    return f"{event['type']}:{data['timestamp']}:{digest}"


def records_from_events(events: Iterable[dict[str, Any]]) -> Iterator[StoreRecord]:
    """Store records for simulated events: dedup by key, payments and batches joined.

    The simulator's input is clean (every settled/verified/failed event has a received
    one, delivered before or after it; every batch:settled a batch:created), so this
    join is much simpler than the ledger's, and yields the same records.
    """
    seen: set[str] = set()
    payments: dict[str, tuple[str, str, str, int]] = {}
    batches: dict[str, tuple[str, int, int]] = {}
    waiting: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        kind = event["type"]
        data = event["data"]
        if kind in ("payment:failed",) and data["paymentId"] == "unknown":
            key = _anonymous_key(event)
        elif kind.startswith("payment:"):
            key = f"{kind}:{data['paymentId']}"
        elif kind.startswith("batch:"):
            key = f"{kind}:{data['batchId']}"
        else:
            key = _anonymous_key(event)
        if key in seen:
            continue
        seen.add(key)
        yield from _join(kind, key, data, payments, batches, waiting)


def _join(
    kind: str,
    key: str,
    data: dict[str, Any],
    payments: dict[str, tuple[str, str, str, int]],
    batches: dict[str, tuple[str, int, int]],
    waiting: dict[str, list[dict[str, Any]]],
) -> Iterator[StoreRecord]:
    ts = int(data["timestamp"])
    if kind == "payment:received":
        pid = data["paymentId"]
        amount = to_micro(data["amount"])
        payments[pid] = (data["network"], data["payer"].lower(), data["payee"].lower(), amount)
        yield PaymentRecord(key, ts, data["network"], "received", pid, *payments[pid][1:])
        for late in waiting.pop(pid, []):
            yield from _join(late["type"], late["key"], late["data"], payments, batches, waiting)
    elif kind in ("payment:verified", "payment:settled", "payment:failed"):
        pid = data["paymentId"]
        if kind == "payment:failed" and pid == "unknown":
            network = data.get("network") or "unknown"
            yield PaymentRecord(key, ts, network, "failed", pid, error=data["error"])
            return
        joined = payments.get(pid)
        if joined is None:
            waiting.setdefault(pid, []).append({"type": kind, "key": key, "data": data})
            return
        network, payer, payee, amount = joined
        if kind == "payment:verified":
            yield PaymentRecord(
                key,
                ts,
                network,
                "verified",
                pid,
                payer,
                payee,
                amount,
                verification_ms=float(data["verificationTime"]),
            )
        elif kind == "payment:settled":
            yield PaymentRecord(
                key,
                ts,
                network,
                "settled",
                pid,
                payer,
                payee,
                amount,
                fee_micro=to_micro(data["fee"]),
                settlement_ms=float(data["settlementTime"]),
                tx=data["transaction"],
            )
        else:
            yield PaymentRecord(
                key, ts, network, "failed", pid, payer, payee, amount, error=data["error"]
            )
    elif kind == "batch:created":
        bid = data["batchId"]
        total = to_micro(data["totalAmount"])
        batches[bid] = (data["network"], int(data["paymentCount"]), total)
        yield BatchRecord(key, ts, data["network"], "created", bid, *batches[bid][1:])
        for late in waiting.pop(bid, []):
            yield from _join(late["type"], late["key"], late["data"], payments, batches, waiting)
    elif kind == "batch:settled":
        bid = data["batchId"]
        created = batches.get(bid)
        if created is None:
            waiting.setdefault(bid, []).append({"type": kind, "key": key, "data": data})
            return
        network, count, total = created
        yield BatchRecord(
            key,
            ts,
            network,
            "settled",
            bid,
            count,
            total,
            to_micro(data["totalFees"]),
            int(data["gasUsed"]),
            data["transaction"],
        )
    elif kind == "revenue:recorded":
        yield RevenueRecord(
            key,
            ts,
            data["network"],
            data["kind"],
            to_micro(data["amount"]),
            data.get("paymentId"),
        )
    elif kind == "websocket:clients":
        yield WebsocketRecord(key, ts, int(data["count"]))


async def load(
    store: DuckDBStore, payments: int, days: float, seed: int, end_ms: int = END_MS
) -> int:
    """Write the records of ``payments`` simulated payments ending at ``end_ms`` into
    ``store``; returns the count."""
    sim = Simulator(SimulationConfig(seed=seed))
    batch: list[StoreRecord] = []
    written = 0
    for record in records_from_events(sim.history(payments, days, end_ms)):
        batch.append(record)
        if len(batch) >= _WRITE_BATCH:
            await store.write(batch)
            written += len(batch)
            batch = []
    if batch:
        await store.write(batch)
        written += len(batch)
    return written


class _TimedSource:
    """Delegates to a source one call at a time, adding up the seconds of each method."""

    def __init__(self, inner: DuckDBAnalyticsSource) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = asyncio.Lock()

    async def _timed(self, name: str, call: Awaitable[_T]) -> _T:
        async with self._lock:
            started = time.perf_counter()
            try:
                return await call
            finally:
                self.seconds[name] += time.perf_counter() - started

    async def window_totals(self, at_ms: int, spans_ms: Sequence[int]) -> dict[int, WindowTotals]:
        return await self._timed("window_totals", self.inner.window_totals(at_ms, spans_ms))

    async def settled_buckets(
        self, at_ms: int, spans_ms: Sequence[int], bucket_ms: int
    ) -> dict[int, list[BucketTotals]]:
        name = f"settled_buckets({'hour' if bucket_ms == HOUR_MS else 'day'})"
        return await self._timed(name, self.inner.settled_buckets(at_ms, spans_ms, bucket_ms))

    async def settled_order_values(
        self, at_ms: int, ranks: Mapping[int, RankRequest]
    ) -> dict[int, RankValues]:
        return await self._timed(
            "settled_order_values", self.inner.settled_order_values(at_ms, ranks)
        )

    async def top_lists(
        self, at_ms: int, spans_ms: Sequence[int], limit: int
    ) -> dict[int, TopLists]:
        return await self._timed("top_lists", self.inner.top_lists(at_ms, spans_ms, limit))

    async def point_in_time(self, at_ms: int) -> PointInTime:
        return await self._timed("point_in_time", self.inner.point_in_time(at_ms))

    async def close(self) -> None:
        await self.inner.close()


async def _load(path: Path, args: argparse.Namespace) -> None:
    store = DuckDBStore.open(path, memory_limit=_LOAD_MEMORY_LIMIT, threads=args.threads)
    try:
        started = time.perf_counter()
        written = await load(store, args.payments, args.days, args.seed)
        _write(
            f"loaded {args.payments:,} payments over {args.days:g} days: {written:,} records "
            f"in {time.perf_counter() - started:.1f} s {store.counts()}"
        )
    finally:
        await store.close()


async def _main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "store.duckdb"
        if path.exists():
            _write(f"reusing {path} (its own payments and days)")
        else:
            await _load(path, args)
        store = DuckDBStore.open(path, memory_limit=args.memory_limit, threads=args.threads)
        try:
            _write(
                f"store {store.counts()}; DuckDB memory_limit {args.memory_limit}, "
                f"threads {args.threads}"
            )
            source = DuckDBAnalyticsSource(store)
            analytics = Analytics(source)
            timings: list[float] = []
            results = 0
            for run in range(args.runs):
                at_ms = END_MS - run * 60_000  # a scheduler's successive refreshes
                started = time.perf_counter()
                snapshot = await analytics.compute_all(at_ms)
                timings.append(time.perf_counter() - started)
                results = len(snapshot)
            median, worst = statistics.median(timings), max(timings)
            _write(
                f"compute_all ({results} results: every analytic x window) over "
                f"{args.runs} runs: median {median:.3f} s, max {worst:.3f} s "
                f"(target <= {TARGET_S:.1f} s: {'met' if worst <= TARGET_S else 'MISSED'}); "
                f"runs: {', '.join(f'{t:.3f}' for t in timings)}"
            )
            timed = _TimedSource(source)
            await Analytics(timed).compute_all(END_MS)
            _write(
                "one more refresh, seconds per store query: "
                + ", ".join(f"{name} {sec:.3f}" for name, sec in timed.seconds.items())
            )
            await _minute_refreshes(analytics, args.runs)
        finally:
            await store.close()


async def _minute_refreshes(analytics: Analytics, runs: int) -> None:
    """CPU of the refreshes due at each minute (realtime, 1h, 6h, 24h): one computation
    each, as separate jobs would run them, against one shared computation."""
    windows = [Window.H1, Window.H6, Window.H24]
    one_each: list[float] = []
    shared: list[float] = []
    for run in range(runs):
        at_ms = END_MS - run * 60_000
        started = time.process_time()
        await analytics.compute_all(at_ms, windows=[], realtime=True)
        for window in windows:
            await analytics.compute_all(at_ms, windows=[window], realtime=False)
        one_each.append(time.process_time() - started)
        started = time.process_time()
        await analytics.compute_all(at_ms, windows=windows, realtime=True)
        shared.append(time.process_time() - started)
    each, together = statistics.median(one_each), statistics.median(shared)
    _write(
        f"refreshes due each minute (realtime, 1h, 6h, 24h), CPU seconds, median of {runs}: "
        f"one computation each {each:.3f}, one shared {together:.3f} "
        f"({together / each:.2f} x)"
    )


def main() -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--db", help="store file to keep and reuse (default: a temporary one)")
    memory, threads = DUCKDB_MEMORY_LIMIT, DUCKDB_THREADS
    parser.add_argument("--memory-limit", default=memory, help=f"DuckDB buffer pool ({memory})")
    parser.add_argument("--threads", type=int, default=threads, help=f"DuckDB threads ({threads})")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
