"""Ledger benchmark: CPU per event of each ingest stage, in-process, without HTTP.

Wall-clock throughput on a shared machine is noisy; CPU time per event of one stage is
much steadier. This harness generates unique simulated events (not timed), commits
``--prefill`` of them so that the ledger's indexes have a realistic size, then for each
of ``--reps`` repetitions takes ``--events`` fresh events through the stages the
exporter runs for an NDJSON batch, ``--batch`` events at a time:

- parse: ``parse_event_json`` per line (the receiver's NDJSON path);
- prepare: canonical body, dedup key and :class:`PreparedEvent`;
- commit: ``Ledger.commit`` of one submission per batch (thread CPU of the committing
  thread, i.e. the ledger writer's Python and SQLite work), and the process CPU over
  the same span (adds the WAL checkpointer thread);
- wal KiB: bytes the committing thread wrote (the WAL frames of the pages each
  transaction changed): a steady measure of the SQLite write work;
- deliver: ``Ledger.read_outbox`` + ``Ledger.mark_delivered`` per batch (the
  forwarder's ledger side);
- store: the DuckDB store's synchronous write of the delivered records (process CPU:
  DuckDB works on threads of its own);
- process: the process CPU of the whole repetition, every stage and thread (the WAL
  checkpoints included).

It prints microseconds of CPU per event for each stage: the median over the
repetitions, and the minimum. To compare two versions of the code, run it alternately
with ``--src`` pointing at each checkout.

Run: ``.venv/bin/python bench/ledger.py [--prefill N] [--events N] [--reps N] [--src DIR]``
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--prefill", type=int, default=200_000, help="events committed first")
    parser.add_argument("--events", type=int, default=20_000, help="events per repetition")
    parser.add_argument("--batch", type=int, default=1_000, help="events per commit")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-store", action="store_true", help="skip the DuckDB stage")
    parser.add_argument(
        "--src", type=Path, default=ROOT, help="checkout whose exporter package is measured"
    )
    return parser.parse_args(argv)


def _lines(count: int, seed: int) -> list[bytes]:
    from exporter.cli.simulate import SimulationConfig, Simulator, encode_event

    config = SimulationConfig(seed=seed, duplicate_fraction=0.0, id_namespace=f"bench{seed}")
    start_ms = int(time.time() * 1000) - 3_600_000
    lines: list[bytes] = []
    for event in Simulator(config).events(start_ms, None, max(50.0, count / 3_000)):
        lines.append(encode_event(event))
        if len(lines) == count:
            break
    return lines


def _written_bytes() -> int:
    """Bytes this thread has passed to write(2) so far (the ledger's WAL, when committing)."""
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/thread-self/io")


def _timed(clock: Callable[[], float], fn: Callable[[], Any]) -> tuple[float, Any]:
    start = clock()
    value = fn()
    return clock() - start, value


class _Stages:
    """The exporter's ingest stages, bound to one ledger (and store)."""

    def __init__(self, data_dir: Path, with_store: bool) -> None:
        ledger_mod = importlib.import_module("exporter.ledger")
        events_mod = importlib.import_module("exporter.events")
        self._ledger_mod = ledger_mod
        self._events = events_mod
        self.ledger = ledger_mod.Ledger(data_dir / "ledger.db")
        self.store: Any = None
        if with_store:
            store_mod = importlib.import_module("exporter.store.duckdb")
            self.store = store_mod.DuckDBStore.open(data_dir / "store.duckdb")

    def parse(self, lines: list[bytes]) -> list[Any]:
        parse_event_json = self._events.parse_event_json
        return [parse_event_json(line) for line in lines]

    def prepare(self, events: list[Any], lines: list[bytes]) -> Any:
        prepared_event, submission = self._ledger_mod.PreparedEvent, self._ledger_mod.Submission()
        if hasattr(prepared_event, "of"):
            pairs = zip(events, lines, strict=True)
            submission.events = [prepared_event.of(event, raw) for event, raw in pairs]
            return submission
        # A checkout from before PreparedEvent.of (bench/instructions.py --src OLD).
        canonical_json, dedup_key = self._events.canonical_json, self._events.dedup_key
        for event, raw in zip(events, lines, strict=True):
            body = canonical_json(event)
            submission.events.append(prepared_event(event, dedup_key(event, body), body, raw))
        return submission

    def commit(self, submission: Any) -> None:
        self.ledger.commit([submission])

    def deliver(self) -> list[Any]:
        rows = self.ledger.read_outbox(1_000_000)
        if rows:
            self.ledger.mark_delivered(rows[-1].seq)
        return [row.record for row in rows]

    def write_store(self, records: list[Any]) -> None:
        if self.store is not None and records:
            self.store._write_sync(records)


def _run_batches(stages: _Stages, lines: list[bytes], batch: int) -> dict[str, float]:
    stages_ = ("parse", "prepare", "commit", "commit+ckpt", "wal KiB", "deliver", "store")
    totals = dict.fromkeys(stages_, 0.0)
    tt, pt = time.thread_time, time.process_time
    run_start = pt()
    for start in range(0, len(lines), batch):
        chunk = lines[start : start + batch]
        seconds, events = _timed(tt, partial(stages.parse, chunk))
        totals["parse"] += seconds
        seconds, submission = _timed(tt, partial(stages.prepare, events, chunk))
        totals["prepare"] += seconds
        process_start, written = pt(), _written_bytes()
        seconds, _ = _timed(tt, partial(stages.commit, submission))
        totals["commit"] += seconds
        totals["commit+ckpt"] += pt() - process_start
        totals["wal KiB"] += (_written_bytes() - written) / 1024 / 1e6
        seconds, records = _timed(tt, stages.deliver)
        totals["deliver"] += seconds
        seconds, _ = _timed(pt, partial(stages.write_store, records))
        totals["store"] += seconds
    totals["process"] = pt() - run_start
    return {name: value / len(lines) * 1e6 for name, value in totals.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Prefill a ledger, then report CPU µs per event of each stage over repetitions."""
    args = _parse(argv)
    sys.path.insert(0, str(args.src.resolve()))
    lines = _lines(args.prefill + args.events * args.reps, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        stages = _Stages(Path(tmp), not args.no_store)
        seconds, _ = _timed(
            time.perf_counter, lambda: _run_batches(stages, lines[: args.prefill], args.batch)
        )
        _write(f"source {args.src.resolve()}; prefilled {args.prefill} events in {seconds:.1f} s")
        runs: list[dict[str, float]] = []
        for rep in range(args.reps):
            start = args.prefill + rep * args.events
            runs.append(_run_batches(stages, lines[start : start + args.events], args.batch))
        stages.ledger.close()
        size = sum(p.stat().st_size for p in Path(tmp).glob("ledger.db*"))
    _write(f"{args.reps} x {args.events} events in batches of {args.batch}; CPU µs per event")
    _write(f"{'stage':<12} {'median':>8} {'min':>8}")
    for name in runs[0]:
        values = [run[name] for run in runs]
        _write(f"{name:<12} {statistics.median(values):8.2f} {min(values):8.2f}")
    _write(f"ledger file after the run: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
