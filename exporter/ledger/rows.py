"""Multi-row INSERT statements: how the ledger's writer appends many rows in few steps."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import chain

# Rows per multi-row INSERT, largest first; a fixed ladder keeps the statements few
# enough for the connection's statement cache. Each cached statement holds memory in
# proportion to its parameters: a ladder from 512 rows held about 2.5 MB. The last
# fewer than INSERT_EXACT_BELOW rows go in one statement of their exact size, so that
# a small commit (single-event requests) writes each table in one statement.
INSERT_CHUNKS = (256, 64, 16)
INSERT_EXACT_BELOW = 16


@lru_cache(maxsize=128)
def _multi_row_sql(head: str, width: int, rows: int, tail: str) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([row] * rows)}{tail}"


def insert_rows(
    cur: sqlite3.Cursor, head: str, rows: Sequence[Sequence[object]], tail: str = ""
) -> None:
    """``head VALUES (...), (...) tail`` for ``rows``, up to 256 rows per statement.

    ``executemany`` steps SQLite once per row, and every step releases the GIL: while
    the event loop parses the next request, each release can keep this thread waiting
    for a whole switch interval (5 ms). One statement per chunk keeps the inserts a
    handful of steps that run without the GIL, beside the event loop. Chunks stay
    within the connection's limit on bound parameters (999 in SQLite before 3.32).
    """
    for start, end in row_chunks(cur, rows):
        insert_chunk(cur, head, rows[start:end], tail)


def row_chunks(cur: sqlite3.Cursor, rows: Sequence[Sequence[object]]) -> Iterator[tuple[int, int]]:
    """The (start, end) of each multi-row statement :func:`insert_rows` makes of ``rows``."""
    if not rows:
        return
    width, done = len(rows[0]), 0
    most = cur.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
    for size in INSERT_CHUNKS:
        if size > most:
            continue
        while len(rows) - done >= size:
            yield done, done + size
            done += size
    while done < len(rows):  # fewer than INSERT_EXACT_BELOW rows left (or than ``most``)
        end = min(len(rows), done + min(INSERT_EXACT_BELOW - 1, most))
        yield done, end
        done = end


def insert_chunk(
    cur: sqlite3.Cursor, head: str, rows: Sequence[Sequence[object]], tail: str
) -> None:
    """One multi-row ``head VALUES ... tail`` statement holding every row of ``rows``."""
    sql = _multi_row_sql(head, len(rows[0]), len(rows), tail)
    cur.execute(sql, list(chain.from_iterable(rows)))
