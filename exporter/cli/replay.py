"""``replay``: ingest NDJSON event files through validation and the ledger, as
``POST /v1/events`` does, then deliver the store records with the exporter's own
:class:`~exporter.store.Forwarder` until the outbox is drained."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry

from ..config import Settings
from ..errors import ExporterError, OperatorError
from ..events import EventError, MalformedJSONError, parse_event_json
from ..ledger import GroupCommitter, Ledger, Outcome, PreparedEvent, Submission
from ..metrics import Metrics
from ..store import Forwarder, close_stores, open_stores
from .common import (
    DATA_DIR_HELP,
    DRAIN_SECONDS,
    REPLAY_BATCH_EVENTS,
    locked_data_dir,
    non_negative_float,
    settings_from_args,
    writable_data_dir,
)
from .progress import Progress

if TYPE_CHECKING:
    from .common import Commands

_GZIP_MAGIC = b"\x1f\x8b"


@contextlib.asynccontextmanager
async def delivering(
    settings: Settings, committer: GroupCommitter, deliver: bool, drain_seconds: float
) -> AsyncIterator[list[Forwarder]]:
    """Run the exporter's forwarders from ``committer``'s ledger to the configured stores
    (none without ``deliver``).

    On exit the forwarders drain the outbox for up to ``drain_seconds`` and the stores are
    closed; what is not delivered stays in the ledger for the exporter's next start.
    """
    if not deliver:
        yield []
        return
    try:
        stores = await open_stores(settings)
    except ExporterError as error:
        raise OperatorError(f"cannot open the store: {error}") from None
    metrics = Metrics(CollectorRegistry())
    forwarders = [
        Forwarder(committer, store, metrics, settings.store_batch_size, sink=store.name)
        for store in stores
    ]
    for forwarder in forwarders:
        committer.on_commit_hooks.append(forwarder.wake)
        forwarder.start()
    try:
        yield forwarders
    finally:
        await asyncio.gather(*(forwarder.stop(drain_seconds) for forwarder in forwarders))
        await close_stores(stores)



@dataclass
class ReplaySummary:
    """What a replay did."""

    files: int = 0
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    delivered_to: str | None = None
    left_in_ledger: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "files": self.files,
            "lines": self.lines,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": dict(sorted(self.rejected.items())),
            "rejectedTotal": sum(self.rejected.values()),
            "store": self.delivered_to,
            "leftInLedger": self.left_in_ledger,
        }


def _open_input(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(raw file, line reader): gzip is recognised by its magic bytes, not the name."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    head = raw.read(2)
    raw.seek(0)
    if head == _GZIP_MAGIC:
        return raw, cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw, raw


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, bytes of the file consumed so far) for each non-blank line."""
    raw, reader = _open_input(path)
    with raw, reader:
        for number, line in enumerate(reader, start=1):
            if line.strip():
                yield number, line.rstrip(b"\r\n"), raw.tell()


async def replay(
    settings: Settings,
    paths: Sequence[Path],
    *,
    err: IO[str],
    deliver: bool = True,
    drain_seconds: float = 60.0,
    batch_events: int = REPLAY_BATCH_EVENTS,
    max_reported: int = 100,
) -> ReplaySummary:
    """Feed NDJSON files (plain or gzip) through validation and the ledger, then the store.

    Bad lines are reported on ``err`` as ``file:line: reason: message`` (the first
    ``max_reported``) and counted; they never stop the rest.
    """
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise OperatorError(f"replay: no such file: {', '.join(missing)}", 2)
    summary = ReplaySummary(files=len(paths))
    total_bytes = sum(p.stat().st_size for p in paths)
    progress = Progress(err, "events", total_bytes)
    reported = 0

    def report(where: str, reason: str, message: str) -> None:
        nonlocal reported
        summary.rejected[reason] += 1
        reported += 1
        if reported <= max_reported:
            err.write(f"{where}: {reason}: {message}\n")
        elif reported == max_reported + 1:
            err.write(f"(more rejected lines are counted but not listed after {max_reported})\n")

    writable_data_dir(settings, "replay")
    with locked_data_dir(settings, "replay"):
        ledger = await asyncio.to_thread(
            Ledger, settings.ledger_path, settings.durability, sinks=settings.sink_names
        )
        committer = GroupCommitter(ledger)
        try:
            async with delivering(settings, committer, deliver, drain_seconds) as forwarders:
                names = [forwarder.store.name for forwarder in forwarders]
                summary.delivered_to = ",".join(names) if names else None
                pending: list[tuple[str, PreparedEvent]] = []

                async def commit() -> None:
                    if not pending:
                        return
                    result = await committer.submit(Submission([p for _, p in pending]))
                    for (where, _), outcome in zip(pending, result.outcomes, strict=True):
                        if outcome is Outcome.ACCEPTED:
                            summary.accepted += 1
                        elif outcome is Outcome.DUPLICATE:
                            summary.duplicates += 1
                        else:
                            report(
                                where,
                                "conflict",
                                "an event with the same id was already stored with a "
                                "different body (kept as a dead letter)",
                            )
                    pending.clear()

                done_before = 0
                for path in paths:
                    consumed = 0
                    for number, line, consumed in _iter_lines(path):
                        summary.lines += 1
                        where = f"{path}:{number}"
                        try:
                            event = parse_event_json(line)
                        except MalformedJSONError as error:
                            report(where, "malformed", f"not valid JSON: {error}")
                            continue
                        except EventError as error:
                            report(where, "invalid", str(error))
                            continue
                        pending.append((where, PreparedEvent.of(event, line)))
                        if len(pending) >= batch_events:
                            await commit()
                            progress.update(summary.lines, done_before + consumed)
                    done_before += path.stat().st_size
                await commit()
                progress.update(summary.lines, done_before)
        finally:
            progress.finish()
            summary.left_in_ledger = ledger.backlog
            await asyncio.to_thread(committer.close)
            await asyncio.to_thread(ledger.close)
    return summary



def _replay(args: argparse.Namespace) -> int:
    if args.no_deliver and args.drain_timeout is not None:
        raise OperatorError(
            "replay: --drain-timeout does not apply with --no-deliver (nothing is delivered); "
            "drop one of them",
            2,
        )
    logging.basicConfig(level=logging.WARNING)
    settings = settings_from_args(args)
    summary = asyncio.run(
        replay(
            settings,
            [Path(p) for p in args.files],
            err=sys.stderr,
            deliver=not args.no_deliver,
            drain_seconds=DRAIN_SECONDS if args.drain_timeout is None else args.drain_timeout,
        )
    )
    if summary.delivered_to is None:
        sys.stderr.write(
            "replay: committed to the ledger only; the exporter delivers the records to "
            "the store when it next starts\n"
        )
    elif summary.left_in_ledger:
        sys.stderr.write(
            f"replay: {summary.left_in_ledger} store records not yet delivered to "
            f"{summary.delivered_to}; the exporter delivers them when it next starts\n"
        )
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    return 1 if summary.rejected else 0


def add_parser(commands: Commands) -> None:
    """Add ``replay`` to the command line."""
    replay = commands.add_parser(
        "replay",
        help="ingest NDJSON event files through the ledger, as POST /v1/events does",
        description="Validate each line of the files like POST /v1/events, commit the events "
        "to the ledger (deduplicated: replaying twice changes nothing) and deliver the store "
        "records by running the forwarder until the outbox is drained. Needs the data "
        "directory to itself: refuses while an exporter runs on it. Progress (events/s, "
        "ETA) goes to stderr; the summary (accepted, duplicates, rejected by reason) to "
        "stdout as JSON. Bad lines are reported as FILE:LINE and skipped. Exit 1 when a "
        "line was rejected.",
    )
    replay.add_argument(
        "files", nargs="+", metavar="FILE", help="NDJSON files, plain or gzip (.ndjson.gz)"
    )
    replay.add_argument("--data-dir", help=DATA_DIR_HELP)
    replay.add_argument(
        "--no-deliver",
        action="store_true",
        help="only commit to the ledger; the exporter delivers to the store on its next start "
        "(use when the store is unreachable now)",
    )
    replay.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        help="seconds to keep delivering to the store after the last line; what is left "
        f"stays in the ledger for the next start (default {DRAIN_SECONDS:g}; not with "
        "--no-deliver)",
    )
    replay.set_defaults(run=_replay)
