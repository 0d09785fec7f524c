"""Reading what is left of a damaged ledger: rows through SQLite where its b-tree still
leads to them, and ``events`` rows found by parsing the file's pages (and its WAL's
committed frames) directly where it does not.

The page parser reads the ``events`` table in SQLite's record format; its column layout
is taken from the ledger's own schema, so there is one definition of that table.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import (
    SQLITE_HEADER_BYTES,
    WAL_HEADER_BYTES,
    header_page_size,
    is_valid_page_size,
    read_only_uri,
)
from .model import DeadLetter
from .schema import EVENTS_BODY_COLUMN, EVENTS_COLUMNS


def _probe(conn: sqlite3.Connection, table: str, key: str, at: int) -> int | None:
    """The first row id of ``table`` at or after ``at`` (None: there is none).

    Reads only the table's b-tree, not the rows' columns; raises where that is damaged.
    """
    row = conn.execute(
        f"SELECT {key} FROM {table} WHERE {key} >= ? ORDER BY {key} LIMIT 1", (at,)
    ).fetchone()
    return None if row is None else int(row[0])


def _past_damage(
    conn: sqlite3.Connection, table: str, key: str, after: int
) -> tuple[int | None, int]:
    """Where reading can resume after a damaged stretch that follows ``after``.

    Returns (the first row id that can be found past it, or None when nothing can; the
    last row id given up). Probes ``after`` + 1, 2, 4, ... and then bisects the last
    step, so a damaged stretch costs a few dozen queries.
    """
    failed, step = after + 1, 1
    while True:
        at = after + step
        try:
            found = _probe(conn, table, key, at)
            break
        except sqlite3.DatabaseError:
            failed = at
            if step >= 2**61:
                return None, 2**62
            step *= 2
    low, high = failed, at  # the probe fails at ``low`` and succeeds at ``high``
    while high - low > 1:
        middle = (low + high) // 2
        try:
            result = _probe(conn, table, key, middle)
        except sqlite3.DatabaseError:
            low = middle
            continue
        high, found = middle, result
    return found, low


def read_rows(
    conn: sqlite3.Connection,
    table: str,
    key: str,
    columns: str,
    unreadable: list[tuple[int, int]],
) -> Iterator[tuple[Any, ...]]:
    """(row id, *columns) of every row of ``table`` of a damaged ledger that can be read.

    Rows come in row id order; where a page is damaged the ids on it are recorded in
    ``unreadable`` and reading resumes after them.
    """
    after = 0
    while True:
        try:
            rows = conn.execute(
                f"SELECT {key}, {columns} FROM {table} WHERE {key} > ? ORDER BY {key}", (after,)
            )
            for row in rows:
                after = max(after, int(row[0]))
                yield tuple(row)
            return
        except sqlite3.DatabaseError:
            pass
        # The row after ``after`` (or the page leading to it) cannot be read; or that row
        # can, and was lost with the damage after it: the cursor steps to the next row
        # before it hands one over, and a step that fails drops the row it holds.
        try:
            first = _probe(conn, table, key, after + 1)
        except sqlite3.DatabaseError:
            found, given_up = _past_damage(conn, table, key, after)
            unreadable.append((after + 1, given_up))
            if found is None:
                return
            after = max(found - 1, given_up)
            continue
        if first is None:
            return
        try:
            row = conn.execute(
                f"SELECT {key}, {columns} FROM {table} WHERE {key} = ?", (first,)
            ).fetchone()
        except sqlite3.DatabaseError:
            unreadable.append((first, first))  # its columns are unreadable
        else:
            yield tuple(row)
        after = first


def open_damaged(path: Path) -> sqlite3.Connection:
    """A read-only connection to the damaged ledger at ``path``.

    Read-only, SQLite still reads the WAL beside it but never checkpoints it into the
    file nor deletes it: the damaged file and its WAL stay as they were.
    """
    return sqlite3.connect(read_only_uri(path), uri=True, check_same_thread=False)


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """An SQLite varint at ``at``: (value, offset after it)."""
    value = 0
    for k in range(8):
        byte = buf[at + k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + k + 1
    return (value << 8) | buf[at + 8], at + 9


def _event_body(payload: bytes) -> bytes | None:
    """The ``body`` of an ``events`` row in SQLite record format, or None if it is not one."""
    header_end, at = _varint(payload, 0)
    types: list[int] = []
    while at < header_end:
        serial, at = _varint(payload, at)
        types.append(serial)
    column_count, body_column = len(EVENTS_COLUMNS), EVENTS_BODY_COLUMN
    if len(types) != column_count or types[body_column] < 12 or types[body_column] % 2:
        return None
    sizes = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 7: 8, 8: 0, 9: 0}
    offset = header_end
    for serial in types[:body_column]:
        offset += sizes[serial] if serial < 12 else (serial - 12 - serial % 2) // 2
    length = (types[body_column] - 12) // 2
    body = payload[offset : offset + length]
    return body if len(body) == length else None


def _leaf_rows(page: bytes, header_at: int) -> Iterator[tuple[int, bytes]]:
    """(rowid, body) of each ``events`` row on a table b-tree leaf page."""
    if page[header_at] != 0x0D:
        return
    cells = int.from_bytes(page[header_at + 3 : header_at + 5], "big")
    max_local = len(page) - 35  # larger payloads continue on overflow pages: skipped
    for cell in range(cells):
        at = header_at + 8 + 2 * cell
        try:
            pointer = int.from_bytes(page[at : at + 2], "big")
            size, at = _varint(page, pointer)
            rowid, at = _varint(page, at)
            if size > max_local or at + size > len(page):
                continue
            body = _event_body(page[at : at + size])
        except (IndexError, KeyError):
            continue
        if body is not None:
            yield rowid, body


_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian, big-endian
_WAL_FRAME_HEADER = 24


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes) continuing from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for k in range(0, len(words), 2):
        s0 = (s0 + words[k] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[k + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _committed_wal_pages(wal: Path, page_size: int) -> list[bytes]:
    """The pages of the WAL's committed transactions, in the order they were written.

    Only frames that a reader of the WAL would use count: those carrying the header's
    salts with a valid running checksum, up to the last commit frame. Frames of a
    transaction that never committed (its request was refused) and those of earlier
    WAL generations (a rewound WAL keeps their bytes past its new end) are left out.
    """
    with open(wal, "rb") as handle:
        data = handle.read()
    if len(data) < WAL_HEADER_BYTES:
        return []
    magic, _, wal_page_size = struct.unpack(">III", data[:12])
    if magic not in _WAL_MAGIC or wal_page_size != page_size:
        return []
    big_endian = magic == _WAL_MAGIC[1]
    salts = data[16:24]
    sums = _wal_checksum(data[:24], big_endian, 0, 0)
    if sums != struct.unpack(">II", data[24:32]):
        return []
    pages: list[bytes] = []
    committed = 0
    at = WAL_HEADER_BYTES
    stride = _WAL_FRAME_HEADER + page_size
    while at + stride <= len(data):
        header = data[at : at + _WAL_FRAME_HEADER]
        page = data[at + _WAL_FRAME_HEADER : at + stride]
        if header[8:16] != salts:
            break
        sums = _wal_checksum(header[:8] + page, big_endian, *sums)
        if sums != struct.unpack(">II", header[16:24]):
            break
        pages.append(page)
        if int.from_bytes(header[4:8], "big"):  # a commit frame: the database size
            committed = len(pages)
        at += stride
    return pages[:committed]


def scan_pages(path: Path) -> Iterator[tuple[int, bytes]]:
    """(rowid, body) of ``events`` rows found by reading the file and its WAL page by page.

    SQLite reaches a row only through the b-tree pages above it; when those are lost (a
    truncated file loses the pages allocated last, often the upper levels) the leaves
    may still be there. Rows may repeat (older copies of a page): the new ledger
    deduplicates them by key. Of the WAL only committed transactions are read.
    """
    with open(path, "rb") as handle:
        header = handle.read(SQLITE_HEADER_BYTES)
    page_size = header_page_size(header) if len(header) == SQLITE_HEADER_BYTES else 0
    if not is_valid_page_size(page_size):
        page_size = 4096  # the header is lost: SQLite's default
    with open(path, "rb") as handle:
        number = 0
        while len(page := handle.read(page_size)) == page_size:
            number += 1
            yield from _leaf_rows(page, SQLITE_HEADER_BYTES if number == 1 else 0)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        for page in _committed_wal_pages(wal, page_size):
            yield from _leaf_rows(page, 0)


def dead_letter_from_row(row: tuple[Any, ...]) -> DeadLetter | None:
    """A dead letter from a (id, received_at, reason, error, key, raw[, raw_size]) row, if
    sound."""
    _, received_at, reason, error, key, raw, *rest = row
    raw_size = rest[0] if rest else None
    if not (
        isinstance(received_at, int)
        and isinstance(reason, str)
        and isinstance(error, str)
        and (key is None or isinstance(key, str))
        and isinstance(raw, bytes)
        and (raw_size is None or isinstance(raw_size, int))
    ):
        return None
    return DeadLetter(reason, error, raw, key, received_at, raw_size)

