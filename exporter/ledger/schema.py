"""The ledger file's layout: its tables, schema version and the upgrades between versions.

The ``events`` table's columns are named here once (:data:`EVENTS_COLUMNS`), for the
writer and for whatever reads a damaged file page by page.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import zlib
from hashlib import blake2b
from pathlib import Path

from ..errors import LedgerError
from ..records import upgrade_schema_2_record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
"""The schema this exporter writes; older files are upgraded when the ledger opens."""

EVENTS_TABLE = "events"
EVENTS_LAYOUT: tuple[tuple[str, str], ...] = (
    ("seq", "INTEGER PRIMARY KEY"),
    ("key", "TEXT NOT NULL"),
    ("key_hash", "INTEGER NOT NULL"),
    ("type", "TEXT NOT NULL"),
    ("ref", "TEXT"),
    ("ts", "INTEGER NOT NULL"),
    ("received_at", "INTEGER NOT NULL"),
    ("body", "BLOB NOT NULL"),
    ("state", "INTEGER NOT NULL"),
)
"""The ``events`` table's columns in their stored order, with their SQL types.

Every accepted event is a row, once, in commit order; ``body`` is its canonical JSON.
A reader of a damaged file's pages finds a row's body by this order.
"""
EVENTS_COLUMNS = tuple(name for name, _ in EVENTS_LAYOUT)
"""The names of the ``events`` columns, in their stored order."""
EVENTS_BODY_COLUMN = EVENTS_COLUMNS.index("body")
"""The position of ``body`` among the ``events`` columns."""
EVENTS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (\n"
    + ",\n".join(f"    {name} {sql_type}" for name, sql_type in EVENTS_LAYOUT)
    + "\n);\n"
)
WAITING, EMITTED = 0, 1
"""``events.state``: waiting for its join partner, or its store records are written."""
EventRow = tuple[int, str, int, str, str | None, int, int, bytearray, int]
"""A row of ``events``, in :data:`EVENTS_COLUMNS` order.

The body is a ``bytearray``: the sqlite3 module binds one as a BLOB directly, while for
``bytes`` it first looks for an adapter, and failing to find one costs it more than binding
the row's other eight values together (a formatted AttributeError, on the ledger writer).
"""

DEAD_LETTER_COLUMNS = ("id", "received_at", "reason", "error", "key", "raw", "raw_size")
"""The ``dead_letters`` table's columns, in their stored order. ``raw_size`` is the size of
the body as received when ``raw`` keeps only its head (NULL: ``raw`` is whole)."""
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
# startup). Every LedgerTuning.key_merge_events events they move here, in hash order,
# one key_merge_parts-th of the hash range per commit. A random hash inserted per event
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
# LedgerTuning.outbox_row_records records) holds the records numbered seq to last_seq and the lowest
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
# The sub-millisecond offset each store record's point took in its series (InfluxDB
# merges points of equal series and timestamp), so that the next record of the same
# series and millisecond whose key hashes to a taken offset probes on to a free one
# (docs/architecture.md section 6). ``series`` is a 64-bit hash of the measurement and tag
# values (two series sharing a hash only probe more), ``key_hash`` that of the event key,
# so that a record emitted again finds its own offset. Keyed by time first: rows are
# appended at the end as time goes on, and retention cuts a range off the front.
POINT_TIMES_DDL = """
CREATE TABLE IF NOT EXISTS point_times (
    time_ms INTEGER NOT NULL,
    series INTEGER NOT NULL,
    offset_ns INTEGER NOT NULL,
    key_hash INTEGER NOT NULL,
    PRIMARY KEY (time_ms, series, offset_ns)
) WITHOUT ROWID;
"""
DELIVERED_UPTO = "outbox_delivered_upto"
"""The meta key of the last outbox seq delivered, before each sink had its own cursor: a
sink that has none yet starts from it (the ledger then fed one store)."""


def delivered_upto_key(sink: str) -> str:
    """The meta key of the last outbox seq delivered to ``sink``."""
    return f"{DELIVERED_UPTO}:{sink}"


RECENT_KEYS_DDL = """
CREATE TEMP TABLE IF NOT EXISTS recent_keys (
    key_hash INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (key_hash, seq)
) WITHOUT ROWID;
"""
# Payments whose settle the facilitator answered as not final (``settlement_pending``),
# since when: past the settlement deadline each ends as failed (settlement_timeout). A
# table of its own, created by every version that knows it (CREATE ... IF NOT EXISTS),
# so it needs no schema step; rows go when their payment ends or the deadline passes.
_PENDING_SETTLEMENTS_DDL = """
CREATE TABLE IF NOT EXISTS pending_settlements (
    payment_id TEXT PRIMARY KEY,
    since INTEGER NOT NULL
) WITHOUT ROWID;
"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
    + EVENTS_DDL
    + """CREATE INDEX IF NOT EXISTS events_waiting ON events (ref, seq) WHERE state = 0;
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
    raw BLOB NOT NULL,
    raw_size INTEGER
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
    + _PENDING_SETTLEMENTS_DDL
    + POINT_TIMES_DDL
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
# Schema 3 chose no offsets: its outbox rows' records have none and render with the hash
# offset they were always written with (exporter.records.point_time_ns); offsets taken
# by records emitted before the upgrade are not known to the new table.
_MIGRATE_3_TO_4 = (
    "BEGIN IMMEDIATE;\n"
    + POINT_TIMES_DDL
    + """UPDATE meta SET value = '4' WHERE key = 'schema';
COMMIT;
"""
)
# Each upgrade, by the schema it starts from: its script (one transaction) and what it
# copies, for the message when it fails.
UPGRADES: dict[int, tuple[str, str]] = {
    1: (_MIGRATE_1_TO_2, "the payments table and the dedup key index"),
    2: (_MIGRATE_2_TO_3, "the outbox"),
    3: (_MIGRATE_3_TO_4, "nothing (it adds the point_times table)"),
}


def key_hash(key: str) -> int:
    """The 64-bit hash of a dedup key that ``events.key_hash`` and the key index hold."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def payment_id_hash(payment_id: str) -> int:
    """A 32-bit hash of a payment id, signed so that SQLite stores it in 4 bytes."""
    return zlib.crc32(payment_id.encode()) - 0x8000_0000


def prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new ledger file, or upgrade an older one to this schema.

    Raises :class:`LedgerError` for a schema this exporter cannot read or an upgrade
    that failed; SQLite errors of reading the file pass through.
    """
    version = stored_schema_version(conn)
    if version is not None and version != SCHEMA_VERSION:
        if version not in UPGRADES:
            raise LedgerError(
                f"ledger file {path} has schema {version}, this exporter reads {SCHEMA_VERSION}"
            )
        for step in range(version, SCHEMA_VERSION):
            _upgrade_from(conn, path, step)
    conn.executescript(SCHEMA)
    _add_dead_letter_raw_size(conn)
    if version is None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema', ?), ('key_index_upto', '0')",
            (str(SCHEMA_VERSION),),
        )


def _add_dead_letter_raw_size(conn: sqlite3.Connection) -> None:
    """Give a file written before dead letters were truncated its ``raw_size`` column.

    A nullable column added last reads as NULL (kept whole) in every older row, so files
    of the same schema version with and without it stay readable by either exporter.
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
    if "raw_size" not in columns:
        conn.execute("ALTER TABLE dead_letters ADD COLUMN raw_size INTEGER")


def stored_schema_version(conn: sqlite3.Connection) -> int | None:
    """The file's schema version; None for a new file."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return None if row is None else int(row[0])


def _upgrade_from(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Upgrade the file from schema ``version`` to the next one.

    One transaction: a failure (disk full) leaves the file at schema ``version``.
    """
    script, copies = UPGRADES[version]
    started = time.monotonic()
    conn.create_function("payment_id_hash", 1, payment_id_hash, deterministic=True)
    conn.create_function("upgrade_schema_2_record", 1, upgrade_schema_2_record, deterministic=True)
    try:
        conn.executescript(script)
    except sqlite3.Error as error:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise LedgerError(
            f"ledger file {path} could not be upgraded from schema {version} to "
            f"{version + 1} ({error}); it is left at schema {version}. The upgrade "
            f"copies {copies}: free that much disk space and restart"
        ) from error
    log.info(
        "ledger schema upgraded",
        extra={
            "path": str(path),
            "from_schema": version,
            "to_schema": version + 1,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
