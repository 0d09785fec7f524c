"""``recover``: check the ledger and the embedded store, move a damaged one aside and
rebuild it (the ledger from what can still be read of the damaged file, the store from
the ledger)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..config import Settings, StoreKind
from ..errors import LedgerCorruptError, LedgerError, OperatorError
from ..events import EventError, MalformedJSONError, parse_event_json
from ..ledger import (
    GroupCommitter,
    Ledger,
    Outcome,
    PreparedEvent,
    Submission,
    read_only_uri,
    recovery_marker,
)
from ..ledger.salvage import dead_letter_from_row, open_damaged, read_rows, scan_pages
from ..records import Store
from .backfill import backfill_locked
from .common import (
    DATA_DIR_HELP,
    DRAIN_SECONDS,
    REPLAY_BATCH_EVENTS,
    existing_data_dir,
    fsync_dir,
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
class RecoverySummary:
    """What a recovery found and did."""

    ledger_problem: str | None = None
    store_problem: str | None = None
    moved_aside: list[str] = field(default_factory=list)
    resumed: bool = False
    """An interrupted earlier run was found and started over from its damaged file."""
    salvaged_events: int = 0
    unreadable_events: int = 0
    """Rows whose body could not be parsed as an event."""
    unreadable_ranges: list[tuple[int, int]] = field(default_factory=list)
    """Ledger sequence numbers (first, last) the damaged ledger's b-tree could not lead
    to; a last of 2**62 or more means "to the end"."""
    page_scan_events: int = 0
    """Events of the unreadable ranges found by reading the file page by page."""
    salvaged_dead_letters: int = 0
    unreadable_dead_letters: int = 0
    """Dead letter rows read whose columns are not what the ledger writes."""
    unreadable_dead_letter_ranges: list[tuple[int, int]] = field(default_factory=list)
    """Dead letter ids (first, last) the damaged ledger's b-tree could not lead to."""
    store_records_written: int = 0
    store_complete: bool = True
    retention_removed_before_seq: int | None = None
    """Events before this ledger sequence number were deleted by retention: their store
    records could not be rebuilt."""

    @property
    def lossless(self) -> bool:
        """Whether everything the damaged files held was salvaged or rebuilt."""
        return (
            not self.unreadable_events
            and not self.unreadable_ranges
            and not self.unreadable_dead_letters
            and not self.unreadable_dead_letter_ranges
            and self.store_complete
            and self.retention_removed_before_seq is None
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""

        def ranges(found: list[tuple[int, int]]) -> list[list[int | None]]:
            return [[first, last if last < 2**62 else None] for first, last in found]

        return {
            "ledgerProblem": self.ledger_problem,
            "storeProblem": self.store_problem,
            "movedAside": self.moved_aside,
            "resumed": self.resumed,
            "salvagedEvents": self.salvaged_events,
            "unreadableEvents": self.unreadable_events,
            "unreadableSeqRanges": ranges(self.unreadable_ranges),
            "pageScanEvents": self.page_scan_events,
            "salvagedDeadLetters": self.salvaged_dead_letters,
            "unreadableDeadLetters": self.unreadable_dead_letters,
            "unreadableDeadLetterIdRanges": ranges(self.unreadable_dead_letter_ranges),
            "storeRecordsWritten": self.store_records_written,
            "storeComplete": self.store_complete,
            "retentionRemovedBeforeSeq": self.retention_removed_before_seq,
            "lossless": self.lossless,
        }


_LEDGER_COMPANIONS = ("-wal", "-shm")
_STORE_COMPANIONS = (".wal",)


def _ledger_problem(settings: Settings) -> str | None:
    """Why the ledger is damaged, or None; other failures to open it stop the command.

    A ledger that cannot be opened for another reason (disk full, locked, permissions)
    is not damaged, and moving it aside would not help: it stays where it is.
    """
    if not settings.ledger_path.exists():
        return None
    try:
        Ledger(settings.ledger_path, settings.durability).close()
    except LedgerCorruptError as error:
        return str(error)
    except LedgerError as error:
        raise OperatorError(f"recover: {error}; the ledger is left in place") from None
    return None


async def _store_problem(settings: Settings) -> str | None:
    from ..errors import StoreCorruptError
    from ..store.duckdb import DuckDBStore

    if StoreKind.DUCKDB not in settings.resolved_stores or not settings.duckdb_path.exists():
        return None
    try:
        store = await asyncio.to_thread(
            DuckDBStore.open,
            settings.duckdb_path,
            settings.duckdb_memory_limit,
            settings.duckdb_threads,
        )
    except StoreCorruptError as error:
        return str(error)
    except Exception as error:  # locked, permissions, I/O: not damage
        raise OperatorError(
            f"recover: cannot check the DuckDB store {settings.duckdb_path}: {error}; "
            "it is left in place"
        ) from None
    await store.close()
    return None


def _move_aside(path: Path, target: Path, companions: Sequence[str]) -> list[Path]:
    """Rename ``path`` and its companion files (``-wal``...) to ``target``.

    The companions keep their suffix after the new name, so SQLite and DuckDB still find
    a WAL beside the moved file when it is opened for salvage. They move first: once the
    main file is at ``target``, everything is (a rerun after a kill finishes the rest).
    """
    moved = []
    for suffix in (*companions, ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            destination = target.with_name(target.name + suffix)
            os.replace(source, destination)
            moved.append(destination)
    fsync_dir(path.parent)
    return moved[-1:] + moved[:-1]


def _begin_recovery(
    path: Path, companions: Sequence[str], summary: RecoverySummary, err: IO[str]
) -> Path:
    """Mark ``path`` as being recovered and move it aside; returns the damaged file.

    The marker (:func:`~exporter.ledger.recovery_marker`) is written before the rename
    and names the damaged file, so a run that stops anywhere after it leaves the
    exporter refusing to start and the next ``recover`` starting over from that file.
    """
    marker = recovery_marker(path)
    if marker.exists():
        target = path.with_name(json.loads(marker.read_text())["damaged"])
        summary.resumed = True
        err.write(f"recover: an earlier recovery of {path} was interrupted; starting it over\n")
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.damaged-{stamp}")
        for n in itertools.count(2):
            if not target.exists():
                break
            target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        write_json_atomically(marker, {"damaged": target.name})
    if not target.exists():
        if not path.exists():
            raise OperatorError(f"recover: neither {path} nor {target} exists")
        moved = _move_aside(path, target, companions)
        err.write(f"recover: moved aside to {moved[0]}\n")
    summary.moved_aside += [
        str(p)
        for p in (target, *(target.with_name(target.name + s) for s in companions))
        if p.exists()
    ]
    return target


def _end_recovery(built: Path, path: Path, companions: Sequence[str]) -> None:
    """Put the complete rebuilt file ``built`` in place of ``path``; drop the marker."""
    for suffix in companions:
        left = built.with_name(built.name + suffix)
        if left.exists():
            if left.stat().st_size > 0 and suffix != "-shm":
                raise OperatorError(
                    f"recover: {left} still holds data after closing {built}; run recover again"
                )
            left.unlink()
    with open(built, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(built, path)
    fsync_dir(path.parent)
    recovery_marker(path).unlink()
    fsync_dir(path.parent)


def _remove_sqlite_files(path: Path) -> None:
    for stale in sqlite_files(path):
        stale.unlink(missing_ok=True)



async def _salvage_ledger(
    damaged: Path, target: Path, settings: Settings, summary: RecoverySummary, err: IO[str]
) -> int | None:
    """Commit every readable event and dead letter of ``damaged`` to a new ledger at
    ``target``, in their old order; returns the first event sequence number read.

    Joins and store records are derived again as the events are committed; the new
    outbox reaches the store when the exporter next starts (the store skips records it
    already holds). Dead letters (refused input, the losing body of a conflict, store
    refusals) are copied with their original time.
    """
    conn = open_damaged(damaged)
    ledger: Ledger | None = None
    try:
        ledger = await asyncio.to_thread(Ledger, target, settings.durability)
        committer = GroupCommitter(ledger)
        progress = Progress(err, "events")
        first_seq: int | None = None

        async def submit(bodies: list[bytes]) -> None:
            prepared = []
            for body in bodies:
                try:
                    event = parse_event_json(body)
                except (EventError, MalformedJSONError):
                    summary.unreadable_events += 1
                    continue
                prepared.append(PreparedEvent.of(event, body))
            result = await committer.submit(Submission(prepared))
            summary.salvaged_events += result.outcomes.count(Outcome.ACCEPTED)
            progress.update(summary.salvaged_events)

        seen: set[int] = set()
        rows = read_rows(conn, "events", "seq", "body", summary.unreadable_ranges)
        try:
            while chunk := await asyncio.to_thread(
                lambda: list(itertools.islice(rows, REPLAY_BATCH_EVENTS))
            ):
                seen.update(int(seq) for seq, _ in chunk)
                await submit([bytes(body) for _, body in chunk])
            if summary.unreadable_ranges:
                # Pages the b-tree no longer leads to may still hold rows it did not
                # reach (a damaged page can also hold rowids that send the b-tree scan
                # past them).
                scanned = sorted(
                    (rowid, body)
                    for rowid, body in await asyncio.to_thread(lambda: list(scan_pages(damaged)))
                    if rowid not in seen
                )
                before = summary.salvaged_events
                for start in range(0, len(scanned), REPLAY_BATCH_EVENTS):
                    chunk_rows = scanned[start : start + REPLAY_BATCH_EVENTS]
                    seen.update(rowid for rowid, _ in chunk_rows)
                    await submit([body for _, body in chunk_rows])
                summary.page_scan_events = summary.salvaged_events - before
            first_seq = min(seen, default=None)
            letters = read_rows(
                conn,
                "dead_letters",
                "id",
                "received_at, reason, error, key, raw" + _raw_size_column(conn),
                summary.unreadable_dead_letter_ranges,
            )
            while chunk := await asyncio.to_thread(
                lambda: list(itertools.islice(letters, REPLAY_BATCH_EVENTS))
            ):
                letters_read = (dead_letter_from_row(row) for row in chunk)
                sound = [letter for letter in letters_read if letter is not None]
                summary.unreadable_dead_letters += len(chunk) - len(sound)
                await committer.submit(Submission(dead_letters=sound))
                summary.salvaged_dead_letters += len(sound)
        finally:
            progress.finish()
            await asyncio.to_thread(committer.close)
    finally:
        if ledger is not None:
            await asyncio.to_thread(ledger.close)
        conn.close()
    return first_seq


def _first_seq(path: Path) -> int | None:
    """The ledger's first event sequence number (None: it holds no event)."""
    conn = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        (first,) = conn.execute("SELECT min(seq) FROM events").fetchone()
    finally:
        conn.close()
    return None if first is None else int(first)


def _raw_size_column(conn: sqlite3.Connection) -> str:
    """``, raw_size`` when the damaged ledger's dead letters have it (files written before
    dead letters were truncated do not), else nothing."""
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
    except sqlite3.DatabaseError:  # the schema page is damaged: read what every file has
        return ""
    return ", raw_size" if "raw_size" in columns else ""


def _retention_gap(first_seq: int | None, unreadable: list[tuple[int, int]]) -> int | None:
    """The first event sequence number kept, when retention deleted those before it.

    ``first_seq`` is the first one the ledger held (the damaged ledger's, when it was
    salvaged: the new ledger numbers its events from 1 again). Sequence numbers lost to
    damage from the very first on are reported as unreadable, not as retention.
    """
    if first_seq is None or first_seq <= 1 or (unreadable and unreadable[0][0] == 1):
        return None
    return first_seq


async def _rebuild_store(
    settings: Settings, summary: RecoverySummary, err: IO[str], drain_seconds: float
) -> bool:
    """Rebuild the DuckDB store from the ledger into a file beside it; True when complete.

    The rebuilt file replaces the store only once every record is in it.
    """
    from ..store.duckdb import DuckDBStore

    building = settings.duckdb_path.with_name(settings.duckdb_path.name + ".recovering")
    for stale in (building, *(building.with_name(building.name + s) for s in _STORE_COMPANIONS)):
        stale.unlink(missing_ok=True)

    def open_building(target: Settings) -> Store:
        return DuckDBStore.open(building, target.duckdb_memory_limit, target.duckdb_threads)

    rebuilt = await backfill_locked(
        settings, StoreKind.DUCKDB, err, True, drain_seconds, REPLAY_BATCH_EVENTS, open_building
    )
    summary.store_records_written = rebuilt.records_written
    if rebuilt.complete:
        _end_recovery(building, settings.duckdb_path, _STORE_COMPANIONS)
    return rebuilt.complete


async def recover(
    settings: Settings, *, err: IO[str], drain_seconds: float = 60.0
) -> RecoverySummary:
    """Check the ledger and the embedded store; move a damaged one aside and rebuild it.

    A damaged ledger is renamed ``ledger.sqlite3.damaged-<UTC time>`` and every event
    and dead letter that can still be read from it is committed to a new ledger. A
    damaged DuckDB store is renamed likewise and rebuilt from the ledger's events by
    :func:`backfill`. Each is rebuilt in a ``.recovering`` file that replaces the old
    name only when complete, and a marker beside it (written before the rename) keeps
    the exporter from starting until then: a run that stops midway is started over by
    the next one. Files that pass the checks are left alone, so running it twice is
    harmless.
    """
    summary = RecoverySummary()
    ledger, store = settings.ledger_path, settings.duckdb_path
    existing_data_dir(settings, "recover")
    with locked_data_dir(settings, "recover"):
        if recovery_marker(ledger).exists():
            summary.ledger_problem = f"the recovery of {ledger} was interrupted"
        else:
            summary.ledger_problem = await asyncio.to_thread(_ledger_problem, settings)
        if recovery_marker(store).exists():
            summary.store_problem = f"the recovery of {store} was interrupted"
        else:
            summary.store_problem = await _store_problem(settings)
        first_seq: int | None = None
        if summary.ledger_problem is not None:
            err.write(f"recover: {summary.ledger_problem.split('. ', 1)[0]}\n")
            damaged = _begin_recovery(ledger, _LEDGER_COMPANIONS, summary, err)
            building = ledger.with_name(ledger.name + ".recovering")
            _remove_sqlite_files(building)
            err.write(f"recover: salvaging the events of {damaged}\n")
            first_seq = await _salvage_ledger(damaged, building, settings, summary, err)
            _end_recovery(building, ledger, _LEDGER_COMPANIONS)
        if summary.store_problem is not None:
            err.write(f"recover: {summary.store_problem.split('. ', 1)[0]}\n")
            _begin_recovery(store, _STORE_COMPANIONS, summary, err)
            if not ledger.exists():
                summary.store_complete = False  # nothing to rebuild it from
                recovery_marker(store).unlink()
            else:
                err.write("recover: rebuilding the store from the ledger\n")
                summary.store_complete = await _rebuild_store(settings, summary, err, drain_seconds)
                if summary.ledger_problem is None:
                    first_seq = await asyncio.to_thread(_first_seq, ledger)
                summary.retention_removed_before_seq = _retention_gap(
                    first_seq, summary.unreadable_ranges
                )
    return summary


def _recover(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = settings_from_args(args)
    summary = asyncio.run(recover(settings, err=sys.stderr, drain_seconds=args.drain_timeout))
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    if summary.ledger_problem is None and summary.store_problem is None:
        sys.stderr.write("recover: the ledger and the store are intact; nothing to do\n")
        return 0
    if not summary.store_complete and settings.ledger_path.exists():
        sys.stderr.write(
            "recover: the store is not fully rebuilt (the exporter does not start until it "
            f"is); run `facilitator-exporter recover --data-dir {settings.data_dir}` again\n"
        )
    elif not summary.store_complete:
        sys.stderr.write("recover: there is no ledger to rebuild the store from\n")
    if (
        summary.unreadable_ranges
        or summary.unreadable_events
        or summary.unreadable_dead_letters
        or summary.unreadable_dead_letter_ranges
    ):
        sys.stderr.write(
            f"recover: {summary.salvaged_events} events salvaged, but the damaged ledger "
            "could not be read in full (see unreadableSeqRanges, "
            "unreadableDeadLetterIdRanges), so some may be lost; "
            f"the damaged file is kept as {summary.moved_aside[0]}\n"
        )
    if summary.retention_removed_before_seq is not None:
        sys.stderr.write(
            "recover: retention had deleted the ledger's events before sequence number "
            f"{summary.retention_removed_before_seq}; their records are not in the "
            "rebuilt store\n"
        )
    return 0 if summary.lossless else 1


def add_parser(commands: Commands) -> None:
    """Add ``recover`` to the command line."""
    recover = commands.add_parser(
        "recover",
        help="move a damaged ledger or store aside and rebuild it",
        description="Check the ledger (its size against its header, then SQLite's "
        "quick_check) and the embedded DuckDB store (size against header, every block's "
        "checksum). A damaged file is renamed NAME.damaged-<UTC time> (never deleted): "
        "every readable event and dead letter of a damaged ledger is committed to a new "
        "ledger, and a damaged store is rebuilt from the ledger's events. Each is built as "
        "NAME.recovering and renamed into place when complete; NAME.recover-pending keeps "
        "the exporter from starting until then, and a rerun finishes an interrupted run. "
        "A file that cannot be opened for another reason (disk full, locked, permissions) "
        "is left in place. Intact files are left alone. "
        "Needs the data directory to itself. The summary goes to stdout as JSON; exit 1 "
        "when something could not be salvaged or rebuilt.",
    )
    recover.add_argument("--data-dir", help=DATA_DIR_HELP)
    recover.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=DRAIN_SECONDS,
        help="seconds to keep writing the rebuilt store after the last event "
        f"(default {DRAIN_SECONDS:g})",
    )
    recover.set_defaults(run=_recover)
