"""``backfill``: derive the store records of the ledger's whole history again and write
them to a store, resumably."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ..config import InfluxApi, Settings, StoreKind
from ..errors import ExporterError, OperatorError
from ..events import parse_event_json
from ..ledger import GroupCommitter, Ledger, PreparedEvent, Submission
from ..metrics import Metrics
from ..records import Store
from ..store import Forwarder, open_store
from .common import (
    DATA_DIR_HELP,
    DRAIN_SECONDS,
    REPLAY_BATCH_EVENTS,
    existing_ledger,
    locked_data_dir,
    non_negative_float,
    settings_from_args,
    sqlite_files,
    write_json_atomically,
)
from .progress import Progress

if TYPE_CHECKING:
    from .common import Commands


@dataclass
class BackfillSummary:
    """What a backfill did."""

    target: str
    events: int = 0
    resumed_from_seq: int = 0
    records_written: int = 0
    complete: bool = False
    left_in_scratch: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "target": self.target,
            "events": self.events,
            "resumedFromSeq": self.resumed_from_seq,
            "recordsWritten": self.records_written,
            "complete": self.complete,
        }


def _target_settings(settings: Settings, target: StoreKind) -> Settings:
    return settings.model_copy(update={"store": target, "stores": None})


class _CountingStore:
    """A store wrapper counting the records it was given."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.name = store.name
        self.written = 0

    async def write(self, records: list[Any]) -> list[Any]:
        refused = await self.inner.write(records)
        self.written += len(records)
        return refused

    async def close(self) -> None:
        await self.inner.close()


def _progress_file(settings: Settings, target: StoreKind) -> Path:
    return settings.data_dir / f"backfill-{target.value}.json"


def _scratch_path(settings: Settings, target: StoreKind) -> Path:
    return settings.data_dir / f"backfill-{target.value}.sqlite3"


async def backfill(
    settings: Settings,
    target: StoreKind,
    *,
    err: IO[str],
    restart: bool = False,
    drain_seconds: float = 60.0,
    batch_events: int = REPLAY_BATCH_EVENTS,
    store_factory: Callable[[Settings], Store] = open_store,
) -> BackfillSummary:
    """Re-deliver the ledger's whole history to ``target``, resumably.

    The ledger keeps events, not the store records it already delivered, so the records
    are derived again by committing the events in order to a scratch ledger in the data
    directory (``backfill-<target>.sqlite3``) whose outbox the exporter's forwarder
    drains into the target. ``backfill-<target>.json`` records the last source event
    committed; a rerun continues from there (store writes are idempotent per key, so
    anything written twice is held once). Both files are removed when the run completes.
    """
    existing_ledger(settings, "backfill")
    v1 = settings.influx_api is InfluxApi.V1
    if target is StoreKind.INFLUXDB and not (
        settings.influx_url and (v1 or (settings.influx_token and settings.influx_org))
    ):
        raise OperatorError(
            "backfill: --to influxdb needs EXPORTER_INFLUX_URL"
            + ("" if v1 else ", EXPORTER_INFLUX_TOKEN and EXPORTER_INFLUX_ORG"),
            2,
        )
    with locked_data_dir(settings, "backfill"):
        return await backfill_locked(
            settings, target, err, restart, drain_seconds, batch_events, store_factory
        )


async def backfill_locked(
    settings: Settings,
    target: StoreKind,
    err: IO[str],
    restart: bool,
    drain_seconds: float,
    batch_events: int,
    store_factory: Callable[[Settings], Store],
) -> BackfillSummary:
    """:func:`backfill` once the caller holds the data directory's lock."""
    target_settings = _target_settings(settings, target)
    summary = BackfillSummary(target.value)
    progress_path = _progress_file(settings, target)
    scratch_path = _scratch_path(settings, target)
    if restart:
        for stale in (progress_path, *sqlite_files(scratch_path)):
            stale.unlink(missing_ok=True)
    after = 0
    if progress_path.exists():
        after = int(json.loads(progress_path.read_text())["lastSourceSeq"])
        err.write(f"backfill: resuming after ledger event {after}\n")
    summary.resumed_from_seq = after
    try:
        store = _CountingStore(await asyncio.to_thread(store_factory, target_settings))
    except ExporterError as error:
        raise OperatorError(f"backfill: cannot open the {target.value} store: {error}") from None
    source = await asyncio.to_thread(Ledger, settings.ledger_path, settings.durability)
    scratch = await asyncio.to_thread(Ledger, scratch_path, settings.durability)
    # The records derived again take the offsets they had (docs/architecture.md section 6).
    for rows in source.iter_point_times():
        await asyncio.to_thread(scratch.adopt_point_times, rows)
    committer = GroupCommitter(scratch)
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()), settings.store_batch_size)
    committer.on_commit_hooks.append(forwarder.wake)
    total = source.stats().events
    progress = Progress(err, "events", total)
    forwarder.start()
    try:
        pending: list[PreparedEvent] = []
        last_seq = after

        async def commit() -> None:
            if pending:
                await committer.submit(Submission(list(pending)))
                pending.clear()
            await asyncio.to_thread(
                write_json_atomically, progress_path, {"lastSourceSeq": last_seq}
            )

        seen = 0
        for seq, key, body in source.iter_events():
            seen += 1
            if seq <= after:
                continue
            blob = bytes(body)
            event = parse_event_json(blob)
            pending.append(PreparedEvent.keyed(event, key, blob, blob))
            last_seq = seq
            summary.events += 1
            if len(pending) >= batch_events:
                await commit()
                progress.update(seen, seen)
        await commit()
        # Events whose join partner never arrived were released by the exporter after
        # its join timeout; the whole history is here, so release them now.
        await committer.call(
            functools.partial(scratch.release_unjoined, int(time.time() * 1000) + 1)
        )
        progress.update(seen, seen)
    finally:
        await forwarder.stop(drain_seconds)
        progress.finish()
        summary.records_written = store.written
        summary.left_in_scratch = scratch.backlog
        await store.close()
        await asyncio.to_thread(committer.close)
        await asyncio.to_thread(scratch.close)
        await asyncio.to_thread(source.close)
    if summary.left_in_scratch == 0:
        summary.complete = True
        for done in (progress_path, *sqlite_files(scratch_path)):
            done.unlink(missing_ok=True)
    return summary



def _backfill(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = settings_from_args(args)
    summary = asyncio.run(
        backfill(
            settings,
            StoreKind(args.to),
            err=sys.stderr,
            restart=args.restart,
            drain_seconds=args.drain_timeout,
        )
    )
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    if not summary.complete:
        sys.stderr.write(
            f"backfill: {summary.left_in_scratch} records not delivered to {args.to}; "
            "run the same command again to resume\n"
        )
        return 1
    return 0


def add_parser(commands: Commands) -> None:
    """Add ``backfill`` to the command line."""
    backfill = commands.add_parser(
        "backfill",
        help="re-deliver the ledger's history to a store (e.g. move to InfluxDB)",
        description="Derive the store records of every event in the ledger again and write "
        "them to the chosen store, with progress on stderr. Resumable: an interrupted run "
        "continues where it stopped when run again (files backfill-STORE.* in the data "
        "directory). Needs the data directory to itself. Exit 1 when not everything was "
        "delivered.",
    )
    backfill.add_argument(
        "--to",
        required=True,
        choices=(StoreKind.INFLUXDB.value, StoreKind.DUCKDB.value),
        help="target store: influxdb (EXPORTER_INFLUX_* settings) or duckdb "
        "(DATA_DIR/store.duckdb)",
    )
    backfill.add_argument(
        "--restart", action="store_true", help="discard a previous run's progress and start over"
    )
    backfill.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=DRAIN_SECONDS,
        help="seconds to keep delivering after the last event before giving up for this run "
        f"(default {DRAIN_SECONDS:g})",
    )
    backfill.add_argument("--data-dir", help=DATA_DIR_HELP)
    backfill.set_defaults(run=_backfill)
