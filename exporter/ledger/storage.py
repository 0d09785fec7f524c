"""The ledger: a SQLite (WAL) file that makes every acknowledged event durable.

It deduplicates events, joins settled/verified/failed events to their
``payment:received`` (and ``batch:settled`` to ``batch:created``) in any arrival order,
keeps rejected and conflicting events as dead letters, and queues enriched store records
in an outbox that a forwarder drains into the time-series store.

All writes go through :class:`GroupCommitter`, one at a time, which commits whatever
requests are waiting in a single transaction: concurrent single-event POSTs share one
commit (and, with ``durability=power``, one fsync) instead of paying one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from hashlib import blake2b
from itertools import chain, islice
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from ..config import Durability
from ..errors import (
    DataDirLockedError,
    LedgerCorruptError,
    LedgerError,
    LedgerUnavailableError,
    RecoveryPendingError,
)
from ..events import (
    UNKNOWN_PAYMENT_ID,
    BatchCreated,
    BatchSettled,
    Event,
    PaymentFailed,
    PaymentReceived,
    PaymentSettled,
    PaymentVerified,
    WebsocketClients,
    join_ref,
    parse_event,
    to_micro,
)
from ..records import (
    BatchRecord,
    OutboxRow,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    StoreRejection,
    WebsocketRecord,
    decode_records,
    encode_records,
    record_to_json,
    upgrade_schema_2_record,
)

log = logging.getLogger(__name__)

UNKNOWN_NETWORK = "unknown"

_SCHEMA_VERSION = 3
# Join state per payment: what payment:received said, and whether it has ended.
# Rows are appended in arrival order (the update of a payment that ends soon after its
# receipt then finds its row on a recent page, already written in the same or a close
# transaction) and found through an index of a 32-bit hash of the id: a table keyed by
# the random ids writes a page of wide rows per new payment, the index a page of small
# integers that holds many more of them.
_PAYMENTS_DDL = """
CREATE TABLE IF NOT EXISTS payments (
    id INTEGER PRIMARY KEY,
    id_hash INTEGER NOT NULL,
    payment_id TEXT NOT NULL,
    network TEXT NOT NULL,
    payer TEXT,
    payee TEXT,
    amount_micro INTEGER,
    received INTEGER NOT NULL,
    terminal INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_id_hash ON payments (id_hash);
"""
# Dedup finds stored keys by a 64-bit hash of the key, in two tiers. This table holds
# the events up to meta 'key_index_upto' (and maybe some later ones); newer ones are in
# the write connection's in-memory temp table recent_keys (rebuilt from events at
# startup). Every _KEY_MERGE_EVENTS events they move here, in hash order, one
# _KEY_MERGE_PARTS-th of the hash range per commit. A random hash inserted per event
# into an index of the whole ledger writes (and later checkpoints) about one 4 KiB page
# per event; a merge writes each page of this table once for many events.
_KEY_INDEX_DDL = """
CREATE TABLE IF NOT EXISTS key_index (
    key_hash INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (key_hash, seq)
) WITHOUT ROWID;
"""
# Store records not yet delivered, in commit order: one row per commit (of at most
# _OUTBOX_ROW_RECORDS records) holds the records numbered seq to last_seq and the lowest
# events.seq they came from. A row is deleted once all of its records are delivered.
# A row per record (schema 2) took 1.3 us more per record to pickle and insert, and as
# much again to read back: 4-9 % of the exporter's CPU per event.
_OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    event_seq INTEGER NOT NULL,
    records BLOB NOT NULL
);
"""
_OUTBOX_ROW_RECORDS = 1_000
# The meta key of the last outbox seq delivered.
_DELIVERED_UPTO = "outbox_delivered_upto"
_RECENT_KEYS_DDL = """
CREATE TEMP TABLE IF NOT EXISTS recent_keys (
    key_hash INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (key_hash, seq)
) WITHOUT ROWID;
"""
# Events kept in recent_keys before they move to key_index. A merge writes at most
# about this many pages (each one for several events while key_index has fewer pages),
# spread over _KEY_MERGE_PARTS commits so that none writes more than a few MiB.
_KEY_MERGE_EVENTS = 32_768
_KEY_MERGE_PARTS = 8
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Every accepted event, once, in commit order. state 0: waiting for its join partner.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    key_hash INTEGER NOT NULL,
    type TEXT NOT NULL,
    ref TEXT,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    state INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_waiting ON events (ref, seq) WHERE state = 0;
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    payment_count INTEGER NOT NULL,
    total_amount_micro INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    key TEXT,
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason, id);
CREATE TABLE IF NOT EXISTS websocket_latest (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    ts INTEGER NOT NULL,
    count INTEGER NOT NULL
);
"""
    + _PAYMENTS_DDL
    + _KEY_INDEX_DDL
    + _OUTBOX_DDL
)
# Schema 1 kept payments in a table keyed by payment_id (WITHOUT ROWID) and the dedup
# key hashes in an index on events; both move to their schema 2 tables in one
# transaction.
_MIGRATE_1_TO_2 = (
    "BEGIN IMMEDIATE;\n"
    "ALTER TABLE payments RENAME TO payments_schema1;\n"
    + _PAYMENTS_DDL
    + _KEY_INDEX_DDL
    + """
INSERT INTO key_index (key_hash, seq) SELECT key_hash, seq FROM events ORDER BY key_hash, seq;
DROP INDEX events_key_hash;
INSERT INTO meta (key, value) SELECT 'key_index_upto', coalesce(max(seq), 0) FROM events;
INSERT INTO payments (id_hash, payment_id, network, payer, payee, amount_micro, received,
    terminal, updated_at)
SELECT payment_id_hash(payment_id), payment_id, network, payer, payee, amount_micro,
    received, terminal, updated_at
FROM payments_schema1 ORDER BY updated_at;
DROP TABLE payments_schema1;
UPDATE meta SET value = '2' WHERE key = 'schema';
COMMIT;
"""
)
# Schema 2 kept one outbox row per record.
_MIGRATE_2_TO_3 = (
    "BEGIN IMMEDIATE;\n"
    "ALTER TABLE outbox RENAME TO outbox_schema2;\n"
    + _OUTBOX_DDL
    + """
INSERT INTO outbox (seq, last_seq, event_seq, records)
SELECT seq, seq, event_seq, upgrade_schema_2_record(record) FROM outbox_schema2 ORDER BY seq;
DROP TABLE outbox_schema2;
UPDATE meta SET value = '3' WHERE key = 'schema';
COMMIT;
"""
)
# Each upgrade, by the schema it starts from: its script (one transaction) and what it
# copies, for the message when it fails.
_UPGRADES: dict[int, tuple[str, str]] = {
    1: (_MIGRATE_1_TO_2, "the payments table and the dedup key index"),
    2: (_MIGRATE_2_TO_3, "the outbox"),
}

_WAITING, _EMITTED = 0, 1
_T = TypeVar("_T")


class _WriteLockBusy(Exception):
    """A write that must not wait found the ledger's write lock taken."""


def recovery_command(data_dir: Path) -> str:
    """The command that moves a damaged ledger or store aside and rebuilds it."""
    return f"facilitator-exporter recover --data-dir {data_dir}"


def recovery_marker(path: Path) -> Path:
    """The file ``recover`` keeps beside ``path`` while it rebuilds it.

    It exists from before the damaged file is moved aside until the rebuilt file is in
    place; while it does, the exporter and the other commands refuse to open ``path``.
    """
    return path.with_name(path.name + ".recover-pending")


def check_no_pending_recovery(path: Path) -> None:
    """Raise :class:`RecoveryPendingError` while a recovery of ``path`` is unfinished."""
    marker = recovery_marker(path)
    if marker.exists():
        raise RecoveryPendingError(
            f"a recovery of {path} was interrupted before it finished ({marker} exists): "
            "what is there may be only part of what the damaged file held. Run "
            f"`{recovery_command(path.parent)}` again to finish it"
        )


# SQLite's primary result codes that mean the file's bytes are not a sound database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_OPEN_ERROR_HINTS = {
    3: "permission denied: the exporter's user must be able to read and write the file",
    5: "another process holds the file's lock: stop it and start again",
    6: "another connection holds the file's lock: stop it and start again",
    8: "the file or its directory is read-only: the exporter must be able to write both",
    10: "an I/O error: check the disk and the kernel log",
    13: "the disk is full: free space and start again",
    14: "the file, its -wal/-shm or its directory cannot be opened: check that they exist "
    "and that the exporter's user may read and write them",
    23: "access denied: check the file's permissions",
}


def is_damage(error: sqlite3.Error) -> bool:
    """Whether an SQLite error says the file is damaged (not full, locked or unreadable)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _open_error(path: Path, error: sqlite3.Error) -> LedgerError:
    """The ledger error for an SQLite error met while opening ``path``."""
    if is_damage(error):
        return LedgerCorruptError(damaged_ledger_message(path, str(error)))
    code = getattr(error, "sqlite_errorcode", None)
    hint = _OPEN_ERROR_HINTS.get(code & 0xFF) if code is not None else None
    return LedgerUnavailableError(
        f"cannot open ledger file {path}: {error}"
        + (f" ({hint})" if hint else "")
        + ". The file is not damaged: `recover` does not apply"
    )


def damaged_ledger_message(path: Path, problem: str) -> str:
    """One paragraph for the operator: which file, what is wrong, what to run."""
    return (
        f"ledger file {path} is damaged: {problem}. The exporter does not start on a "
        "damaged ledger (it would lose acknowledged events). Stop every process using "
        f"{path.parent}, then run `{recovery_command(path.parent)}` to move it aside (it "
        f"is kept as {path.name}.damaged-<UTC time>) and commit every event that can "
        "still be read from it to a new ledger"
    )


_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_HEADER_BYTES = 100
_WAL_HEADER_BYTES = 32


def _ledger_file_problem(path: Path) -> str | None:
    """What is wrong with the ledger file's size and header, or None when it looks whole.

    SQLite trusts the page count in the header (offset 28) and never reads the bytes
    after it, nor notices that pages before it are missing until a query reaches them,
    so truncation and appended bytes are only visible by comparing that count with the
    file's size. A checkpoint cut short by a crash may leave the file shorter than the
    header says while the WAL still holds the missing pages: that is normal, and SQLite
    completes it from the WAL. It never leaves the file longer, nor a partial page.
    """
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as handle:
        header = handle.read(_SQLITE_HEADER_BYTES)
    if len(header) < _SQLITE_HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        return f"the file ({size} bytes) does not start with an SQLite header"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"the header names an invalid page size ({page_size})"
    if size % page_size:
        return f"its size ({size} bytes) is not a whole number of {page_size}-byte pages"
    # The page count is valid only when "version-valid-for" equals the change counter.
    if header[92:96] != header[24:28]:
        return None
    expected = int.from_bytes(header[28:32], "big") * page_size
    if size > expected:
        return (
            f"it is {size - expected} bytes longer than the {expected} bytes its header "
            "describes (bytes were appended)"
        )
    wal = path.with_name(path.name + "-wal")
    hot_wal = wal.exists() and wal.stat().st_size > _WAL_HEADER_BYTES
    if size < expected and not hot_wal:
        return (
            f"it is {size} bytes long but its header describes {expected} bytes "
            "(the file was truncated)"
        )
    return None


def check_ledger_file(path: Path) -> None:
    """Raise :class:`LedgerCorruptError` when an existing ledger file is cut or extended.

    Also raises :class:`RecoveryPendingError` while an interrupted ``recover`` of it is
    unfinished, and :class:`LedgerUnavailableError` when the file cannot be read.
    """
    check_no_pending_recovery(path)
    if not path.exists():
        return
    try:
        problem = _ledger_file_problem(path)
    except OSError as error:
        raise LedgerUnavailableError(
            f"cannot read ledger file {path}: {error}. The file is not damaged: "
            "`recover` does not apply"
        ) from error
    if problem is not None:
        raise LedgerCorruptError(damaged_ledger_message(path, problem))


class Outcome(Enum):
    """What the ledger did with one valid event."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3x more to build
class PreparedEvent:
    """A validated event with its dedup key, canonical body and the bytes it arrived as.

    The key's hash and the join reference are worked out where the event is prepared
    (the receiver's event loop), not in the commit: the one ledger writer is what every
    acknowledgement waits for.
    """

    event: Event
    key: str
    body: bytes
    raw: bytes
    key_hash: int = field(init=False)
    ref: str | None = field(init=False)
    """The payment or batch id the event joins on (:func:`join_ref`)."""

    def __post_init__(self) -> None:
        self.key_hash = _key_hash(self.key)
        self.ref = join_ref(self.event)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input that was refused, kept with its raw bytes for inspection."""

    reason: str
    error: str
    raw: bytes
    key: str | None = None
    received_at: int | None = None
    """Epoch ms it was first received (None: now); ``recover`` keeps the original."""


@dataclass(slots=True)
class PendingChange:
    """``facilitator_pending_payments{network}`` moves by ``delta``."""

    network: str
    delta: int


@dataclass(slots=True)
class TerminalPayment:
    """A settled or failed payment event whose join is complete."""

    network: str
    status: str  # success | failed
    amount_micro: int = 0
    fee_micro: int = 0
    settlement_ms: float | None = None


@dataclass(slots=True)
class BatchGas:
    """A settled batch's gas, on the network its ``batch:created`` named."""

    network: str
    gas_used: int


@dataclass(slots=True)
class WebsocketCount:
    """The newest ``websocket:clients`` count so far."""

    count: int


@dataclass(slots=True)
class NewEvent:
    """A deduplicated event was committed."""

    type: str


Effect = PendingChange | TerminalPayment | BatchGas | WebsocketCount | NewEvent
"""A change to the exported metrics caused by a commit.

Effects are built per event on the ledger writer, so they are plain (not frozen)
dataclasses: a frozen one costs several times as much to build.
"""


@dataclass(slots=True)
class Submission:
    """One request's worth of work for a commit."""

    events: list[PreparedEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


@dataclass(slots=True)
class SubmissionResult:
    """Per-event outcomes of a committed submission, and its metric effects."""

    outcomes: list[Outcome]
    effects: list[Effect]


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """Counts for ``/readyz`` and gauges."""

    events: int
    backlog: int
    waiting_for_join: int
    dead_letters: int


@dataclass(frozen=True, slots=True)
class GaugeSnapshot:
    """Gauge values restored from the ledger at startup."""

    pending_by_network: dict[str, int]
    websocket_clients: int | None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A stored dead letter."""

    id: int
    received_at: int
    reason: str
    error: str
    key: str | None
    raw: bytes


class DataDirLock:
    """An exclusive advisory lock on the data directory, held while the exporter runs.

    Two exporters on one data directory would share a ledger but not their metrics or
    store; the second one is refused before it touches anything.
    """

    def __init__(self, data_dir: Path) -> None:
        # The data holds payer addresses and the raw bytes of refused bodies: a directory
        # the exporter creates is its user's alone. An existing one keeps its mode.
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = data_dir / ".lock"
        self._file = open(self.path, "a+")  # held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise DataDirLockedError(
                f"data directory {data_dir} is in use by another exporter process "
                f"(pid {holder}, lock file {self.path}); stop it or use another "
                "EXPORTER_DATA_DIR"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        """Release the lock."""
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


_WRITE_CACHE_KIB = 8 * 1024
# The newest outbox records also kept in memory for the forwarder: one store batch
# (EXPORTER_STORE_BATCH_SIZE's default), about 3 MB. They stay there while the store is
# behind, beside the batch the forwarder holds: 10,000 took the peak RSS of a million
# events past 250 MiB.
_HANDOFF_MAX_RECORDS = 5_000
_CHECKPOINT_INTERVAL_SECONDS = 1.0
# WAL size (in frames, i.e. pages) past which a checkpoint also restarts the WAL.
_WAL_RESTART_FRAMES = 8192


class _Checkpointer:
    """Checkpoints the WAL every second from its own connection.

    A PASSIVE checkpoint never blocks the writer, but under continuous writes it never
    finds every frame copied, and SQLite only rewinds a WAL whose every frame was
    checkpointed: the file would grow without bound (about 4 KiB per event). So once
    the WAL holds ``_WAL_RESTART_FRAMES`` frames, a second PASSIVE checkpoint runs
    while holding the ledger's write lock: it copies only the frames written since the
    first, and the next transaction then writes from the start of the file.
    """

    def __init__(self, conn: sqlite3.Connection, write_lock: threading.Lock) -> None:
        self._conn = conn
        self._write_lock = write_lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_CHECKPOINT_INTERVAL_SECONDS):
            try:
                self.checkpoint()
            except sqlite3.Error as error:
                log.warning("ledger checkpoint failed", extra={"error": str(error)})

    def checkpoint(self) -> None:
        """Copy the WAL into the database file; let the WAL rewind once it is large."""
        _, frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= _WAL_RESTART_FRAMES:
            with self._write_lock:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def _close_without_checkpoint(path: Path, conns: list[sqlite3.Connection]) -> None:
    """Close ``conns`` without letting the last close checkpoint the WAL into ``path``.

    Closing the last connection to a WAL database copies the WAL into the file and
    deletes it; a ledger that failed to open may be damaged, and is never written in
    place. A read-only connection that stays open across the closes keeps its shared
    lock, so no close is the last one, and a read-only connection never checkpoints.
    """
    if not conns:
        return
    guard: sqlite3.Connection | None = None
    with contextlib.suppress(sqlite3.Error):
        guard = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
        guard.execute("PRAGMA schema_version").fetchone()
    try:
        for conn in reversed(conns):
            conn.close()
    finally:
        if guard is not None:
            guard.close()


def read_only_uri(path: Path) -> str:
    """An SQLite URI that opens ``path`` read-only (it still reads the file's WAL)."""
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"


def _now_ms() -> int:
    return int(time.time() * 1000)


_EventRow = tuple[int, str, int, str, str | None, int, int, bytes, int]
"""A row of ``events``: seq, key, key_hash, type, ref, ts, received_at, body, state."""


@dataclass(slots=True)
class _RowNumbers:
    """The next seq of ``events`` and ``outbox`` and the next ``payments`` id.

    The one writer numbers the rows it appends itself, so that a commit needs no query
    to learn them (each SQLite call hands the GIL away and must wait to get it back).
    A rolled-back transaction leaves them as they were: numbers are taken for good
    only when a commit succeeds.
    """

    event_seq: int
    outbox_seq: int
    payment_id: int


# Rows per multi-row INSERT, largest first; a fixed ladder keeps the statements few
# enough for the connection's statement cache. Each cached statement holds memory in
# proportion to its parameters: a ladder from 512 rows held about 2.5 MB. The last
# fewer than _INSERT_EXACT_BELOW rows go in one statement of their exact size, so that
# a small commit (single-event requests) writes each table in one statement.
_INSERT_CHUNKS = (256, 64, 16)
_INSERT_EXACT_BELOW = 16


@lru_cache(maxsize=128)
def _multi_row_sql(head: str, width: int, rows: int, tail: str) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([row] * rows)}{tail}"


def _insert_rows(
    cur: sqlite3.Cursor, head: str, rows: Sequence[Sequence[object]], tail: str = ""
) -> None:
    """``head VALUES (...), (...) tail`` for ``rows``, up to 256 rows per statement.

    ``executemany`` steps SQLite once per row, and every step releases the GIL: while
    the event loop parses the next request, each release can keep this thread waiting
    for a whole switch interval (5 ms). One statement per chunk keeps the inserts a
    handful of steps that run without the GIL, beside the event loop. Chunks stay
    within the connection's limit on bound parameters (999 in SQLite before 3.32).
    """
    if not rows:
        return
    width, done = len(rows[0]), 0
    most = cur.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
    for size in _INSERT_CHUNKS:
        if size > most:
            continue
        while len(rows) - done >= size:
            _insert_chunk(cur, head, rows[done : done + size], tail)
            done += size
    while done < len(rows):  # fewer than _INSERT_EXACT_BELOW rows left (or than ``most``)
        chunk = rows[done : done + min(_INSERT_EXACT_BELOW - 1, most)]
        _insert_chunk(cur, head, chunk, tail)
        done += len(chunk)


def _insert_chunk(
    cur: sqlite3.Cursor, head: str, rows: Sequence[Sequence[object]], tail: str
) -> None:
    sql = _multi_row_sql(head, len(rows[0]), len(rows), tail)
    cur.execute(sql, list(chain.from_iterable(rows)))


class Ledger:
    """The SQLite ledger. Not thread-safe for writes: use it through :class:`GroupCommitter`.

    Reads (:meth:`read_outbox`, :meth:`stats`, ...) use a separate connection and may run
    in any thread.
    """

    def __init__(self, path: Path, durability: Durability = Durability.PROCESS) -> None:
        self.path = path
        self.durability = durability
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_ledger_file(path)
        # Every connection opened so far, closed again if opening fails (``recover``
        # opens ledgers in its own process and goes on).
        self._opened: list[sqlite3.Connection] = []
        try:
            self._open(durability)
        except BaseException:
            _close_without_checkpoint(path, self._opened)
            raise

    def _open(self, durability: Durability) -> None:
        self._write = self._connect(durability)
        self._read = self._connect(durability)
        self._read_lock = threading.Lock()
        # Held for every write transaction, so that a checkpoint can find no write
        # in progress (see _Checkpointer).
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
            self._numbers = self._load_row_numbers()
            # The newest outbox records, kept in memory too (at most
            # _HANDOFF_MAX_RECORDS), so that the forwarder need not read back and decode
            # what was just written. The handoff holds every row from seq
            # ``_handoff_start`` on; older undelivered rows (after a restart, or dropped
            # from memory while the store was behind) are read from the table first,
            # while ``_table_first`` is set.
            self._handoff_lock = threading.Lock()
            self._handoff: deque[tuple[int, StoreRecord]] = deque()
            self._handoff_start = self._numbers.outbox_seq
            # Records up to this seq are delivered: a row's first records may be, while
            # the row stays until its last one is. Each delivery stores it, and records
            # are never numbered at or below it, so a restart resumes mid-row.
            self._delivered_upto = max(
                self._scalar("SELECT value FROM meta WHERE key = ?", (_DELIVERED_UPTO,)),
                (self._scalar("SELECT min(seq) FROM outbox") or self._numbers.outbox_seq) - 1,
            )
            self._backlog = self._scalar(
                "SELECT coalesce(sum(last_seq - max(seq - 1, ?1)), 0) FROM outbox"
                " WHERE last_seq > ?1",
                (self._delivered_upto,),
            )
            self._table_first = self._backlog > 0
            # Checkpoints copy the WAL back into the database file and sync it; done in
            # the committing thread they stall ingest, so a thread of their own does them.
            self._write.execute("PRAGMA wal_autocheckpoint=0")
            self._write.execute(f"PRAGMA cache_size=-{_WRITE_CACHE_KIB}")
        except sqlite3.DatabaseError as error:
            raise _open_error(self.path, error) from error
        self._checkpointer = _Checkpointer(self._connect(durability), self._write_lock)

    def _load_recent_keys(self) -> tuple[int, int]:
        """Fill recent_keys with the events key_index does not hold; returns the last
        seq key_index holds and how many were filled in."""
        self._write.execute("PRAGMA temp_store=MEMORY")
        self._write.executescript(_RECENT_KEYS_DDL)
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

    def _load_row_numbers(self) -> _RowNumbers:
        row = self._write.execute(
            "SELECT (SELECT coalesce(max(seq), 0) + 1 FROM events),"
            " (SELECT max(coalesce(max(last_seq), 0), coalesce((SELECT CAST(value AS INTEGER)"
            " FROM meta WHERE key = ?), 0)) + 1 FROM outbox),"
            " (SELECT coalesce(max(id), 0) + 1 FROM payments)",
            (_DELIVERED_UPTO,),
        ).fetchone()
        return _RowNumbers(*row)

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
            raise _open_error(self.path, error) from error
        self._opened.append(conn)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            sync = "FULL" if durability is Durability.POWER else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError as error:
            raise _open_error(self.path, error) from error
        return conn

    def _quick_check(self) -> None:
        # SQLite reads a damaged page only when a query reaches it, which may be long
        # after startup; quick_check reads every page once (about 0.5 s per million
        # events from the page cache, 3.4 s from a cold disk).
        try:
            rows = self._write.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as error:
            raise _open_error(self.path, error) from error
        if rows != [("ok",)]:
            found = " ".join("; ".join(str(row[0]) for row in rows).split())
            found = found if len(found) <= 200 else found[:197] + "..."
            raise LedgerCorruptError(
                damaged_ledger_message(self.path, f"integrity check failed: {found}")
            )

    def _init_schema(self) -> None:
        try:
            version = self._stored_schema_version()
            if version is not None and version != _SCHEMA_VERSION:
                if version not in _UPGRADES:
                    raise LedgerError(
                        f"ledger file {self.path} has schema {version}, this exporter reads "
                        f"{_SCHEMA_VERSION}"
                    )
                for step in range(version, _SCHEMA_VERSION):
                    self._upgrade_from(step)
            self._write.executescript(_SCHEMA)
            if version is None:
                self._write.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema', ?), ('key_index_upto', '0')",
                    (str(_SCHEMA_VERSION),),
                )
        except sqlite3.DatabaseError as error:
            raise _open_error(self.path, error) from error

    def _stored_schema_version(self) -> int | None:
        """The file's schema version; None for a new file."""
        has_meta = self._write.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta is None:
            return None
        row = self._write.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        return None if row is None else int(row[0])

    def _upgrade_from(self, version: int) -> None:
        """Upgrade the file from schema ``version`` to the next one.

        One transaction: a failure (disk full) leaves the file at schema ``version``.
        """
        script, copies = _UPGRADES[version]
        started = time.monotonic()
        self._write.create_function("payment_id_hash", 1, _id_hash, deterministic=True)
        self._write.create_function(
            "upgrade_schema_2_record", 1, upgrade_schema_2_record, deterministic=True
        )
        try:
            self._write.executescript(script)
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                self._write.execute("ROLLBACK")
            raise LedgerError(
                f"ledger file {self.path} could not be upgraded from schema {version} to "
                f"{version + 1} ({error}); it is left at schema {version}. The upgrade "
                f"copies {copies}: free that much disk space and restart"
            ) from error
        log.info(
            "ledger schema upgraded",
            extra={
                "path": str(self.path),
                "from_schema": version,
                "to_schema": version + 1,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

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
            writer = _TransactionWriter(cur, now, self._waiting_refs, numbers)
            writer.load([p for s in submissions for p in s.events])
            for submission in submissions:
                outcomes = [writer.add(prepared) for prepared in submission.events]
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
            if recent < _KEY_MERGE_EVENTS:
                return recent, upto, None
            (last,) = cur.execute(
                "SELECT max(?, coalesce(max(seq), 0)) FROM events", (upto,)
            ).fetchone()
            merging = (int(last), 0)
        last, part = merging
        width = 2**64 // _KEY_MERGE_PARTS
        low = -(2**63) + part * width
        bounds = (low, low + width - 1, last)
        cur.execute(
            "INSERT OR IGNORE INTO key_index (key_hash, seq) SELECT key_hash, seq "
            "FROM temp.recent_keys WHERE key_hash BETWEEN ? AND ? AND seq <= ?",
            bounds,
        )
        recent -= cur.execute(
            "DELETE FROM temp.recent_keys WHERE key_hash BETWEEN ? AND ? AND seq <= ?", bounds
        ).rowcount
        if part + 1 < _KEY_MERGE_PARTS:
            return recent, upto, (last, part + 1)
        cur.execute("UPDATE meta SET value = ? WHERE key = 'key_index_upto'", (str(last),))
        return recent, last, None

    def _emitted(self, rows: list[tuple[int, StoreRecord]]) -> None:
        """Count committed outbox records and hand them to the forwarder in memory."""
        self._backlog += len(rows)
        if not rows:
            return
        with self._handoff_lock:
            handoff = self._handoff
            if not handoff:
                self._handoff_start = rows[0][0]
            handoff.extend(rows)
            excess = len(handoff) - _HANDOFF_MAX_RECORDS
            if excess > 0:
                # The store is behind: its oldest records in memory go (they are in the
                # table), the newest stay.
                for _ in range(excess):
                    handoff.popleft()
                self._handoff_start = handoff[0][0]
                self._table_first = True

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

    def release_unjoined_failures(self, older_than_ms: int) -> list[Effect]:
        """Count failures whose ``payment:received`` never came on their own network.

        A failure waits for its payment to join; past the join timeout it is released with
        ``data.network`` (or ``unknown``), and a late ``payment:received`` then finds the
        payment already ended.
        """
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT seq, key, body FROM events WHERE state = 0 AND type = 'payment:failed' "
                "AND received_at < ? ORDER BY seq",
                (older_than_ms,),
            ).fetchall()
            numbers = dataclasses.replace(self._numbers)
            writer = _TransactionWriter(cur, _now_ms(), self._waiting_refs, numbers)
            for seq, key, body in rows:
                writer.release_orphan_failure(seq, key, parse_event(orjson.loads(body)))
            writer.flush()
        self._numbers = numbers
        self._emitted(writer.emitted)
        return writer.effects

    def _rollback(self, cur: sqlite3.Cursor) -> None:
        with contextlib.suppress(sqlite3.Error):
            cur.execute("ROLLBACK")
        self._waiting_refs = self._load_waiting_refs()

    def mark_delivered(self, up_to_seq: int, refused: Sequence[StoreRejection] = ()) -> int:
        """Drop outbox records up to ``up_to_seq`` once the store has them; returns how many.

        Records the store refused for good are kept as dead letters (reason ``store``)
        in the same transaction, so a poison record is never retried and never lost.
        """
        now = _now_ms()
        delivered = max(self._delivered_upto, up_to_seq)
        with self._transaction() as cur:
            cur.executemany(
                "INSERT INTO dead_letters (received_at, reason, error, key, raw) "
                "VALUES (?, 'store', ?, ?, ?)",
                [(now, r.reason, r.record.key, record_to_json(r.record).encode()) for r in refused],
            )
            cur.execute("DELETE FROM outbox WHERE last_seq <= ?", (up_to_seq,))
            cur.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_DELIVERED_UPTO, str(delivered)),
            )
        with self._handoff_lock:
            # Records are numbered without gaps: those newly delivered are the seqs
            # after the last delivered one.
            removed = delivered - self._delivered_upto
            self._delivered_upto = delivered
            self._backlog -= removed
            handoff = self._handoff
            while handoff and handoff[0][0] <= up_to_seq:
                handoff.popleft()
            if up_to_seq >= self._handoff_start - 1:
                self._table_first = False  # every row behind the handoff is delivered
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
        self._recent_keys -= recent_removed
        deleted = len(removed)
        self._event_count -= deleted
        return deleted

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
        """Store records committed but not yet delivered."""
        return self._backlog

    def read_outbox(self, limit: int) -> list[OutboxRow]:
        """The oldest undelivered store records, at most ``limit``."""
        with self._handoff_lock:
            if not self._table_first:
                return [OutboxRow(seq, record) for seq, record in islice(self._handoff, limit)]
            start, after = self._handoff_start, self._delivered_upto
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
            backlog=self._backlog,
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
        sql = "SELECT id, received_at, reason, error, key, raw FROM dead_letters"
        params: tuple[object, ...] = ()
        if reason is not None:
            sql += " WHERE reason = ?"
            params = (reason,)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._read_lock:
            rows = self._read.execute(sql, (*params, limit)).fetchall()
        return [DeadLetterRow(*row) for row in rows]

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


# What a commit looks up, each as one row of JSON rather than a row per match (each
# row is a step of SQLite, and each step gives the GIL away). ``_LOOKUP_ALL`` reads all
# three in one statement.
def _found_keys(param: str) -> str:
    return (
        "(SELECT json_group_array(json_array(key_hash, key, CAST(body AS TEXT)))"
        " FROM events WHERE seq IN ("
        f" SELECT seq FROM key_index WHERE key_hash IN (SELECT value FROM json_each({param}))"
        " UNION ALL SELECT seq FROM temp.recent_keys"
        f" WHERE key_hash IN (SELECT value FROM json_each({param}))))"
    )


def _found_payments(param: str) -> str:
    return (
        "(SELECT json_group_array(json_array(id, payment_id, network, payer, payee,"
        " amount_micro, received, terminal))"
        f" FROM payments WHERE id_hash IN (SELECT value FROM json_each({param})))"
    )


def _found_batches(param: str) -> str:
    return (
        "(SELECT json_group_array(json_array(batch_id, network, payment_count,"
        " total_amount_micro))"
        f" FROM batches WHERE batch_id IN (SELECT value FROM json_each({param})))"
    )


_LOOKUP_ALL = f"SELECT {_found_keys('?1')}, {_found_payments('?2')}, {_found_batches('?3')}"
_LOOKUP_PAYMENTS = f"SELECT {_found_payments('?')}"
_LOOKUP_BATCHES = f"SELECT {_found_batches('?')}"


def _payment_id_hashes(payment_ids: set[str]) -> str:
    return orjson.dumps(sorted({_id_hash(payment_id) for payment_id in payment_ids})).decode()


class _TransactionWriter:
    """Applies events inside an open transaction, collecting outcomes and metric effects.

    Writes are gathered and sent in bulk by :meth:`flush` (``executemany``), and the
    stored keys and payments the transaction's events refer to are read with one query
    each up front (:meth:`load`): per-event statements cost more in Python than SQLite
    spends on the rows.
    """

    def __init__(
        self, cur: sqlite3.Cursor, now_ms: int, waiting_refs: set[str], numbers: _RowNumbers
    ) -> None:
        self.cur = cur
        self.waiting_refs = waiting_refs
        self.now = now_ms
        self.effects: list[Effect] = []
        self.emitted: list[tuple[int, StoreRecord]] = []
        """(outbox seq, record) of every record written to the outbox, in order."""
        self._outbox: list[tuple[int, StoreRecord]] = []  # (event seq, record)
        # Keys already stored, by key hash: those loaded up front plus the writer's own.
        self._stored: dict[int, list[tuple[str, bytes]]] = {}
        # Rows for ``events``, inserted at flush; numbered here (one writer at a time),
        # consecutively from ``_rows_from_seq``.
        self._event_rows: list[_EventRow] = []
        self._numbers = numbers
        self._rows_from_seq = numbers.event_seq
        self.added = 0
        """Events written to ``events`` (and recent_keys) so far."""
        self._current_seq = 0
        self._current_waits = False
        # Seqs of the rows in ``_event_rows`` written as waiting, by the ref they wait for.
        self._waits_in_rows: dict[str, list[int]] = {}
        # Refs no stored row waits for: they began waiting in this transaction.
        self._refs_new_here: set[str] = set()
        # Join state by payment id (None: no row), as of this writer's own changes.
        self._payments: dict[str, _Payment | None] = {}
        self._changed_payments: dict[str, _Payment] = {}
        # Row ids of the payments this writer read or numbered.
        self._payment_rows: dict[str, int] = {}
        # Batches by id (None: no row), as of this writer's own changes, and those it
        # created, inserted at flush.
        self._batches: dict[str, _Batch | None] = {}
        self._created_batches: dict[str, _Batch] = {}

    def load(self, events: Sequence[PreparedEvent]) -> None:
        """Read what ``events`` will look up, in one query."""
        if not events:
            return
        hashes = [prepared.key_hash for prepared in events]
        payment_ids: set[str] = set()
        batch_ids: set[str] = set()
        for prepared in events:
            if (ref := prepared.ref) is not None:
                kind = prepared.event["type"]
                (batch_ids if kind.startswith("batch:") else payment_ids).add(ref)
        keys, payments, batches = self.cur.execute(
            _LOOKUP_ALL,
            (
                orjson.dumps(hashes).decode(),
                _payment_id_hashes(payment_ids),
                orjson.dumps(sorted(batch_ids)).decode(),
            ),
        ).fetchone()
        for key_hash, key, body in orjson.loads(keys):
            self._stored.setdefault(key_hash, []).append((key, body.encode()))
        self._take_payments(payment_ids, payments)
        self._take_batches(batch_ids, batches)

    def take_effects(self) -> list[Effect]:
        """The metric effects gathered since the last call."""
        effects, self.effects = self.effects, []
        return effects

    def _load_payments(self, payment_ids: set[str]) -> None:
        wanted = payment_ids.difference(self._payments)
        if wanted:
            (found,) = self.cur.execute(_LOOKUP_PAYMENTS, (_payment_id_hashes(wanted),)).fetchone()
            self._take_payments(wanted, found)

    def _take_payments(self, wanted: set[str], found: str) -> None:
        self._payments.update(dict.fromkeys(wanted))
        for row_id, payment_id, *values in orjson.loads(found):
            if payment_id in wanted:  # not another id of the same hash
                self._payments[payment_id] = _Payment(*values)
                self._payment_rows[payment_id] = row_id

    def _load_batches(self, batch_ids: set[str]) -> None:
        wanted = batch_ids.difference(self._batches)
        if wanted:
            (found,) = self.cur.execute(
                _LOOKUP_BATCHES, (orjson.dumps(sorted(wanted)).decode(),)
            ).fetchone()
            self._take_batches(wanted, found)

    def _take_batches(self, wanted: set[str], found: str) -> None:
        self._batches.update(dict.fromkeys(wanted))
        for batch_id, *values in orjson.loads(found):
            self._batches[batch_id] = _Batch(*values)

    def _batch(self, batch_id: str) -> _Batch | None:
        if batch_id not in self._batches:
            self._load_batches({batch_id})
        return self._batches[batch_id]

    def _payment(self, payment_id: str) -> _Payment | None:
        if payment_id not in self._payments:
            self._load_payments({payment_id})
        return self._payments[payment_id]

    def _set_payment(self, payment_id: str, payment: _Payment) -> None:
        self._payments[payment_id] = payment
        self._changed_payments[payment_id] = payment

    def add(self, prepared: PreparedEvent) -> Outcome:
        """Apply one event (after :meth:`load`): accepted, a duplicate or a conflict."""
        event, key_hash = prepared.event, prepared.key_hash
        for stored_key, stored_body in self._stored.get(key_hash, ()):
            if stored_key != prepared.key:
                continue  # a hash collision: another key
            if stored_body == prepared.body:
                return Outcome.DUPLICATE
            self.dead_letter(
                DeadLetter(
                    "conflict",
                    f"key {prepared.key!r} was already stored with a different body",
                    prepared.raw,
                    prepared.key,
                )
            )
            return Outcome.CONFLICT
        self._stored.setdefault(key_hash, []).append((prepared.key, prepared.body))
        seq = self._current_seq = self._numbers.event_seq
        self._numbers.event_seq += 1
        self._current_waits = False
        self.effects.append(NewEvent(event["type"]))
        self._apply(seq, prepared.key, event)
        ref = prepared.ref
        if self._current_waits:
            assert ref is not None  # only joined events wait
            self._waits_in_rows.setdefault(ref, []).append(seq)
        self._event_rows.append(
            (
                seq,
                prepared.key,
                key_hash,
                event["type"],
                ref,
                event["data"]["timestamp"],
                self.now,
                prepared.body,
                _WAITING if self._current_waits else _EMITTED,
            )
        )
        return Outcome.ACCEPTED

    def _flush_events(self) -> None:
        if self._event_rows:
            _insert_rows(
                self.cur,
                "INSERT INTO events (seq, key, key_hash, type, ref, ts, received_at, body, state)",
                self._event_rows,
            )
            # Copied from the rows just written: one statement that SQLite runs without
            # the GIL, rather than binding each key hash again.
            self.cur.execute(
                "INSERT INTO temp.recent_keys (key_hash, seq) "
                "SELECT key_hash, seq FROM events WHERE seq BETWEEN ? AND ?",
                (self._event_rows[0][0], self._event_rows[-1][0]),
            )
            self.added += len(self._event_rows)
            self._event_rows.clear()
            self._rows_from_seq = self._numbers.event_seq
            self._waits_in_rows.clear()
            self._refs_new_here.clear()  # their rows are stored now

    def dead_letter(self, letter: DeadLetter) -> None:
        self.cur.execute(
            "INSERT INTO dead_letters (received_at, reason, error, key, raw) VALUES (?,?,?,?,?)",
            (
                self.now if letter.received_at is None else letter.received_at,
                letter.reason,
                letter.error,
                letter.key,
                letter.raw,
            ),
        )

    def _emit(self, event_seq: int, record: StoreRecord) -> None:
        self._outbox.append((event_seq, record))

    def flush(self) -> None:
        """Write the events, join state and store records gathered so far, in order."""
        self._flush_events()
        if self._changed_payments:
            self._flush_payments()
        if self._created_batches:
            _insert_rows(
                self.cur,
                "INSERT INTO batches (batch_id, network, payment_count, total_amount_micro, "
                "updated_at)",
                [(bid, *batch, self.now) for bid, batch in self._created_batches.items()],
            )
            self._created_batches.clear()
        if self._outbox:
            first = self._numbers.outbox_seq
            rows = []
            for start in range(0, len(self._outbox), _OUTBOX_ROW_RECORDS):
                part = self._outbox[start : start + _OUTBOX_ROW_RECORDS]
                rows.append(
                    (
                        first + start,
                        first + start + len(part) - 1,
                        min(event_seq for event_seq, _ in part),
                        encode_records(record for _, record in part),
                    )
                )
            _insert_rows(self.cur, "INSERT INTO outbox (seq, last_seq, event_seq, records)", rows)
            self._numbers.outbox_seq += len(self._outbox)
            self.emitted.extend(
                zip(
                    range(first, self._numbers.outbox_seq),
                    (record for _, record in self._outbox),
                    strict=True,
                )
            )
            self._outbox.clear()

    def _flush_payments(self) -> None:
        ids = self._payment_rows
        rows = []
        for payment_id, payment in self._changed_payments.items():
            row_id = ids.get(payment_id)
            if row_id is None:
                row_id = ids[payment_id] = self._numbers.payment_id
                self._numbers.payment_id += 1
            rows.append((row_id, _id_hash(payment_id), payment_id, *payment, self.now))
        _insert_rows(
            self.cur,
            "INSERT INTO payments (id, id_hash, payment_id, network, payer, payee, "
            "amount_micro, received, terminal, updated_at)",
            rows,
            " ON CONFLICT (id) DO UPDATE SET network = excluded.network, "
            "payer = excluded.payer, payee = excluded.payee, "
            "amount_micro = excluded.amount_micro, received = excluded.received, "
            "terminal = excluded.terminal, updated_at = excluded.updated_at",
        )
        self._changed_payments.clear()

    def _wait(self, seq: int, ref: str) -> None:
        if ref not in self.waiting_refs:
            self.waiting_refs.add(ref)
            self._refs_new_here.add(ref)
        if seq == self._current_seq:
            self._current_waits = True  # add() writes its row so, and notes it
        elif seq >= self._rows_from_seq:
            self._set_row_state(seq, _WAITING)
            self._waits_in_rows.setdefault(ref, []).append(seq)
        else:
            self.cur.execute("UPDATE events SET state = ? WHERE seq = ?", (_WAITING, seq))
            self._refs_new_here.discard(ref)

    def _set_row_state(self, seq: int, state: int) -> None:
        index = seq - self._rows_from_seq
        _, key, key_hash, kind, ref, ts, received_at, body, _ = self._event_rows[index]
        self._event_rows[index] = (seq, key, key_hash, kind, ref, ts, received_at, body, state)

    def _apply(self, seq: int, key: str, event: Event) -> None:
        match event["type"]:
            case "payment:received":
                self._received(seq, key, event)
            case "payment:verified" | "payment:settled" | "payment:failed":
                self._payment_update(seq, key, event)
            case "batch:created":
                self._batch_created(seq, key, event)
            case "batch:settled":
                self._batch_settled(seq, key, event)
            case "revenue:recorded":
                r = event["data"]
                self._emit(
                    seq,
                    RevenueRecord(
                        key,
                        r["timestamp"],
                        r["network"],
                        r["kind"],
                        to_micro(r["amount"]),
                        r.get("paymentId"),
                    ),
                )
            case "websocket:clients":
                self._websocket(seq, key, event)

    def _received(self, seq: int, key: str, event: PaymentReceived) -> None:
        d = event["data"]
        payment_id, network = d["paymentId"], d["network"]
        amount = to_micro(d["amount"])
        payment = self._payment(payment_id)
        if payment is None:
            self._set_payment(payment_id, _Payment(network, d["payer"], d["payee"], amount, 1, 0))
            self.effects.append(PendingChange(network, 1))
        elif not payment.received:
            # The payment ended before its receipt arrived (a released failure).
            self._set_payment(
                payment_id,
                _Payment(network, d["payer"], d["payee"], amount, 1, payment.terminal),
            )
            if not payment.terminal:
                self.effects.append(PendingChange(network, 1))
        self._emit(
            seq,
            PaymentRecord(
                key,
                d["timestamp"],
                network,
                "received",
                payment_id,
                d["payer"],
                d["payee"],
                amount,
            ),
        )
        for waiting_seq, waiting_key, body in self._take_waiting(
            payment_id, ("payment:verified", "payment:settled", "payment:failed")
        ):
            waiting = parse_event(orjson.loads(body))
            assert waiting["type"] in ("payment:verified", "payment:settled", "payment:failed")
            self._payment_update(waiting_seq, waiting_key, waiting)

    def _payment_update(
        self, seq: int, key: str, event: PaymentVerified | PaymentSettled | PaymentFailed
    ) -> None:
        payment_id, timestamp = event["data"]["paymentId"], event["data"]["timestamp"]
        if event["type"] == "payment:failed" and payment_id == UNKNOWN_PAYMENT_ID:
            error = event["data"]["error"]
            network = event["data"].get("network") or UNKNOWN_NETWORK
            self._emit(
                seq, PaymentRecord(key, timestamp, network, "failed", payment_id, error=error)
            )
            self.effects.append(TerminalPayment(network, "failed"))
            return
        payment = self._payment(payment_id)
        if payment is None or not payment.received:
            self._wait(seq, payment_id)
            return
        network, payer, payee, amount, _, terminal = payment
        assert amount is not None  # payment:received always sets it
        match event["type"]:
            case "payment:verified":
                self._emit(
                    seq,
                    PaymentRecord(
                        key,
                        timestamp,
                        network,
                        "verified",
                        payment_id,
                        payer,
                        payee,
                        amount,
                        verification_ms=event["data"]["verificationTime"],
                    ),
                )
                return
            case "payment:settled":
                s = event["data"]
                fee = to_micro(s["fee"])
                self._emit(
                    seq,
                    PaymentRecord(
                        key,
                        timestamp,
                        network,
                        "settled",
                        payment_id,
                        payer,
                        payee,
                        amount,
                        fee_micro=fee,
                        settlement_ms=s["settlementTime"],
                        tx=s["transaction"],
                    ),
                )
                self.effects.append(
                    TerminalPayment(network, "success", amount, fee, s["settlementTime"])
                )
            case "payment:failed":
                self._emit(
                    seq,
                    PaymentRecord(
                        key,
                        timestamp,
                        network,
                        "failed",
                        payment_id,
                        payer,
                        payee,
                        amount,
                        error=event["data"]["error"],
                    ),
                )
                self.effects.append(TerminalPayment(network, "failed"))
        if not terminal:
            # received (checked above) and now ended; a new tuple is cheaper than _replace
            self._set_payment(payment_id, _Payment(network, payer, payee, amount, 1, 1))
            self.effects.append(PendingChange(network, -1))

    def release_orphan_failure(self, seq: int, key: str, event: Event) -> None:
        assert event["type"] == "payment:failed"
        d = event["data"]
        network = d.get("network") or UNKNOWN_NETWORK
        self.cur.execute("UPDATE events SET state = ? WHERE seq = ?", (_EMITTED, seq))
        if self._payment(d["paymentId"]) is None:
            self._set_payment(d["paymentId"], _Payment(network, None, None, None, 0, 1))
        self._emit(
            seq,
            PaymentRecord(key, d["timestamp"], network, "failed", d["paymentId"], error=d["error"]),
        )
        self.effects.append(TerminalPayment(network, "failed"))

    def _batch_created(self, seq: int, key: str, event: BatchCreated) -> None:
        d = event["data"]
        batch_id, network, count = d["batchId"], d["network"], d["paymentCount"]
        total = to_micro(d["totalAmount"])
        if self._batch(batch_id) is None:  # the first batch:created of an id defines it
            batch = self._batches[batch_id] = _Batch(network, count, total)
            self._created_batches[batch_id] = batch
        self._emit(
            seq,
            BatchRecord(key, d["timestamp"], network, "created", batch_id, count, total),
        )
        for waiting_seq, waiting_key, body in self._take_waiting(batch_id, ("batch:settled",)):
            waiting = parse_event(orjson.loads(body))
            assert waiting["type"] == "batch:settled"
            self._batch_settled(waiting_seq, waiting_key, waiting)

    def _take_waiting(self, ref: str, types: tuple[str, ...]) -> list[tuple[int, str, bytes]]:
        """Events of ``types`` waiting for ``ref``, marked as no longer waiting."""
        if ref not in self.waiting_refs:
            return []
        # Stored rows first (they are older), then this transaction's own, which are
        # looked at in memory: writing them out first would split the bulk inserts.
        rows: list[tuple[int, str, bytes, str]] = []
        if ref not in self._refs_new_here:
            (found,) = self.cur.execute(
                "SELECT json_group_array(json_array(seq, key, CAST(body AS TEXT), type))"
                " FROM events WHERE ref = ? AND state = 0",
                (ref,),
            ).fetchone()
            rows = [
                (seq, key, body.encode(), kind)
                for seq, key, body, kind in sorted(orjson.loads(found))  # in commit order
            ]
        stored = len(rows)
        for seq in self._waits_in_rows.get(ref, ()):
            row = self._event_rows[seq - self._rows_from_seq]
            if row[-1] == _WAITING:
                rows.append((seq, row[1], row[7], row[3]))
        taken = [(seq, key, body) for seq, key, body, kind in rows if kind in types]
        if len(taken) == len(rows):
            self.waiting_refs.discard(ref)  # nothing else waits for it
            self._refs_new_here.discard(ref)
        taken_stored = [seq for seq, _, _, kind in rows[:stored] if kind in types]
        if taken_stored:
            self.cur.execute(
                "UPDATE events SET state = ? WHERE seq IN (SELECT value FROM json_each(?))",
                (_EMITTED, orjson.dumps(taken_stored).decode()),
            )
        for seq, _, _, kind in rows[stored:]:
            if kind in types:
                self._set_row_state(seq, _EMITTED)
        return taken

    def _batch_settled(self, seq: int, key: str, event: BatchSettled) -> None:
        d = event["data"]
        batch = self._batch(d["batchId"])
        if batch is None:
            self._wait(seq, d["batchId"])
            return
        network, count, total = batch
        gas = int(d["gasUsed"])
        self._emit(
            seq,
            BatchRecord(
                key,
                d["timestamp"],
                network,
                "settled",
                d["batchId"],
                count,
                total,
                to_micro(d["totalFees"]),
                gas,
                d["transaction"],
            ),
        )
        self.effects.append(BatchGas(network, gas))

    def _websocket(self, seq: int, key: str, event: WebsocketClients) -> None:
        timestamp, count = event["data"]["timestamp"], event["data"]["count"]
        self._emit(seq, WebsocketRecord(key, timestamp, count))
        row = self.cur.execute("SELECT ts FROM websocket_latest").fetchone()
        if row is None or timestamp >= row[0]:
            self.cur.execute(
                "INSERT INTO websocket_latest (id, ts, count) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET ts = excluded.ts, count = excluded.count",
                (timestamp, count),
            )
            self.effects.append(WebsocketCount(count))


class _Payment(NamedTuple):
    """A ``payments`` row: what ``payment:received`` said and whether the payment ended."""

    network: str
    payer: str | None
    payee: str | None
    amount_micro: int | None
    received: int
    terminal: int


class _Batch(NamedTuple):
    """A ``batches`` row: what ``batch:created`` said."""

    network: str
    payment_count: int
    total_amount_micro: int


def _key_hash(key: str) -> int:
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _id_hash(text: str) -> int:
    """A 32-bit hash of a payment id, signed so that SQLite stores it in 4 bytes."""
    return zlib.crc32(text.encode()) - 0x8000_0000


@dataclass(frozen=True, slots=True)
class _CommitRequest:
    submission: Submission
    future: asyncio.Future[SubmissionResult]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True, slots=True)
class _JobRequest:
    fn: Callable[[], object]
    future: asyncio.Future[object]
    loop: asyncio.AbstractEventLoop


# Requests of at most this many events (and dead letters) may commit on the event loop
# that submitted them. The loop stops for the commit (some 20 us per event, 0.3 ms per
# commit), so larger ones go to the writer thread.
_LOOP_COMMIT_MAX_REQUEST = 64
# An event loop's gathered requests commit once they hold this many events, however
# many more are arriving: the loop stops for about 10 ms at most.
_LOOP_COMMIT_MAX_EVENTS = 512
# Passes of the event loop a commit waits at most while each pass brings more requests.
_LOOP_COMMIT_MAX_PASSES = 16


class GroupCommitter:
    """Runs the ledger's writes one at a time, folding waiting submissions into one commit.

    ``submit`` resolves only after the transaction holding the submission committed,
    which is what lets the receiver answer 202.

    Small requests (single events) commit on the event loop that submitted them. The
    commit waits while each pass of the loop brings more of them (the requests that
    arrived meanwhile are parsed in those passes), then takes them all: a transaction's
    cost is mostly per commit, and handing every small request to another thread cost
    more in thread switches than the commit itself. Larger requests, deliveries and
    retention run on the writer thread. One lock lets only one of them write at a time;
    the event loop never waits for it, but hands its requests to the writer thread when
    the lock is taken. With ``durability=power`` every commit syncs the disk, so all of
    them run on the writer thread.

    The lock also covers the ledger's own state (row numbers, the outbox handoff) and
    its write connection outside transactions, which the ledger's write methods use as
    if they were alone: every write goes through :meth:`submit` or :meth:`call`.
    """

    def __init__(self, ledger: Ledger, max_events_per_commit: int = 50_000) -> None:
        self.ledger = ledger
        self.on_commit_hooks: list[Callable[[], None]] = []
        """Called after each successful commit, before its requests are answered, on the
        thread that committed."""
        self._max_events = max_events_per_commit
        self._queue: queue.SimpleQueue[_CommitRequest | _JobRequest | None] = queue.SimpleQueue()
        # Held for each commit and job, with the ledger's state updates that follow it.
        self._lock = threading.Lock()
        self._commit_on_loop = ledger.durability is Durability.PROCESS
        self._loop: asyncio.AbstractEventLoop | None = None  # the one that commits inline
        self._gathered: list[_CommitRequest] = []
        self._gathered_events = 0
        self._gathered_at_last_pass = 0
        self._passes = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        self.commits = 0

    async def submit(self, submission: Submission) -> SubmissionResult:
        """Commit ``submission`` (with whatever else is waiting) and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SubmissionResult] = loop.create_future()
        request = _CommitRequest(submission, future, loop)
        size = len(submission.events) + len(submission.dead_letters)
        if (
            self._commit_on_loop
            and size <= _LOOP_COMMIT_MAX_REQUEST
            and self._loop in (None, loop)
            and not self._closed
        ):
            self._loop = loop
            self._gather(request, size)
        else:
            self._queue.put(request)
        return await future

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run another write (delivery marks, retention) on the writer thread, in order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_JobRequest(fn, future, loop))  # type: ignore[arg-type]
        return await future

    def close(self) -> None:
        """Finish queued work and stop the writer thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    # ------------------------------------------------------------ on the event loop

    def _gather(self, request: _CommitRequest, size: int) -> None:
        if not self._gathered:
            self._gathered_at_last_pass, self._passes = 0, 0
            request.loop.call_soon(self._commit_gathered)
        self._gathered.append(request)
        self._gathered_events += size

    def _commit_gathered(self) -> None:
        gathered = self._gathered
        if (
            len(gathered) > self._gathered_at_last_pass
            and self._passes < _LOOP_COMMIT_MAX_PASSES
            and self._gathered_events < _LOOP_COMMIT_MAX_EVENTS
        ):
            self._gathered_at_last_pass = len(gathered)
            self._passes += 1
            gathered[0].loop.call_soon(self._commit_gathered)
            return
        self._gathered, self._gathered_events = [], 0
        if self._closed:  # the writer thread may be gone
            closing = LedgerUnavailableError("the ledger is closing")
            _fail_all([(request.future, closing) for request in gathered])
            return
        if not self._lock.acquire(blocking=False):
            for request in gathered:  # the writer thread commits them, after its work
                self._queue.put(request)
            return
        try:
            self._commit(gathered, wait=False)
        finally:
            self._lock.release()

    # ------------------------------------------------------------ on the writer thread

    def _run(self) -> None:
        pending: list[_CommitRequest] = []
        events = 0
        while True:
            try:
                item = self._queue.get(block=not pending)
            except queue.Empty:  # nothing more waiting: commit what has gathered
                with self._lock:
                    self._commit(pending)
                pending, events = [], 0
                continue
            if isinstance(item, _CommitRequest):
                pending.append(item)
                events += len(item.submission.events)
                if events < self._max_events:
                    continue
            if pending:
                with self._lock:
                    self._commit(pending)
                pending, events = [], 0
            if isinstance(item, _JobRequest):
                with self._lock:
                    self._run_job(item)
            elif item is None:
                return

    def _run_job(self, job: _JobRequest) -> None:
        try:
            value = job.fn()
        except Exception as error:
            job.loop.call_soon_threadsafe(_set_exception, job.future, error)
            return
        job.loop.call_soon_threadsafe(_set_result, job.future, value)

    # ------------------------------------------------------------ on either

    def _commit(self, batch: list[_CommitRequest], wait: bool = True) -> None:
        """Commit ``batch`` (the caller holds the lock) and resolve its futures.

        Without ``wait``, the batch goes to the writer thread if a checkpoint holds the
        ledger's write lock.
        """
        try:
            submissions = [request.submission for request in batch]
            results = (
                self.ledger.commit(submissions) if wait else self.ledger.try_commit(submissions)
            )
        except Exception as error:
            if len(batch) > 1:
                # One request's failure must not fail the others that shared its commit.
                for request in batch:
                    self._commit([request], wait)
                return
            log.error("ledger commit failed", extra={"error": str(error)})
            request = batch[0]
            failure = (
                error
                if isinstance(error, LedgerError)
                else LedgerUnavailableError(
                    f"ledger commit failed: {type(error).__name__}: {error}"
                )
            )
            _resolve(request.loop, [(request.future, failure)], _fail_all)
            return
        if results is None:
            for request in batch:
                self._queue.put(request)
            return
        self.commits += 1
        for hook in self.on_commit_hooks:  # before any answer goes out
            hook()
        # One wake-up of each event loop per commit, however many requests it resolves.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]] = {}
        for request, result in zip(batch, results, strict=True):
            by_loop.setdefault(request.loop, []).append((request.future, result))
        for loop, resolutions in by_loop.items():
            _resolve(loop, resolutions, _resolve_all)


def _resolve(
    loop: asyncio.AbstractEventLoop,
    resolutions: list[tuple[asyncio.Future[Any], object]],
    resolve: Callable[[list[tuple[asyncio.Future[Any], object]]], None],
) -> None:
    """Run ``resolve(resolutions)`` on ``loop``: at once when this thread runs it."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        resolve(resolutions)
    else:
        loop.call_soon_threadsafe(resolve, resolutions)


def _fail_all(failures: list[tuple[asyncio.Future[Any], object]]) -> None:
    for future, error in failures:
        assert isinstance(error, BaseException)
        _set_exception(future, error)


def _resolve_all(resolutions: list[tuple[asyncio.Future[Any], object]]) -> None:
    for future, value in resolutions:
        _set_result(future, value)


def _set_result(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
