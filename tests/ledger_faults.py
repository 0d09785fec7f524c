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
