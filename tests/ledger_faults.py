"""Faults of a real ledger file for tests, made without patching the ledger."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def refusing_inserts(path: Path, table: str) -> Iterator[None]:
    """Every insert into ``table`` of the ledger at ``path`` fails while inside, with
    SQLite's full-disk message: a ledger that cannot write, as on a full disk."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    try:
        yield
    finally:
        conn.execute(f"DROP TRIGGER refuse_{table}")
        conn.close()


@contextlib.contextmanager
def ending_transactions_on_insert(path: Path, table: str) -> Iterator[None]:
    """Every insert into ``table`` fails while inside, and SQLite itself ends the writer's
    transaction (as it does on some I/O and out-of-memory errors): the writer's own
    ROLLBACK then finds no transaction to end."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        f"CREATE TRIGGER end_{table} BEFORE INSERT ON {table} "
        "BEGIN SELECT RAISE(ROLLBACK, 'disk I/O error'); END"
    )
    try:
        yield
    finally:
        conn.execute(f"DROP TRIGGER end_{table}")
        conn.close()
