"""Store benchmark: CPU per record of DuckDB store writes as the store grows.

Writes ``--rounds`` rounds of ``--round-records`` settled payments (200,000 by default)
into one DuckDB store, in the forwarder's batches of 5,000, each round an hour of
simulated time after the previous one, and prints for each round the process CPU per
record written (DuckDB's threads included) and its slowest writes: the ones that ran a
checkpoint. ``--vacuum`` restores DuckDB's default of vacuuming at checkpoints, which
the store turns off (see :mod:`exporter.store.duckdb`), to compare the two.

Run: ``.venv/bin/python bench/store.py [--rounds N] [--round-records N] [--vacuum]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exporter.records import PaymentRecord, StoreRecord  # noqa: E402
from exporter.store.duckdb import DuckDBStore  # noqa: E402

HOUR_MS = 3_600_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BATCH = 5_000  # the forwarder's default batch


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _payments(round_: int, count: int) -> list[StoreRecord]:
    """``count`` settled payments spread over the ``round_``-th hour."""
    start = START_MS + round_ * HOUR_MS
    return [
        PaymentRecord(
            f"payment:settled:r{round_}-{i:07d}",
            start + i * HOUR_MS // count,
            "eip155:8453",
            "settled",
            f"r{round_}-{i}",
            "0x" + f"{i % 5_000:040x}",
            "0x" + f"{i % 300:040x}",
            10_000 + i % 1_000,
            fee_micro=100,
            settlement_ms=1_500.0 + i % 700,
            tx="0x" + f"{i:064x}",
        )
        for i in range(count)
    ]


async def _run(args: argparse.Namespace, path: Path) -> None:
    store = DuckDBStore.open(path)
    try:
        if args.vacuum:
            store.query("SET GLOBAL max_vacuum_tasks = 100")  # DuckDB's default
        [(setting,)] = store.query("SELECT current_setting('max_vacuum_tasks')")
        _write(
            f"{args.rounds} rounds of {args.round_records:,} payments in batches of {BATCH:,}; "
            f"max_vacuum_tasks {setting}"
        )
        for round_ in range(args.rounds):
            records = _payments(round_, args.round_records)
            writes: list[float] = []
            started = time.process_time()
            for first in range(0, len(records), BATCH):
                began = time.perf_counter()
                await store.write(records[first : first + BATCH])
                writes.append(time.perf_counter() - began)
            cpu = time.process_time() - started
            typical = statistics.median(writes)
            slow = sorted((w for w in writes if w > 4 * typical), reverse=True)
            shown = ", ".join(f"{w * 1000:.0f} ms" for w in slow[:4]) or "none"
            _write(
                f"round {round_ + 1}: {cpu / len(records) * 1e6:5.2f} µs CPU per record; "
                f"writes: median {typical * 1000:.1f} ms, over 4 x the median: {shown}"
            )
    finally:
        await store.close()


def main() -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-records", type=int, default=200_000)
    parser.add_argument(
        "--vacuum", action="store_true", help="vacuum at checkpoints (DuckDB's default)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        asyncio.run(_run(args, Path(tmp) / "store.duckdb"))


if __name__ == "__main__":
    main()
