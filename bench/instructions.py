"""Instructions per event of the ingest stages, counted by valgrind: a figure noise cannot move.

Throughput and even CPU time on a shared machine vary with what its neighbours run (the
same code measured 20,000 and 35,000 events/s within minutes here). Instruction counts do
not. For each ``--src`` checkout this runs, under ``valgrind --tool=cachegrind``, the
stages :mod:`bench.ledger` measures (parse, prepare, ledger commit, delivery and, unless
``--no-store``, the DuckDB write with one DuckDB thread) over the same simulated events
twice: ``--prefill`` + ``--events`` and ``--prefill`` + 4 x ``--events``. The difference,
divided by 3 x ``--events``, is the instructions per event of a ledger of that size,
without start-up and imports. The first ``--src`` is the baseline of the ratios printed.

The events are generated once by this checkout's simulator and read from a file by every
run, so two checkouts see the same bytes. Needs valgrind (Debian: ``apt-get install
valgrind``); a run takes a minute or two per checkout.

Run: ``.venv/bin/python bench/instructions.py --src OLD --src NEW [--events N] [--prefill N]
[--no-store]``
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--src", type=Path, action="append", help="checkout (repeat; first: baseline)"
    )
    parser.add_argument("--events", type=int, default=2_000, help="events of the shorter run")
    parser.add_argument("--prefill", type=int, default=4_000, help="events committed first")
    parser.add_argument("--no-store", action="store_true", help="leave the DuckDB write out")
    parser.add_argument(
        "--child", nargs=3, metavar=("SRC", "LINES", "COUNT"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def _child(src: str, lines_path: str, count: int, with_store: bool) -> None:
    """Run the stages over the first ``count`` events of ``lines_path`` with ``src``'s code."""
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, src)
    ledger_bench = importlib.import_module("ledger")
    lines = Path(lines_path).read_bytes().split(b"\n")[:count]
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        stages = ledger_bench._Stages(Path(tmp), False)
        if with_store:
            store_mod = importlib.import_module("exporter.store.duckdb")
            stages.store = store_mod.DuckDBStore.open(Path(tmp) / "store.duckdb", threads=1)
        ledger_bench._run_batches(stages, lines, 1_000)
        stages.ledger.close()


def _instructions(src: Path, lines_path: Path, count: int, with_store: bool) -> int:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(lines_path)]
    argv.append(str(count))
    if not with_store:
        argv.append("--no-store")
    done = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
        + argv,
        capture_output=True,
        text=True,
        check=True,
        # String hashes decide the order of sets and dicts, and so which paths run:
        # randomised, two runs of the same checkout differed by 500 instructions per event.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise SystemExit(f"valgrind printed no instruction count:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Count instructions per event for each checkout and print them with their ratios."""
    args = _parse(argv)
    if args.child:
        src, lines_path, count = args.child
        _child(src, lines_path, int(count), not args.no_store)
        return 0
    if shutil.which("valgrind") is None:
        _write("bench/instructions.py needs valgrind: apt-get install valgrind")
        return 2
    sources = [path.resolve() for path in (args.src or [ROOT])]
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    ledger_bench = importlib.import_module("ledger")
    short, long_ = args.prefill + args.events, args.prefill + 4 * args.events
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        lines_path = Path(tmp) / "events.ndjson"
        lines_path.write_bytes(b"\n".join(ledger_bench._lines(long_, 7)))
        per_event: list[float] = []
        for src in sources:
            counts = [_instructions(src, lines_path, n, not args.no_store) for n in (short, long_)]
            per_event.append((counts[1] - counts[0]) / (long_ - short))
            ratio = per_event[-1] / per_event[0]
            _write(f"{src}: {per_event[-1]:,.0f} instructions per event ({ratio:.3f} x the first)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
