"""The hooks' durable spool: one SQLite file the facilitator process owns.

A hook appends one row per verify or settle answer and returns; the sender turns rows
into events and delivers them. What a hook returned from survives ``kill -9``: the file
is in WAL mode and each append is its own transaction, committed (written into the WAL
with ``write()``) before the hook returns. ``synchronous=NORMAL`` leaves the WAL's
``fsync`` to checkpoints: a killed process loses nothing the kernel already holds, and
only a power cut or kernel crash can lose the last appends; ``FULL`` would add an
``fsync`` (milliseconds) to every payment for that case alone, which the hooks must not
put in the payment's way. The file is opened in exclusive locking mode, so one process
owns a spool directory at a time (a second one is refused) and appends skip the shared
memory index.

Tables: ``exchanges`` (answers not yet turned into events), ``events`` (NDJSON lines not
yet delivered), ``stages`` (which events each payment already yielded, so a restarted
process derives each event once) and ``dead_letters`` (events the exporter refused).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpoolError

SPOOL_FILE = "spool.sqlite"
"""The spool's file name inside the spool directory."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    seq INTEGER PRIMARY KEY,
    endpoint TEXT NOT NULL,
    request BLOB NOT NULL,
    answer BLOB NOT NULL,
    latency_ms REAL NOT NULL,
    received_ms INTEGER NOT NULL,
    answered_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    since_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    payment_id TEXT PRIMARY KEY,
    done INTEGER NOT NULL,
    touched INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stages_touched ON stages (touched);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    status INTEGER NOT NULL,
    error TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
"""
_APPEND = (
    "INSERT INTO exchanges (endpoint, request, answer, latency_ms, received_ms, answered_ms)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class SpooledExchange:
    """One verify or settle answer as a hook spooled it."""

    seq: int
    endpoint: str
    request: bytes
    answer: bytes
    latency_ms: float
    received_ms: int
    answered_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the exporter refused, with its answer's status and error."""

    seq: int
    body: bytes
    status: int
    error: str
    at_ms: int


class Spool:
    """The spool file, shared by the hooks (appends) and the sender (everything else).

    One connection behind one lock: the hooks of a synchronous facilitator may run on
    many threads, and the sender runs on its own.
    """

    def __init__(self, directory: Path, max_bytes: int, remembered: int = 100_000) -> None:
        """Open (or create) the spool in ``directory``; :class:`SpoolError` when it cannot."""
        if max_bytes <= 0:
            raise SpoolError(f"spool_max_bytes must be > 0, got {max_bytes}")
        self.path = directory / SPOOL_FILE
        self.max_bytes = max_bytes
        self.remembered = remembered
        self.lock = threading.Lock()
        self._db = _open(directory, self.path)
        self.used_bytes = self._measure()

    def append(
        self,
        endpoint: str,
        request: bytes,
        answer: bytes,
        latency_ms: float,
        received_ms: int,
        answered_ms: int,
    ) -> bool:
        """Append one answer, committed when this returns; False when the bound is reached."""
        size = len(request) + len(answer)
        with self.lock:
            if self.used_bytes + size > self.max_bytes:
                return False
            self._db.execute(
                _APPEND, (endpoint, request, answer, latency_ms, received_ms, answered_ms)
            )
            self.used_bytes += size
        return True

    def exchanges(self, limit: int) -> list[SpooledExchange]:
        """The oldest ``limit`` answers not yet turned into events, oldest first."""
        with self.lock:
            rows = self._db.execute(
                "SELECT seq, endpoint, request, answer, latency_ms, received_ms, answered_ms"
                " FROM exchanges ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [SpooledExchange(*row) for row in rows]

    def stages(self, payment_ids: Iterable[str]) -> dict[str, int]:
        """The recorded stage flags of each of ``payment_ids`` that has any."""
        found: dict[str, int] = {}
        with self.lock:
            for pid in payment_ids:
                row = self._db.execute(
                    "SELECT done FROM stages WHERE payment_id = ?", (pid,)
                ).fetchone()
                if row is not None:
                    found[pid] = row[0]
        return found

    def derived(
        self, upto_seq: int, events: Sequence[tuple[bytes, int]], stages: dict[str, int]
    ) -> None:
        """In one transaction: answers up to ``upto_seq`` become ``events`` (body, since_ms),
        and ``stages`` records what each payment yielded."""
        with self.lock:
            db = self._db
            freed = db.execute(
                "SELECT COALESCE(SUM(LENGTH(request) + LENGTH(answer)), 0) FROM exchanges"
                " WHERE seq <= ?",
                (upto_seq,),
            ).fetchone()[0]
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM exchanges WHERE seq <= ?", (upto_seq,))
                db.executemany("INSERT INTO events (body, since_ms) VALUES (?, ?)", events)
                db.executemany(
                    "INSERT INTO stages (payment_id, done, touched) VALUES (?, ?, ?)"
                    " ON CONFLICT (payment_id) DO UPDATE SET done = excluded.done,"
                    " touched = excluded.touched",
                    [(pid, done, upto_seq) for pid, done in stages.items()],
                )
                db.execute(
                    "DELETE FROM stages WHERE touched < (SELECT touched FROM stages"
                    " ORDER BY touched DESC LIMIT 1 OFFSET ?)",
                    (self.remembered,),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.used_bytes += sum(len(body) for body, _ in events) - freed

    def next_events(self, max_events: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """The oldest undelivered events, at most ``max_events`` and about ``max_bytes``
        (always at least one when any waits)."""
        with self.lock:
            rows = self._db.execute(
                "SELECT seq, body FROM events ORDER BY seq LIMIT ?", (max_events,)
            ).fetchall()
        batch: list[tuple[int, bytes]] = []
        size = 0
        for seq, body in rows:
            if batch and size + len(body) + 1 > max_bytes:
                break
            batch.append((seq, body))
            size += len(body) + 1
        return batch

    def settle(self, delivered: Sequence[int], dead: Sequence[DeadLetter]) -> None:
        """Remove delivered events and move refused ones to ``dead_letters``, atomically."""
        with self.lock:
            db = self._db
            seqs = [(seq,) for seq in delivered] + [(d.seq,) for d in dead]
            freed = 0
            for (seq,) in seqs:
                row = db.execute("SELECT LENGTH(body) FROM events WHERE seq = ?", (seq,)).fetchone()
                freed += row[0] if row else 0
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM events WHERE seq = ?", seqs)
                db.executemany(
                    "INSERT INTO dead_letters (body, status, error, at_ms) VALUES (?, ?, ?, ?)",
                    [(d.body, d.status, d.error, d.at_ms) for d in dead],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.used_bytes += sum(len(d.body) + len(d.error) for d in dead) - freed

    def checkpoint(self) -> None:
        """Copy the WAL into the file (PASSIVE), so that it does not grow; the sender calls
        it between rounds, so that no append pays for it."""
        with self.lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def oldest_ms(self) -> int | None:
        """When the oldest undelivered answer or event was answered; None when none waits."""
        with self.lock:
            row = self._db.execute(
                "SELECT MIN(t) FROM (SELECT answered_ms AS t FROM exchanges WHERE seq ="
                " (SELECT MIN(seq) FROM exchanges) UNION ALL SELECT since_ms FROM events"
                " WHERE seq = (SELECT MIN(seq) FROM events))"
            ).fetchone()
        return row[0] if row else None

    def undelivered(self) -> int:
        """Answers and events still to deliver."""
        with self.lock:
            (exchanges,) = self._db.execute("SELECT COUNT(*) FROM exchanges").fetchone()
            (events,) = self._db.execute("SELECT COUNT(*) FROM events").fetchone()
        return int(exchanges) + int(events)

    def dead_letters(self) -> list[DeadLetter]:
        """Every event the exporter refused, oldest first."""
        with self.lock:
            rows = self._db.execute(
                "SELECT seq, body, status, error, at_ms FROM dead_letters ORDER BY seq"
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def close(self) -> None:
        """Checkpoint the WAL into the file and close it (the lock goes with it)."""
        with self.lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()

    def _measure(self) -> int:
        with self.lock:
            row = self._db.execute(
                "SELECT (SELECT COALESCE(SUM(LENGTH(request) + LENGTH(answer)), 0)"
                " FROM exchanges) + (SELECT COALESCE(SUM(LENGTH(body)), 0) FROM events)"
                " + (SELECT COALESCE(SUM(LENGTH(body) + LENGTH(error)), 0) FROM dead_letters)"
            ).fetchone()
        return int(row[0])


def read_dead_letters(directory: Path) -> list[DeadLetter]:
    """The dead letters of the spool in ``directory`` (no process may hold it)."""
    spool = Spool(directory, max_bytes=1)
    try:
        return spool.dead_letters()
    finally:
        spool.close()


def _open(directory: Path, path: Path) -> sqlite3.Connection:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as error:
        raise SpoolError(
            f"cannot create the hooks' spool {path}: {error.strerror or error}; give the "
            "facilitator a writable spool_dir"
        ) from error
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    except sqlite3.Error as error:
        raise SpoolError(f"cannot open the hooks' spool {path}: {error}") from error
    try:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # the sender checkpoints, not an append
        db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now: one owner per spool
        db.execute("COMMIT")
        db.executescript(_SCHEMA)
    except sqlite3.OperationalError as error:
        db.close()
        if "locked" in str(error):
            raise SpoolError(
                f"the hooks' spool {path} is held by another process; give each facilitator "
                "process its own spool_dir"
            ) from error
        raise SpoolError(f"cannot use the hooks' spool {path}: {error}") from error
    except sqlite3.DatabaseError as error:
        db.close()
        raise SpoolError(
            f"the hooks' spool {path} is not a readable SQLite file ({error}); move it aside "
            "and restart to start an empty spool"
        ) from error
    return db
