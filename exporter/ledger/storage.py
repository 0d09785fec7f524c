"""The ledger: a SQLite (WAL) file that makes every acknowledged event durable.

It deduplicates events, joins settled/verified/failed events to their
``payment:received`` (and ``batch:settled`` to ``batch:created``) in any arrival order,
keeps rejected and conflicting events as dead letters, and queues enriched store records
in an outbox that a forwarder drains into the time-series store.

Writes go through :class:`~exporter.ledger.committer.GroupCommitter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import orjson

from ..config import Durability
from ..errors import LedgerCorruptError, LedgerUnavailableError
from ..events import parse_event
from ..records import OutboxRow, StoreRecord, StoreRejection, decode_records, record_to_json
from .checkpointer import Checkpointer
from .files import (
    check_ledger_file,
    close_without_checkpoint,
    damaged_ledger_message,
    make_file_private,
    open_error,
)
from .joins import RowNumbers, TransactionWriter
from .model import (
    DeadLetterRow,
    Effect,
    GaugeSnapshot,
    LedgerStats,
    Submission,
    SubmissionResult,
)
from .schema import (
    DEAD_LETTER_COLUMNS,
    DELIVERED_UPTO,
    RECENT_KEYS_DDL,
    delivered_upto_key,
    prepare_schema,
)

log = logging.getLogger(__name__)


class _WriteLockBusy(Exception):
    """A write that must not wait found the ledger's write lock taken."""


_WRITE_CACHE_KIB = 8 * 1024

DEFAULT_SINK = "store"
"""The one sink of a ledger opened without naming its sinks (tools, tests)."""


@dataclass(slots=True)
class _Cursor:
    """One sink's position in the outbox: the last seq it has, and how many it lacks."""

    delivered_upto: int
    backlog: int


@dataclass(frozen=True, slots=True)
class LedgerTuning:
    """Sizes and intervals of the ledger's internal work; the defaults suit production.

    Tests make them small to reach the paths that only large ledgers take.
    """

    handoff_max_records: int = 20_000
    """The newest outbox records also kept in memory for the forwarders: four store batches
    (EXPORTER_STORE_BATCH_SIZE's default), about 10 MB (490 bytes a record). During a burst
    a store runs a few batches behind the ledger: with one batch here, the forwarder read
    206,000 of the 301,000 records of a bench/ingest.py run back from the table and
    decoded them, under the GIL that ingest needs; with four, none. A million events
    peaked at 216-222 MiB of RSS with either."""
    outbox_row_records: int = 1_000
    """Store records per ``outbox`` row (a commit writes at least one row)."""
    key_merge_events: int = 32_768
    """Events kept in recent_keys before they move to key_index. A merge writes at most
    about this many pages (each one for several events while key_index has fewer
    pages), spread over ``key_merge_parts`` commits so that none writes more than a few
    MiB."""
    key_merge_parts: int = 8
    """Commits a merge of recent_keys into key_index is spread over."""
    checkpoint_interval_seconds: float = 1.0
    """How often the checkpointer copies the WAL into the database file."""
    wal_restart_frames: int = 8192
    """WAL size (in frames, i.e. pages) past which a checkpoint also restarts the WAL."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class Ledger:
    """The SQLite ledger. Not thread-safe for writes: use it through :class:`GroupCommitter`.

    Reads (:meth:`read_outbox`, :meth:`stats`, ...) use a separate connection and may run
    in any thread.
    """

    def __init__(
        self,
        path: Path,
        durability: Durability = Durability.PROCESS,
        tuning: LedgerTuning | None = None,
        sinks: Sequence[str] = (DEFAULT_SINK,),
    ) -> None:
        """Open (creating if needed) the ledger at ``path``.

        ``sinks`` names every store the outbox feeds; each has its own cursor, and an
        outbox row goes only once all of them have its records.
        """
        if not sinks or len(set(sinks)) != len(sinks):
            raise ValueError(f"sinks must be distinct and at least one, got {list(sinks)}")
        self.path = path
        self.sinks: tuple[str, ...] = tuple(sinks)
        self.durability = durability
        self._tuning = tuning if tuning is not None else LedgerTuning()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_ledger_file(path)
        # Every connection opened so far, closed again if opening fails (``recover``
        # opens ledgers in its own process and goes on).
        self._opened: list[sqlite3.Connection] = []
        try:
            self._open(durability)
        except BaseException:
            close_without_checkpoint(path, self._opened)
            raise
        for suffix in ("", "-wal", "-shm"):  # later -wal/-shm files take the file's mode
            make_file_private(path.with_name(path.name + suffix))

    def _open(self, durability: Durability) -> None:
        self._write = self._connect(durability)
        self._read = self._connect(durability)
        self._read_lock = threading.Lock()
        # Held for every write transaction, so that a checkpoint can find no write
        # in progress (see Checkpointer).
        self._write_lock = threading.Lock()
        self._quick_check()
        self._init_schema()
        try:
            self._key_index_upto, self._recent_keys = self._load_recent_keys()
            # While recent_keys moves to key_index: the last seq moving and the next part.
            self._merging: tuple[int, int] | None = None
            # Kept up to date by commits and retention: with no narrow index on events
            # left, count(*) reads the whole table (a quarter second per million events),
            # too slow for every /readyz.
            self._event_count = self._scalar("SELECT count(*) FROM events")
            self._waiting_refs = self._load_waiting_refs()
            self._waiting_count = 0
            self._numbers = self._load_row_numbers()
            # The newest outbox records, kept in memory too (at most
            # LedgerTuning.handoff_max_records), so that the forwarders need not read back and
            # decode what was just written. The handoff holds every record from seq
            # ``_handoff_start`` on (the next seq to come while it is empty); a sink whose
            # cursor is behind that (after a restart, or while its store was behind and
            # records left memory) reads the table first.
            self._handoff_lock = threading.Lock()
            self._handoff: deque[tuple[int, StoreRecord]] = deque()
            self._handoff_start = self._numbers.outbox_seq
            self._cursors = {sink: self._load_cursor(sink) for sink in self.sinks}
            # Checkpoints copy the WAL back into the database file and sync it; done in
            # the committing thread they stall ingest, so a thread of their own does them.
            self._write.execute("PRAGMA wal_autocheckpoint=0")
            self._write.execute(f"PRAGMA cache_size=-{_WRITE_CACHE_KIB}")
        except sqlite3.DatabaseError as error:
            raise open_error(self.path, error) from error
        self._checkpointer = Checkpointer(
            self._connect(durability),
            self._write_lock,
            self._tuning.checkpoint_interval_seconds,
            self._tuning.wal_restart_frames,
        )

    def _load_cursor(self, sink: str) -> _Cursor:
        """``sink``'s cursor as stored, or the ledger's single cursor of old, or the start
        of what the outbox still holds (a sink new to this ledger)."""
        stored = self._scalar(
            "SELECT coalesce((SELECT value FROM meta WHERE key = ?),"
            " (SELECT value FROM meta WHERE key = ?))",
            (delivered_upto_key(sink), DELIVERED_UPTO),
        )
        # Records up to this seq are delivered to the sink: a row's first records may
        # be, while the row stays until its last one is. Each delivery stores it, and
        # records are never numbered at or below it, so a restart resumes mid-row.
        delivered = max(
            stored, (self._scalar("SELECT min(seq) FROM outbox") or self._numbers.outbox_seq) - 1
        )
        backlog = self._scalar(
            "SELECT coalesce(sum(last_seq - max(seq - 1, ?1)), 0) FROM outbox WHERE last_seq > ?1",
            (delivered,),
        )
        return _Cursor(delivered, backlog)

    def _cursor(self, sink: str | None) -> _Cursor:
        """The cursor of ``sink``; None names the only sink of a single-sink ledger."""
        if sink is None:
            if len(self.sinks) != 1:
                raise ValueError(f"name the sink: this ledger feeds {', '.join(self.sinks)}")
            sink = self.sinks[0]
        try:
            return self._cursors[sink]
        except KeyError:
            raise ValueError(f"{sink!r} is not a sink of this ledger") from None

    def _load_recent_keys(self) -> tuple[int, int]:
        """Fill recent_keys with the events key_index does not hold; returns the last
        seq key_index holds and how many were filled in."""
        self._write.execute("PRAGMA temp_store=MEMORY")
        self._write.executescript(RECENT_KEYS_DDL)
        (upto,) = self._write.execute(
            "SELECT value FROM meta WHERE key = 'key_index_upto'"
        ).fetchone()
        self._write.execute("DELETE FROM temp.recent_keys")
        filled = self._write.execute(
            "INSERT INTO temp.recent_keys (key_hash, seq) SELECT key_hash, seq FROM events "
            "WHERE seq > ?",
            (int(upto),),
        ).rowcount
        return int(upto), filled

    def _load_row_numbers(self) -> RowNumbers:
        row = self._write.execute(
            "SELECT (SELECT coalesce(max(seq), 0) + 1 FROM events),"
            " (SELECT max(coalesce(max(last_seq), 0), coalesce((SELECT max(CAST(value AS"
            " INTEGER)) FROM meta WHERE key = ?1 OR key GLOB ?1 || ':*'), 0)) + 1 FROM outbox),"
            " (SELECT coalesce(max(id), 0) + 1 FROM payments)",
            (DELIVERED_UPTO,),
        ).fetchone()
        return RowNumbers(*row)

    def _load_waiting_refs(self) -> set[str]:
        # Join partners that wait; a received event only looks for waiting rows when its
        # id is here, sparing the common in-order case a query.
        with self._read_lock:
            rows = self._read.execute("SELECT DISTINCT ref FROM events WHERE state = 0")
            return {str(ref) for (ref,) in rows if ref is not None}

    def _connect(self, durability: Durability) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except sqlite3.DatabaseError as error:
            raise open_error(self.path, error) from error
        self._opened.append(conn)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            sync = "FULL" if durability is Durability.POWER else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError as error:
            raise open_error(self.path, error) from error
        return conn

    def _quick_check(self) -> None:
        # SQLite reads a damaged page only when a query reaches it, which may be long
        # after startup; quick_check reads every page once (about 0.5 s per million
        # events from the page cache, 3.4 s from a cold disk).
        try:
            rows = self._write.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as error:
            raise open_error(self.path, error) from error
        if rows != [("ok",)]:
            found = " ".join("; ".join(str(row[0]) for row in rows).split())
            found = found if len(found) <= 200 else found[:197] + "..."
            raise LedgerCorruptError(
                damaged_ledger_message(self.path, f"integrity check failed: {found}")
            )

    def _init_schema(self) -> None:
        try:
            prepare_schema(self._write, self.path)
        except sqlite3.DatabaseError as error:
            raise open_error(self.path, error) from error

    def _scalar(self, sql: str, params: tuple[object, ...] = ()) -> int:
        with self._read_lock:
            row = self._read.execute(sql, params).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def close(self) -> None:
        """Close the connections, checkpointing the WAL into the database file."""
        self._checkpointer.stop()
        self._read.close()
        with contextlib.suppress(sqlite3.Error):
            self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._write.close()

    # ---------------------------------------------------------------- writes

    def commit(self, submissions: list[Submission]) -> list[SubmissionResult]:
        """Apply several submissions in one transaction; all of them are stored or none."""
        return self._commit(submissions, wait=True)

    def try_commit(self, submissions: list[Submission]) -> list[SubmissionResult] | None:
        """:meth:`commit` without waiting: None, with nothing done, while a checkpoint
        holds the write lock (a caller that must not block commits them later)."""
        try:
            return self._commit(submissions, wait=False)
        except _WriteLockBusy:
            return None

    def _commit(self, submissions: list[Submission], wait: bool) -> list[SubmissionResult]:
        now = _now_ms()
        results: list[SubmissionResult] = []
        with self._transaction(wait) as cur:
            # One writer for the whole group: its lookups and bulk writes are per
            # transaction, which single-event requests share.
            # Numbered above every seq key_index holds or is taking: a seq it may still
            # name (of an event retention deleted) is never given again.
            first_seq = (self._merging[0] if self._merging else self._key_index_upto) + 1
            numbers = dataclasses.replace(
                self._numbers, event_seq=max(self._numbers.event_seq, first_seq)
            )
            writer = TransactionWriter(
                cur, now, self._waiting_refs, numbers, self._tuning.outbox_row_records
            )
            writer.load([p for s in submissions for p in s.events])
            for submission in submissions:
                derived = submission.derived
                outcomes = [writer.add(prepared, derived) for prepared in submission.events]
                writer.mark_settlement_pending(submission.pending_settlements)
                for letter in submission.dead_letters:
                    writer.dead_letter(letter)
                results.append(SubmissionResult(outcomes, writer.take_effects()))
            writer.flush()
            recent, upto, merging = self._merge_keys(cur, self._recent_keys + writer.added)
        self._recent_keys, self._key_index_upto, self._merging = recent, upto, merging
        self._numbers = numbers
        self._event_count += writer.added
        self._emitted(writer.emitted)
        return results

    def _merge_keys(
        self, cur: sqlite3.Cursor, recent: int
    ) -> tuple[int, int, tuple[int, int] | None]:
        """Move one part of recent_keys into key_index when a merge is due or under way.

        Returns the new count of recent_keys, key_index_upto and merge state. Parts are
        ranges of the hash, so each is inserted in key_index order; the stored
        key_index_upto moves only with the last part (after a restart the merge starts
        over, and INSERT OR IGNORE skips what is already there).
        """
        upto, merging = self._key_index_upto, self._merging
        if merging is None:
            if recent < self._tuning.key_merge_events:
                return recent, upto, None
            (last,) = cur.execute(
                "SELECT max(?, coalesce(max(seq), 0)) FROM events", (upto,)
            ).fetchone()
            merging = (int(last), 0)
        last, part = merging
        parts = self._tuning.key_merge_parts
        width = 2**64 // parts
        low = -(2**63) + part * width
        # The last part ends at the top of the hash range: 2**64 // parts leaves the
        # top few hashes out of every part when parts is not a power of two.
        high = low + width - 1 if part + 1 < parts else 2**63 - 1
        bounds = (low, high, last)
        cur.execute(
            "INSERT OR IGNORE INTO key_index (key_hash, seq) SELECT key_hash, seq "
            "FROM temp.recent_keys WHERE key_hash BETWEEN ? AND ? AND seq <= ?",
            bounds,
        )
        recent -= cur.execute(
            "DELETE FROM temp.recent_keys WHERE key_hash BETWEEN ? AND ? AND seq <= ?", bounds
        ).rowcount
        if part + 1 < parts:
            return recent, upto, (last, part + 1)
        cur.execute("UPDATE meta SET value = ? WHERE key = 'key_index_upto'", (str(last),))
        return recent, last, None

    def _emitted(self, rows: list[tuple[int, StoreRecord]]) -> None:
        """Count committed outbox records and hand them to the forwarders in memory."""
        if not rows:
            return
        with self._handoff_lock:
            handoff = self._handoff
            if not handoff:
                self._handoff_start = rows[0][0]
            handoff.extend(rows)
            for cursor in self._cursors.values():
                cursor.backlog += len(rows)
            excess = len(handoff) - self._tuning.handoff_max_records
            if excess > 0:
                # A store is behind: the oldest records in memory go (they are in the
                # table, where a sink behind them reads them), the newest stay.
                for _ in range(excess):
                    handoff.popleft()
                self._handoff_start = handoff[0][0]

    @contextlib.contextmanager
    def _transaction(self, wait: bool = True) -> Iterator[sqlite3.Cursor]:
        """One write transaction: committed on success, rolled back on any failure.

        SQLite errors (disk full, I/O) become :class:`LedgerUnavailableError`. Without
        ``wait``, raises :class:`_WriteLockBusy` if a checkpoint holds the write lock.
        """
        if not self._write_lock.acquire(blocking=wait):
            raise _WriteLockBusy
        cur = self._write.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                self._rollback(cur)
                raise
        except sqlite3.Error as error:
            raise LedgerUnavailableError(f"ledger commit failed: {error}") from error
        finally:
            self._write_lock.release()
            cur.close()

    def release_unjoined(self, older_than_ms: int) -> list[Effect]:
        """Count the events still waiting for their join partner that arrived before
        ``older_than_ms``, with what they carry (docs/architecture.md section 2, "Join
        deadline"), in arrival order."""
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT seq, key, body FROM events WHERE state = 0 AND received_at < ? "
                "ORDER BY seq",
                (older_than_ms,),
            ).fetchall()
            numbers = dataclasses.replace(self._numbers)
            writer = TransactionWriter(
                cur, _now_ms(), self._waiting_refs, numbers, self._tuning.outbox_row_records
            )
            for seq, key, body in rows:
                writer.release_unjoined(seq, key, parse_event(orjson.loads(body)))
            writer.flush()
        self._numbers = numbers
        self._emitted(writer.emitted)
        return writer.effects

    def release_overdue_settlements(self, now_ms: int, timeout_ms: int) -> list[Effect]:
        """End as failed (``settlement_timeout``) each payment still pending settlement
        ``timeout_ms`` after its first non-final settle answer, at that deadline.

        The failure is an ordinary ``payment:failed`` event in the ledger (stored,
        counted, in the store): a later settle answer for the payment is then a
        conflict, since a payment ends once. Rows of payments that ended are dropped.
        """
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT payment_id, since FROM pending_settlements WHERE since <= ? "
                "ORDER BY since, payment_id",
                (now_ms - timeout_ms,),
            ).fetchall()
            if not rows:
                return []
            # Numbered as a commit numbers its events (see _commit).
            first_seq = (self._merging[0] if self._merging else self._key_index_upto) + 1
            numbers = dataclasses.replace(
                self._numbers, event_seq=max(self._numbers.event_seq, first_seq)
            )
            writer = TransactionWriter(
                cur, now_ms, self._waiting_refs, numbers, self._tuning.outbox_row_records
            )
            writer.load([])
            for payment_id, since in rows:
                writer.time_out_settlement(payment_id, since + timeout_ms)
            cur.execute(
                "DELETE FROM pending_settlements WHERE since <= ?", (now_ms - timeout_ms,)
            )
            writer.flush()
            recent, upto, merging = self._merge_keys(cur, self._recent_keys + writer.added)
        self._recent_keys, self._key_index_upto, self._merging = recent, upto, merging
        self._numbers = numbers
        self._event_count += writer.added
        self._emitted(writer.emitted)
        return writer.effects

    def waiting_events(self) -> int:
        """Events waiting for their join partner (``exporter_ledger_waiting_events``).

        Read at scrape time through the partial index of waiting rows; the last count
        when the ledger cannot be read (closed, or the disk failing).
        """
        with contextlib.suppress(sqlite3.Error):
            self._waiting_count = self._scalar("SELECT count(*) FROM events WHERE state = 0")
        return self._waiting_count

    def _rollback(self, cur: sqlite3.Cursor) -> None:
        with contextlib.suppress(sqlite3.Error):
            cur.execute("ROLLBACK")
        self._waiting_refs = self._load_waiting_refs()

    def mark_delivered(
        self,
        up_to_seq: int,
        refused: Sequence[StoreRejection] = (),
        sink: str | None = None,
    ) -> int:
        """Move ``sink``'s cursor to ``up_to_seq`` once it has the records; returns how many.

        Outbox rows go once every sink has their records. Records the sink refused for
        good are kept as dead letters (reason ``store``, the error naming the sink) in
        the same transaction, so a poison record is never retried and never lost.
        """
        cursor = self._cursor(sink)
        name = sink if sink is not None else self.sinks[0]
        now = _now_ms()
        delivered = max(cursor.delivered_upto, up_to_seq)
        everywhere = min(
            delivered if other is cursor else other.delivered_upto
            for other in self._cursors.values()
        )
        with self._transaction() as cur:
            cur.executemany(
                "INSERT INTO dead_letters (received_at, reason, error, key, raw) "
                "VALUES (?, 'store', ?, ?, ?)",
                [
                    (now, f"{name}: {r.reason}", r.record.key, record_to_json(r.record).encode())
                    for r in refused
                ],
            )
            cur.execute("DELETE FROM outbox WHERE last_seq <= ?", (everywhere,))
            # Every sink's cursor, so that one taken over from the single cursor of old
            # is kept exactly once that goes.
            cur.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [
                    (
                        delivered_upto_key(sink),
                        str(delivered if other is cursor else other.delivered_upto),
                    )
                    for sink, other in self._cursors.items()
                ],
            )
            cur.execute("DELETE FROM meta WHERE key = ?", (DELIVERED_UPTO,))
        with self._handoff_lock:
            # Records are numbered without gaps: those newly delivered are the seqs
            # after the last delivered one.
            removed = delivered - cursor.delivered_upto
            cursor.delivered_upto = delivered
            cursor.backlog -= removed
            handoff = self._handoff
            while handoff and handoff[0][0] <= everywhere:
                handoff.popleft()
                self._handoff_start += 1
        return removed

    def _first_seq_received_at_or_after(self, at_ms: int) -> int:
        # Events are numbered in commit order, so received_at grows with seq: a binary
        # search over seq finds the cut-off without an index on received_at.
        def received_at(seq: int) -> tuple[int, int] | None:
            row = self._write.execute(
                "SELECT seq, received_at FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (seq,)
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else None

        bounds = self._write.execute("SELECT min(seq), max(seq) FROM events").fetchone()
        if bounds[0] is None:
            return 0
        low, high = int(bounds[0]), int(bounds[1]) + 1
        while low < high:
            middle = (low + high) // 2
            found = received_at(middle)
            if found is None or found[1] >= at_ms:
                high = middle
            else:
                low = found[0] + 1
        return low

    def apply_retention(self, older_than_ms: int, limit: int = 10_000) -> int:
        """Delete delivered events received before ``older_than_ms``; returns how many.

        Events still waiting for a join or with undelivered outbox rows are kept.
        """
        cutoff_seq = self._first_seq_received_at_or_after(older_than_ms)
        # One transaction, so that a full disk fails it as a whole (LedgerUnavailableError).
        with self._transaction() as cur:
            removed = cur.execute(
                "DELETE FROM events WHERE seq IN ("
                " SELECT seq FROM events WHERE seq < ? AND state = 1"
                " AND seq < (SELECT coalesce(min(event_seq), 9223372036854775807) FROM outbox)"
                " LIMIT ?) RETURNING key_hash, seq",
                (cutoff_seq, limit),
            ).fetchall()
            # A key may be in either tier (or, mid-merge, both).
            cur.executemany("DELETE FROM key_index WHERE key_hash = ? AND seq = ?", removed)
            recent_removed = cur.executemany(
                "DELETE FROM temp.recent_keys WHERE key_hash = ? AND seq = ?", removed
            ).rowcount
            cur.execute(
                "DELETE FROM payments WHERE terminal = 1 AND updated_at < ?", (older_than_ms,)
            )
            cur.execute("DELETE FROM batches WHERE updated_at < ?", (older_than_ms,))
            # Offsets of points older than the cut-off, oldest first and about ``limit``
            # at a time. An event that old arriving later is then checked only against
            # the offsets kept (docs/architecture.md section 6).
            cur.execute(
                "DELETE FROM point_times WHERE time_ms < ?1 AND time_ms <= coalesce("
                " (SELECT time_ms FROM point_times ORDER BY time_ms LIMIT 1 OFFSET ?2), ?1)",
                (older_than_ms, limit),
            )
        self._recent_keys -= recent_removed
        deleted = len(removed)
        self._event_count -= deleted
        return deleted

    def expire_dead_letters(self, older_than_ms: int, limit: int = 10_000) -> int:
        """Delete dead letters received before ``older_than_ms``, at most ``limit``; returns
        how many (the retention of refused input, independent of the events')."""
        with self._transaction() as cur:
            return cur.execute(
                "DELETE FROM dead_letters WHERE id IN ("
                " SELECT id FROM dead_letters WHERE received_at < ? LIMIT ?)",
                (older_than_ms, limit),
            ).rowcount

    def check_writable(self) -> None:
        """Commit a one-row write; raises :class:`LedgerUnavailableError` when it fails.

        Taking the write lock alone succeeds on a full disk: only writing a page to the
        WAL finds out, as the next commit would (a WAL being rewound from its start
        reuses its own space, so then the ledger is indeed still writable).
        """
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('write_probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(_now_ms()),),
            )

    # ---------------------------------------------------------------- reads

    @property
    def backlog(self) -> int:
        """Store records committed but not yet delivered to every sink."""
        return max(cursor.backlog for cursor in self._cursors.values())

    def backlog_of(self, sink: str | None = None) -> int:
        """Store records committed but not yet delivered to ``sink``."""
        return self._cursor(sink).backlog

    def read_outbox(
        self, limit: int, sink: str | None = None, after: int | None = None
    ) -> list[OutboxRow]:
        """The oldest store records not yet delivered to ``sink``, at most ``limit``.

        ``after`` (a seq at or past the sink's cursor) reads from there instead: a
        forwarder reads its next batch while the store still writes the current one.
        """
        cursor = self._cursor(sink)
        with self._handoff_lock:
            start = self._handoff_start
            after = cursor.delivered_upto if after is None else max(after, cursor.delivered_upto)
            if after >= start - 1:
                # The handoff holds every record from ``start`` on, without gaps.
                held = islice(self._handoff, after + 1 - start, after + 1 - start + limit)
                return [OutboxRow(seq, record) for seq, record in held]
        read: list[OutboxRow] = []
        with self._read_lock:
            rows = self._read.execute(
                "SELECT seq, records FROM outbox WHERE last_seq > ? AND seq < ? ORDER BY seq",
                (after, start),
            )
            try:
                for first, blob in rows:
                    for seq, record in enumerate(decode_records(blob), start=first):
                        if after < seq < start:
                            read.append(OutboxRow(seq, record))
                    if len(read) >= limit:
                        del read[limit:]
                        break
            finally:
                rows.close()
        if len(read) < limit:
            # Every record behind the handoff is read: the rest comes from memory, unless
            # more records left the handoff meanwhile (the next read finds those).
            with self._handoff_lock:
                if self._handoff_start == start:
                    more = islice(self._handoff, limit - len(read))
                    read.extend(OutboxRow(seq, record) for seq, record in more)
        return read

    def stats(self) -> LedgerStats:
        """Row counts for readiness and debugging."""
        return LedgerStats(
            events=self._event_count,
            backlog=self.backlog,
            waiting_for_join=self._scalar("SELECT count(*) FROM events WHERE state = 0"),
            dead_letters=self._scalar("SELECT count(*) FROM dead_letters"),
        )

    def gauges(self) -> GaugeSnapshot:
        """Pending payments per network and the latest websocket count, for restart."""
        with self._read_lock:
            pending = self._read.execute(
                "SELECT network, count(*) FROM payments WHERE received = 1 AND terminal = 0 "
                "GROUP BY network"
            ).fetchall()
            ws = self._read.execute("SELECT count FROM websocket_latest").fetchone()
        return GaugeSnapshot({str(n): int(c) for n, c in pending}, int(ws[0]) if ws else None)

    def dead_letters(self, reason: str | None = None, limit: int = 1000) -> list[DeadLetterRow]:
        """Stored dead letters, newest first, optionally of one reason."""
        sql = f"SELECT {', '.join(DEAD_LETTER_COLUMNS)} FROM dead_letters"
        params: tuple[object, ...] = ()
        if reason is not None:
            sql += " WHERE reason = ?"
            params = (reason,)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._read_lock:
            rows = self._read.execute(sql, (*params, limit)).fetchall()
        return [DeadLetterRow(*row) for row in rows]

    def iter_point_times(self, batch: int = 10_000) -> Iterator[list[tuple[int, int, int, int]]]:
        """The point offsets taken, in batches of (time_ms, series, offset_ns, key_hash)."""
        after: tuple[int, int, int] = (-(2**63), -(2**63), -1)
        while True:
            with self._read_lock:
                rows = self._read.execute(
                    "SELECT time_ms, series, offset_ns, key_hash FROM point_times"
                    " WHERE (time_ms, series, offset_ns) > (?, ?, ?)"
                    " ORDER BY time_ms, series, offset_ns LIMIT ?",
                    (*after, batch),
                ).fetchall()
            if not rows:
                return
            yield rows
            after = rows[-1][:3]

    def adopt_point_times(self, rows: Sequence[tuple[int, int, int, int]]) -> None:
        """Take another ledger's point offsets as taken here (``backfill``'s scratch ledger
        derives the same records again and must give each the offset it had)."""
        with self._transaction() as cur:
            cur.executemany(
                "INSERT OR IGNORE INTO point_times (time_ms, series, offset_ns, key_hash) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )

    def iter_events(self, batch: int = 10_000) -> Iterator[tuple[int, str, bytes]]:
        """Every stored event as (seq, key, canonical body), in commit order."""
        after = 0
        while True:
            with self._read_lock:
                rows = self._read.execute(
                    "SELECT seq, key, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, batch),
                ).fetchall()
            if not rows:
                return
            yield from rows
            after = rows[-1][0]
