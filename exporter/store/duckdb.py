"""Embedded DuckDB store: the default time-series sink when no InfluxDB is configured.

One table per record class (docs/architecture.md section 6) holds self-contained rows, one per event
dedup key (a replayed outbox batch leaves every row once), and the analytics SQL is a
filter plus an aggregate over a single table. A fifth table, ``analytics``,
receives the scheduler's write-back of computed figures. Time-window filters need no
extra index: DuckDB keeps min/max zone maps per row group, and rows arrive roughly in
``time_ms`` order, so a window scan skips the row groups outside it (an ART index on
``time_ms`` would only slow inserts).

DuckDB lets a single process hold a database file for writing, so opening a file that
another exporter holds fails with :class:`StoreLockedError`; a file that is not a
DuckDB database, or is damaged, fails with :class:`StoreCorruptError` and is never
recreated. DuckDB checksums every block but reads (and checks) a block only when a query
needs it, and never looks past the block count of its header, so :meth:`DuckDBStore.open`
compares that count with the file's size and reads every table once (0.05 s per million
records).

A checkpoint that fails (the disk is full) makes DuckDB invalidate the database for the
rest of the process; the store then reopens the file on its next use, which replays the
file's WAL. Nothing is lost meanwhile: the ledger's outbox keeps every record until a
write succeeds.

Writes append each table's rows with DuckDB's appender straight to the table, then count
the keys the batch's time span now holds twice: none but when the batch replays records
delivered before (after a crash between the store's commit and the ledger's, or a
``backfill``). Then the transaction is rolled back and the batch written again through a
connection-private staging table of the same columns, whose rows move into the table
with an INSERT ... SELECT that skips stored keys. Staging every batch cost 5.5-6.4 µs of
CPU per record in bench/store.py, appending and counting 4.4-6.1 (mean 5.8 against 5.0
over nine rounds each). Values that do not fit their column fail the batch either way.

The appender was chosen over other ways in: measured earlier on 5,000-record batches of
payments, a staged write cost about 11-15 µs of CPU per record against 19-22 µs for one
columnar JSON document unpacked with ``from_json_strict`` + ``UNNEST`` (the engine's JSON
parsing was half of it); ``executemany`` managed about 1.5k records/s. Integers, floats
and ``gas_used`` (``HUGEINT``) arrive exactly.

Checkpoints do not vacuum (DuckDB's ``max_vacuum_tasks`` is 0). The record tables are
only ever appended to, and each checkpoint after appends starts a new row group; vacuuming
merged those row groups again, which made every other checkpoint of a growing table cost
more as it grew: 0.4 s of CPU at 250,000 payments, 0.9 s at a million, against 0.05-0.09 s
for the others. Without it the row groups stay as the checkpoints wrote them (one per
checkpoint), the analytics answer as fast, and the file came out smaller (10.5 against
13.6 MB for 600,000 payments).

The record tables have no primary key: DuckDB holds a key index wholly in memory, and
over a million random keys it outgrew the 64 MB buffer pool, failed the checkpoint and
invalidated the database. Stored keys are instead found within the batch's own time span
(see :meth:`_Table.repeated_keys_sql` and :meth:`_Table.insert_sql`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pathlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeVar, cast

import duckdb

from ..config import DUCKDB_MEMORY_LIMIT, DUCKDB_THREADS
from ..errors import StoreCorruptError, StoreError, StoreInvalidatedError, StoreLockedError
from ..ledger import check_no_pending_recovery, make_file_private
from ..records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    StoreRejection,
    WebsocketRecord,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    sql_type: str
    not_null: bool = False


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: tuple[_Column, ...]

    def ddl(self, name: str | None = None) -> str:
        """The CREATE TABLE statement for this table (or a copy of it called ``name``).

        No primary key (see the module docstring); :meth:`insert_sql` skips stored keys.
        """
        cols = [
            f'"{c.name}" {c.sql_type}{" NOT NULL" if c.not_null else ""}'
            for c in self.all_columns()
        ]
        return f'CREATE TABLE IF NOT EXISTS "{name or self.name}" ({", ".join(cols)})'

    def all_columns(self) -> tuple[_Column, ...]:
        """Every column in table order: the common ``key`` and ``time_ms``, then the fields."""
        return (_Column("key", "VARCHAR", True), _Column("time_ms", "BIGINT", True), *self.columns)

    @property
    def stage(self) -> str:
        """The writer connection's temporary table the rows of one INSERT are appended to."""
        return f"stage_{self.name}"

    def stage_ddl(self) -> str:
        """CREATE of :attr:`stage`: this table's columns, no constraints (the INSERT into
        the table checks them)."""
        return (
            f'CREATE TEMP TABLE IF NOT EXISTS "{self.stage}" AS SELECT * FROM "{self.name}" LIMIT 0'
        )

    def insert_sql(self) -> str:
        """INSERT of the rows staged in :attr:`stage`, skipping keys already stored.

        A record's key always comes with the same ``time_ms``, so a stored copy lies
        between the staged rows' least and greatest ``time_ms`` (``$1``, ``$2``): the
        anti-join reads only the row groups whose zone maps overlap that span.
        """
        names = ", ".join(f'"{c.name}"' for c in self.all_columns())
        return (
            f'INSERT INTO "{self.name}" ({names}) SELECT n.* FROM "{self.stage}" AS n '
            f'ANTI JOIN (SELECT "key", time_ms FROM "{self.name}" '
            "WHERE time_ms BETWEEN $1 AND $2) AS p "
            'ON n."key" = p."key" AND n.time_ms = p.time_ms'
        )

    def repeated_keys_sql(self) -> str:
        """How many keys this table holds more than once with a ``time_ms`` in ``$1``..``$2``:
        after a batch is appended straight to it, the keys it shares with stored rows."""
        return (
            f'SELECT count(*) FROM (SELECT 1 FROM "{self.name}" WHERE time_ms BETWEEN $1 AND $2 '
            'GROUP BY "key", time_ms HAVING count(*) > 1)'
        )


_V, _B, _D = "VARCHAR", "BIGINT", "DOUBLE"

_TABLES: dict[type[StoreRecord], _Table] = {
    PaymentRecord: _Table(
        "payment",
        (
            _Column("network", _V, True),
            _Column("status", _V, True),
            _Column("payment_id", _V, True),
            _Column("payer", _V),
            _Column("payee", _V),
            _Column("amount_micro", _B),
            _Column("fee_micro", _B),
            _Column("settlement_ms", _D),
            _Column("verification_ms", _D),
            _Column("tx", _V),
            _Column("error", _V),
        ),
    ),
    BatchRecord: _Table(
        "batch",
        (
            _Column("network", _V, True),
            _Column("status", _V, True),
            _Column("batch_id", _V, True),
            _Column("payment_count", _B, True),
            _Column("total_amount_micro", _B, True),
            _Column("total_fees_micro", _B),
            _Column("gas_used", "HUGEINT"),
            _Column("tx", _V),
        ),
    ),
    RevenueRecord: _Table(
        "revenue",
        (
            _Column("network", _V, True),
            _Column("kind", _V, True),
            _Column("amount_micro", _B, True),
            _Column("payment_id", _V),
        ),
    ),
    WebsocketRecord: _Table("websocket", (_Column("count", _B, True),)),
}

_ANALYTICS_DDL = (
    'CREATE TABLE IF NOT EXISTS analytics (name VARCHAR NOT NULL, "window" VARCHAR NOT NULL, '
    "time_ms BIGINT NOT NULL, field VARCHAR NOT NULL, value DOUBLE, "
    'PRIMARY KEY (name, "window", time_ms, field))'
)
_ANALYTICS_UPSERT = (
    'INSERT INTO analytics (name, "window", time_ms, field, value) '
    "SELECT UNNEST($1::VARCHAR[]), UNNEST($2::VARCHAR[]), UNNEST($3::BIGINT[]), "
    "UNNEST($4::VARCHAR[]), UNNEST($5::DOUBLE[]) "
    'ON CONFLICT (name, "window", time_ms, field) DO UPDATE SET value = excluded.value'
)

#: Every table the store creates, in write order.
TABLES: tuple[str, ...] = (*(t.name for t in _TABLES.values()), "analytics")

_INSERT_SQL: dict[str, str] = {t.name: t.insert_sql() for t in _TABLES.values()}
_REPEATED_KEYS_SQL: dict[str, str] = {t.name: t.repeated_keys_sql() for t in _TABLES.values()}
# A batch's records are checked against stored keys in runs whose times lie closer than
# this: one late record (a join released after its timeout) must not widen the span
# that every other record of the batch is checked against.
_SPAN_GAP_MS = 60_000
# Records appended (or staged and moved) per statement; a batch's statements share one
# transaction. Staged rows hold buffer pool memory until they are moved, and the pool is
# small.
_STATEMENT_RECORDS = 5_000
_TIME = attrgetter("time_ms")
# Each record class's column values, in table order, as a tuple read in C.
_ROW_VALUES: dict[type[StoreRecord], Callable[[StoreRecord], tuple[Any, ...]]] = {
    cls: attrgetter(*(c.name for c in t.all_columns())) for cls, t in _TABLES.items()
}

_Config = dict[str, str | bool | int | float | list[str]]
_A = TypeVar("_A")

# Substrings of DuckDB errors that mean another process holds the file's lock.
_LOCK_MARKERS = ("could not set lock", "conflicting lock")
# Substrings of DuckDB errors that mean the file's bytes are not a usable database.
_CORRUPT_MARKERS = (
    "not a valid duckdb database",
    "corrupt",
    "checksum",
    "could not read enough bytes",
)


@dataclass(frozen=True, slots=True)
class _Statement:
    """One INSERT of a batch: rows of one table, within ``first_ms``..``last_ms``."""

    table: _Table
    rows: list[tuple[Any, ...]]
    first_ms: int
    last_ms: int


def _statements(records: list[StoreRecord]) -> Iterator[_Statement]:
    """The INSERTs of one batch, each one's rows built only when it runs."""
    by_class: dict[type[StoreRecord], dict[str, StoreRecord]] = {cls: {} for cls in _TABLES}
    for record in records:
        by_class[type(record)].setdefault(record.key, record)  # a key once per batch too
    for cls, rows in by_class.items():
        values = _ROW_VALUES[cls]
        for run in _time_runs(list(rows.values())):
            for start in range(0, len(run), _STATEMENT_RECORDS):
                part = run[start : start + _STATEMENT_RECORDS]
                yield _Statement(
                    _TABLES[cls], [values(r) for r in part], part[0].time_ms, part[-1].time_ms
                )


def _append_if_new(cur: duckdb.DuckDBPyConnection, records: list[StoreRecord]) -> bool:
    """Append ``records`` straight to their tables, checking each statement's span for a
    key stored twice: False at the first (the caller rolls back), True when all were new."""
    for statement in _statements(records):
        name = statement.table.name
        with cur.appender(name) as appender:
            appender.append_rows(statement.rows)
        span = [statement.first_ms, statement.last_ms]
        ((repeated,),) = cur.execute(_REPEATED_KEYS_SQL[name], span).fetchall()
        if repeated:
            return False
    return True


def _insert_skipping_stored(cur: duckdb.DuckDBPyConnection, records: list[StoreRecord]) -> None:
    """Stage each statement's rows and move in those whose key is not stored yet."""
    for statement in _statements(records):
        stage = statement.table.stage
        with cur.appender(stage) as appender:
            appender.append_rows(statement.rows)
        span = [statement.first_ms, statement.last_ms]
        cur.execute(_INSERT_SQL[statement.table.name], span)
        cur.execute(f'DELETE FROM "{stage}"')


def _writer_cursor(conn: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A connection for writes, with the staging table of each record table (temporary
    tables belong to the connection that made them)."""
    cur = conn.cursor()
    for table in _TABLES.values():
        cur.execute(table.stage_ddl())
    return cur


def _time_runs(records: list[StoreRecord]) -> list[list[StoreRecord]]:
    """``records`` by time, split where consecutive times are ``_SPAN_GAP_MS`` apart."""
    if not records:
        return []
    ordered = sorted(records, key=_TIME)
    if ordered[-1].time_ms - ordered[0].time_ms <= _SPAN_GAP_MS:
        return [ordered]  # no gap fits in the whole span: the usual batch, no loop
    runs = [[ordered[0]]]
    for previous, record in itertools.pairwise(ordered):
        if record.time_ms - previous.time_ms > _SPAN_GAP_MS:
            runs.append([])
        runs[-1].append(record)
    return runs


def _drop_primary_keys(conn: duckdb.DuckDBPyConnection) -> None:
    """Rebuild record tables made with a primary key (an older layout) without it.

    DuckDB cannot drop a constraint in place, so the rows move to a fresh table.
    """
    keyed = {
        str(name)
        for (name,) in conn.execute(
            "SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'"
        ).fetchall()
    }
    for table in _TABLES.values():
        if table.name not in keyed:
            continue
        log.info("rebuilding store table without its key index", extra={"table": table.name})
        conn.execute(table.ddl(f"{table.name}__rebuild"))
        conn.execute(f'INSERT INTO "{table.name}__rebuild" SELECT * FROM "{table.name}"')
        conn.execute(f'DROP TABLE "{table.name}"')
        conn.execute(f'ALTER TABLE "{table.name}__rebuild" RENAME TO "{table.name}"')


def _connect(path: pathlib.Path, existed: bool, config: _Config) -> duckdb.DuckDBPyConnection:
    """Connect, create the schema, and read every block of an existing file."""
    conn: duckdb.DuckDBPyConnection | None = None
    try:
        conn = duckdb.connect(str(path), config=config)
        conn.execute("BEGIN")
        for table in _TABLES.values():
            conn.execute(table.ddl())
        conn.execute(_ANALYTICS_DDL)
        _drop_primary_keys(conn)
        conn.execute("COMMIT")
        if existed:
            _read_every_block(conn)
    except duckdb.Error as error:
        if conn is not None:
            conn.close()
        raise _classify_open_error(path, existed, error) from error
    return conn


def _rollback(cur: duckdb.DuckDBPyConnection) -> None:
    # A failed rollback must not mask the error that caused it.
    try:
        cur.execute("ROLLBACK")
    except duckdb.Error as error:
        if "no transaction is active" in str(error):
            return  # the failed COMMIT has already rolled back (e.g. on a full disk)
        log.warning("duckdb rollback failed", extra={"error": str(error)})


def damaged_store_message(path: pathlib.Path, problem: str) -> str:
    """One paragraph for the operator: which file, what is wrong, what to run."""
    return (
        f"DuckDB store {path} is damaged: {problem}. The exporter does not start on a "
        f"damaged store. Stop every process using {path.parent}, then run "
        f"`facilitator-exporter recover --data-dir {path.parent}` to move it aside (it is "
        f"kept as {path.name}.damaged-<UTC time>) and rebuild the store from the events "
        "the ledger holds"
    )


_MAIN_HEADER_BYTES = 4096
_HEADERS_BYTES = 3 * _MAIN_HEADER_BYTES  # the main header, then two database headers


def _store_file_problem(path: pathlib.Path) -> str | None:
    """What is wrong with the store file's size, or None when it may match its header.

    The file is three 4 KiB headers and then ``block_count`` blocks of
    ``block_alloc_size`` bytes, as recorded in the newer (higher ``iteration``) of the
    two database headers. A checkpoint writes its blocks before the header that counts
    them, so a crash may leave the file longer than its header says, but only while the
    WAL still holds what the checkpoint was writing. A file shorter than its header
    says is not damage by itself: the blocks counted last may be free (a checkpoint
    writes the header and then cuts free blocks off the end), and a lost used block is
    found by reading every table (:func:`_read_every_block`), which DuckDB does at open.
    Header layouts this check does not recognise are left to DuckDB.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_HEADERS_BYTES)
    if len(head) < _HEADERS_BYTES or head[8:12] != b"DUCK":
        return None  # DuckDB itself says this is not a database
    headers = []
    for offset in (_MAIN_HEADER_BYTES, 2 * _MAIN_HEADER_BYTES):
        # checksum, iteration, meta_block, free_list, block_count, block_alloc_size
        fields = [
            int.from_bytes(head[offset + i : offset + i + 8], "little") for i in range(0, 48, 8)
        ]
        headers.append(fields)
    _, _, _, _, block_count, block_size = max(headers, key=lambda fields: fields[1])
    if block_size < 4096 or block_size & (block_size - 1) or block_count > size:
        return None
    expected = _HEADERS_BYTES + block_count * block_size
    wal = path.with_name(path.name + ".wal")
    if size > expected and not (wal.exists() and wal.stat().st_size > 0):
        return (
            f"it is {size - expected} bytes longer than the {block_count} blocks its "
            f"header counts ({expected} bytes): bytes were appended"
        )
    return None


def _read_every_block(conn: duckdb.DuckDBPyConnection) -> None:
    """Read every row of every table, so that DuckDB verifies each block's checksum."""
    for name in TABLES:
        conn.execute(f'SELECT bit_xor(hash(t)) FROM "{name}" AS t').fetchall()


def _unopenable_message(path: pathlib.Path, error: OSError | duckdb.Error) -> str:
    """Why the store file cannot be opened (neither locked nor damaged), and what to check."""
    if isinstance(error, OSError):
        return (
            f"DuckDB store {path} cannot be opened ({error.strerror or error}): check that "
            f"{path.parent} is a directory this user may write and {path.name} in it a "
            "regular file"
        )
    return (
        f"DuckDB store {path} cannot be opened (DuckDB said: {error}): check "
        "EXPORTER_DUCKDB_MEMORY_LIMIT and EXPORTER_DUCKDB_THREADS, and that the disk "
        f"holding {path.parent} has space"
    )


def _classify_open_error(path: pathlib.Path, existed: bool, error: duckdb.Error) -> Exception:
    text = str(error)
    lowered = text.lower()
    if isinstance(error, duckdb.IOException) and any(m in lowered for m in _LOCK_MARKERS):
        return StoreLockedError(
            f"DuckDB store {path} is locked: another exporter process holds it "
            f"(DuckDB allows one process per file; stop that process or use its HTTP API). "
            f"DuckDB said: {text}"
        )
    if existed and (
        isinstance(error, duckdb.SerializationException)
        or any(marker in lowered for marker in _CORRUPT_MARKERS)
    ):
        return StoreCorruptError(damaged_store_message(path, f"DuckDB said: {text}"))
    return error


class DuckDBStore:
    """The embedded DuckDB store: idempotent, atomic batch writes and SQL for analytics."""

    name = "duckdb"

    def __init__(self, path: pathlib.Path, conn: duckdb.DuckDBPyConnection) -> None:
        """Wrap an open connection whose schema exists; use :meth:`open` instead."""
        self.path = path
        self._config: _Config = {}
        self._conn = conn
        self._writer = _writer_cursor(conn)
        # Why DuckDB invalidated the open connection, until the file is reopened.
        self._invalidated: str | None = None
        self._write_lock = threading.Lock()  # serialises every use of ``_writer``
        self._conn_lock = threading.Lock()  # guards cursor creation against close
        self._readers: set[duckdb.DuckDBPyConnection] = set()
        self._readers_done = threading.Condition(self._conn_lock)
        self._closed = False

    @classmethod
    def open(
        cls,
        path: pathlib.Path,
        memory_limit: str = DUCKDB_MEMORY_LIMIT,
        threads: int = DUCKDB_THREADS,
    ) -> DuckDBStore:
        """Open (or create) the store file and its schema; blocking, call before serving.

        ``memory_limit`` and ``threads`` bound DuckDB's buffer pool and worker threads,
        which otherwise default to 80 % of the machine's memory and every core. The
        defaults are the exporter's (``EXPORTER_DUCKDB_MEMORY_LIMIT``, ``_THREADS``). Refused
        while an interrupted ``recover`` of the file is unfinished.
        """
        path = pathlib.Path(path)
        check_no_pending_recovery(path)
        config: _Config = {"memory_limit": memory_limit, "threads": threads, "max_vacuum_tasks": 0}
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            existed = path.exists()
            if existed:
                problem = _store_file_problem(path)
                if problem is not None:
                    raise StoreCorruptError(damaged_store_message(path, problem))
            conn = _connect(path, existed, config)
            make_file_private(path)  # every payer and payee: the exporter's user's alone
        except (OSError, duckdb.Error) as error:
            raise StoreError(_unopenable_message(path, error)) from error
        log.info("duckdb store opened", extra={"path": str(path), "new_file": not existed})
        store = cls(path, conn)
        store._config = config
        return store

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Insert ``records`` in one transaction, skipping keys already stored (idempotent).

        DuckDB refuses a batch as a whole, so nothing is rejected record by record.
        """
        if records:
            await asyncio.to_thread(self._write_sync, records)
        return []

    def _write_sync(self, records: list[StoreRecord]) -> None:
        with self._write_lock:
            self._check_open()
            self._reopen_if_invalidated()
            self._guarded(self._insert, records)

    def _insert(self, records: list[StoreRecord]) -> None:
        cur = self._writer
        cur.execute("BEGIN")
        try:
            if not _append_if_new(cur, records):
                # A key of the batch is stored already (a replay of delivered records):
                # undo the appends and write the batch through the anti-join instead.
                cur.execute("ROLLBACK")
                cur.execute("BEGIN")
                _insert_skipping_stored(cur, records)
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise

    async def write_analytics(self, rows: list[tuple[str, str, int, str, float]]) -> None:
        """Upsert computed analytics (name, window, time_ms, field, value); replaces on conflict."""
        if rows:
            await asyncio.to_thread(self._write_analytics_sync, rows)

    def _write_analytics_sync(self, rows: list[tuple[str, str, int, str, float]]) -> None:
        # One command may not update a row twice: the last value for a key wins.
        latest = {(n, w, t, f): v for n, w, t, f, v in rows}
        columns: list[list[Any]] = [[], [], [], [], []]
        for (n, w, t, f), v in latest.items():
            for column, value in zip(columns, (n, w, t, f, v), strict=True):
                column.append(value)
        with self._write_lock:
            self._check_open()
            self._reopen_if_invalidated()
            self._guarded(self._upsert_analytics, columns)

    def _upsert_analytics(self, columns: list[list[Any]]) -> None:
        cur = self._writer
        cur.execute("BEGIN")
        try:
            cur.execute(_ANALYTICS_UPSERT, columns)
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise

    def _guarded(self, write: Callable[[_A], None], argument: _A) -> None:
        """Run ``write(argument)``; a fatal DuckDB error marks the connection for reopening."""
        try:
            write(argument)
        except duckdb.FatalException as error:
            # e.g. a checkpoint that found the disk full: every later statement on this
            # database fails until it is opened again.
            self._invalidated = str(error)
            log.error(
                "duckdb invalidated the store; it is reopened on the next write",
                extra={"path": str(self.path), "error": str(error)},
            )
            raise StoreInvalidatedError(
                f"DuckDB store {self.path} was invalidated by a fatal error ({error}) and "
                f"is reopened on the next write; if the disk holding {self.path.parent} "
                "is full, free space there"
            ) from error

    def _reopen_if_invalidated(self) -> None:
        """Open the file again after DuckDB invalidated it; the caller holds the write lock."""
        if self._invalidated is None:
            return
        with self._conn_lock:
            for reader in list(self._readers):
                reader.interrupt()
            self._readers_done.wait_for(lambda: not self._readers, timeout=30)
            with contextlib.suppress(duckdb.Error):
                self._writer.close()
            with contextlib.suppress(duckdb.Error):
                self._conn.close()
            try:
                conn = _connect(self.path, True, self._config)
            except duckdb.Error as error:
                raise StoreInvalidatedError(
                    f"DuckDB store {self.path} cannot be reopened yet ({error}): the next "
                    f"write tries again; if the disk holding {self.path.parent} is full, "
                    "free space there"
                ) from error
            self._conn = conn
            self._writer = _writer_cursor(conn)
            log.warning(
                "duckdb store reopened",
                extra={"path": str(self.path), "after": self._invalidated},
            )
            self._invalidated = None

    def query(self, sql: str, params: list[object] | None = None) -> list[tuple[object, ...]]:
        """Run read-only SQL on a private cursor (thread-safe) and return all rows."""
        if self._invalidated is not None:
            with self._write_lock:
                self._check_open()
                self._reopen_if_invalidated()
        with self._conn_lock:
            self._check_open()
            cur = self._conn.cursor()
            self._readers.add(cur)
        try:
            rows: list[tuple[object, ...]] = cur.execute(sql, params).fetchall()
        finally:
            with self._conn_lock:
                self._readers.discard(cur)
                cur.close()
                self._readers_done.notify_all()
        return rows

    async def aquery(
        self, sql: str, params: list[object] | None = None
    ) -> list[tuple[object, ...]]:
        """:meth:`query` in a worker thread, so analytics never block the event loop."""
        return await asyncio.to_thread(self.query, sql, params)

    def counts(self) -> dict[str, int]:
        """Rows per table, for tests and readiness reporting."""
        sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM \"{t}\"" for t in TABLES)
        return {str(name): cast(int, n) for name, n in self.query(sql)}

    async def close(self) -> None:
        """Wait for any write in flight, checkpoint and release the file lock."""
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._write_lock, self._conn_lock:
            if self._closed:
                return
            self._closed = True
            # Queries still running on their cursors are interrupted and waited for:
            # the connection cannot close under them.
            for reader in list(self._readers):
                reader.interrupt()
            self._readers_done.wait_for(lambda: not self._readers, timeout=30)
            self._writer.close()
            self._conn.close()
        log.info("duckdb store closed", extra={"path": str(self.path)})

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"DuckDB store {self.path} is closed")
