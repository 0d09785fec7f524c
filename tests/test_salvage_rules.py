"""What the salvage of a damaged ledger reads: every ``events`` row the pages still hold,
only committed WAL transactions, the exact ids a damaged page cost, and sound dead letters.

The page parser is checked against SQLite's own reading of the intact file: each row it
finds must be the very (seq, body) SQLite stores.
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_MS, received
from ledger_helpers import prepare

from exporter.ledger import DeadLetter, Ledger, LedgerTuning, Submission
from exporter.ledger.salvage import dead_letter_from_row, open_damaged, read_rows, scan_pages

EVENTS = 1200
FIRST_SEQ = 16_380
"""Where the rows start, as retention leaves a long-lived ledger: past 16,383 a rowid
takes three varint bytes, one of them 0x80."""


def _ledger(path: Path, events: int = EVENTS, tuning: LedgerTuning | None = None) -> Ledger:
    ledger = Ledger(path, tuning=tuning)
    ledger.commit(
        [
            Submission(
                [prepare(received(f"pay-{n}", BASE_MS + n)) for n in range(events)],
                [DeadLetter("malformed", "not JSON", b"{nope", None, BASE_MS)],
            )
        ]
    )
    return ledger


def _stored(path: Path) -> dict[int, bytes]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {int(seq): bytes(body) for seq, body in conn.execute("SELECT seq, body FROM events")}


@pytest.fixture
def closed_ledger(tmp_path: Path) -> Path:
    """A closed ledger of ``EVENTS`` events numbered from ``FIRST_SEQ``."""
    path = tmp_path / "ledger.sqlite3"
    _ledger(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE events SET seq = seq + ?", (FIRST_SEQ - 1,))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def _leaves(path: Path) -> list[int]:
    """The page numbers of the ``events`` table's leaves, in key order."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return [
            int(page)
            for (page,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' "
                "ORDER BY path"
            )
        ]


def _overwrite_page(path: Path, page: int) -> None:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    with open(path, "r+b") as handle:
        handle.seek((page - 1) * size)
        handle.write(b"\xa5" * size)


def test_the_page_scan_finds_every_row_sqlite_stores(closed_ledger: Path) -> None:
    stored = _stored(closed_ledger)
    assert len(stored) == EVENTS and min(stored) == FIRST_SEQ
    assert dict(scan_pages(closed_ledger)) == stored


def test_the_page_scan_reads_a_file_whose_header_is_lost(closed_ledger: Path) -> None:
    stored = _stored(closed_ledger)
    with open(closed_ledger, "r+b") as handle:
        handle.write(b"\0" * 100)  # the page size is gone with it: SQLite's default is taken
    assert dict(scan_pages(closed_ledger)) == stored


@pytest.mark.parametrize(("page_size", "events"), [(1024, 300), (8192, 300), (65536, 600)])
def test_the_page_scan_reads_pages_of_the_size_the_header_names(
    tmp_path: Path, page_size: int, events: int
) -> None:
    path = tmp_path / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("VACUUM")
    _ledger(path, events).close()
    assert dict(scan_pages(path)) == _stored(path)


def test_the_page_scan_reads_integers_of_every_size_sqlite_stores(tmp_path: Path) -> None:
    # SQLite stores an integer in 0 to 8 bytes by its value; a key hash is any 64-bit
    # value, so a row's columns before its body may take any of those sizes.
    # With 64 KiB pages a leaf of such small rows holds more than 255 of them: the cell
    # count takes both of its bytes.
    path = tmp_path / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA page_size=65536")
        conn.execute("VACUUM")
    Ledger(path).close()
    hashes = [0, 1, -100, 30_000, -(2**20), 2**30, 2**40] + [2**60] * 600
    rows = {
        seq: (f"k{seq}", key_hash, f'{{"n":{seq}}}'.encode())
        for seq, key_hash in enumerate(hashes, start=1)
    }
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO events (seq, key, key_hash, type, ref, ts, received_at, body, state)"
            " VALUES (?, ?, ?, 'payment:received', NULL, ?, ?, ?, 1)",
            [(seq, key, h, BASE_MS, BASE_MS, body) for seq, (key, h, body) in rows.items()],
        )
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert dict(scan_pages(path)) == {seq: body for seq, (_, _, body) in rows.items()}


def _wal_frames(wal: bytes, page_size: int) -> list[int]:
    """The byte offset of each frame of a WAL."""
    return list(range(32, len(wal) - page_size - 23, 24 + page_size))


def test_the_page_scan_reads_the_wal_up_to_the_first_frame_that_does_not_check(
    tmp_path: Path,
) -> None:
    # Two committed transactions in the WAL; a frame of the second one is damaged: the
    # first is read, the second (whose checksum chain breaks) is not.
    live = tmp_path / "ledger.sqlite3"
    slow = LedgerTuning(checkpoint_interval_seconds=3600.0)
    ledger = _ledger(live, 50, slow)
    try:
        wal_path = live.with_name(live.name + "-wal")
        first_end = wal_path.stat().st_size
        _commit_late(ledger, 50)
        wal = bytearray(wal_path.read_bytes())
        page_size = int.from_bytes(live.read_bytes()[16:18], "big")
        frames = _wal_frames(bytes(wal), page_size)
        assert frames[-1] > first_end
        damaged_frame = [at for at in frames if at >= first_end][0]
        wal[damaged_frame + 24 + 200] ^= 0xFF
        crashed = _crash_copy(live, tmp_path, bytes(wal))
    finally:
        ledger.close()
    bodies = [body for _, body in scan_pages(crashed)]
    assert sum(b'"pay-' in body for body in set(bodies)) == 50
    assert not any(b'"late-' in body for body in bodies)


def _commit_late(ledger: Ledger, count: int) -> None:
    """Commit the receipts of payments ``late-0`` to ``late-{count - 1}`` in one transaction."""
    ledger.commit(
        [Submission([prepare(received(f"late-{n}", BASE_MS + n)) for n in range(count)])]
    )


def _crash_copy(live: Path, tmp_path: Path, wal: bytes) -> Path:
    """The ledger file as it is now beside ``wal``, in a directory of its own."""
    crashed = tmp_path / "crashed" / "ledger.sqlite3"
    crashed.parent.mkdir()
    crashed.write_bytes(live.read_bytes())
    crashed.with_name(crashed.name + "-wal").write_bytes(wal)
    return crashed


def test_the_page_scan_leaves_out_a_last_transaction_without_its_commit_frame(
    tmp_path: Path,
) -> None:
    live = tmp_path / "ledger.sqlite3"
    ledger = _ledger(live, 50, LedgerTuning(checkpoint_interval_seconds=3600.0))
    try:
        _commit_late(ledger, 300)
        wal = live.with_name(live.name + "-wal").read_bytes()
        page_size = int.from_bytes(live.read_bytes()[16:18], "big")
        # A crash before the last frame of the second transaction was written.
        crashed = _crash_copy(live, tmp_path, wal[: len(wal) - 24 - page_size])
    finally:
        ledger.close()
    bodies = {body for _, body in scan_pages(crashed)}
    assert sum(b'"pay-' in body for body in bodies) == 50
    assert not any(b'"late-' in body for body in bodies)


def test_the_page_scan_stops_at_frames_left_by_an_earlier_wal(tmp_path: Path) -> None:
    # Once a checkpoint has copied the whole WAL, the next write starts it over from its
    # beginning with new salts; the older frames past the new ones stay in the file.
    live = tmp_path / "ledger.sqlite3"
    ledger = _ledger(live, 600, LedgerTuning(checkpoint_interval_seconds=3600.0))
    try:
        with contextlib.closing(sqlite3.connect(live)) as conn:
            assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
        wal_path = live.with_name(live.name + "-wal")
        before = wal_path.read_bytes()
        ledger.commit([Submission([prepare(received("late-0", BASE_MS))])])
        wal = wal_path.read_bytes()
        assert len(wal) == len(before) and wal[16:24] != before[16:24]
        crashed = _crash_copy(live, tmp_path, wal)
    finally:
        ledger.close()
    bodies = {body for _, body in scan_pages(crashed)}
    assert sum(b'"pay-' in body for body in bodies) == 600
    assert sum(b'"late-' in body for body in bodies) == 1


def _as_big_endian_wal(wal: bytes, page_size: int) -> bytes:
    """The same WAL as a big-endian machine writes it (magic and checksums)."""

    def checksum(data: bytes, s0: int, s1: int) -> tuple[int, int]:
        words = struct.unpack(f">{len(data) // 4}I", data)
        for k in range(0, len(words), 2):
            s0 = (s0 + words[k] + s1) & 0xFFFFFFFF
            s1 = (s1 + words[k + 1] + s0) & 0xFFFFFFFF
        return s0, s1

    out = bytearray(wal)
    out[0:4] = (0x377F0683).to_bytes(4, "big")
    sums = checksum(bytes(out[:24]), 0, 0)
    out[24:32] = struct.pack(">II", *sums)
    for at in _wal_frames(wal, page_size):
        sums = checksum(bytes(out[at : at + 8]) + bytes(out[at + 24 : at + 24 + page_size]), *sums)
        out[at + 16 : at + 24] = struct.pack(">II", *sums)
    return bytes(out)


def test_the_page_scan_reads_a_wal_written_with_big_endian_checksums(tmp_path: Path) -> None:
    live = tmp_path / "ledger.sqlite3"
    ledger = _ledger(live, 0, LedgerTuning(checkpoint_interval_seconds=3600.0))
    try:
        _commit_late(ledger, 50)
        wal = live.with_name(live.name + "-wal").read_bytes()
        page_size = int.from_bytes(live.read_bytes()[16:18], "big")
        crashed = _crash_copy(live, tmp_path, _as_big_endian_wal(wal, page_size))
    finally:
        ledger.close()
    bodies = {body for _, body in scan_pages(crashed)}
    assert sum(b'"late-' in body for body in bodies) == 50


def _read_all(path: Path, unreadable: list[tuple[int, int]]) -> list[int]:
    conn = open_damaged(path)
    try:
        return [int(row[0]) for row in read_rows(conn, "events", "seq", "body", unreadable)]
    finally:
        conn.close()


def _cells(path: Path, page: int) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        (cells,) = conn.execute("SELECT ncell FROM dbstat WHERE pageno = ?", (page,)).fetchone()
    return int(cells)


def _covered(ranges: list[tuple[int, int]], ids: set[int]) -> set[int]:
    return {i for i in ids if any(low <= i <= high for low, high in ranges)}


@pytest.mark.parametrize("which", ["first", "middle", "second-to-last"])
def test_reading_past_a_damaged_page_loses_exactly_its_rows_and_names_them(
    closed_ledger: Path, which: str
) -> None:
    stored = _stored(closed_ledger)
    leaves = _leaves(closed_ledger)
    assert len(leaves) >= 5
    leaf = {"first": leaves[0], "middle": leaves[len(leaves) // 2], "second-to-last": leaves[-2]}
    lost = _cells(closed_ledger, leaf[which])
    _overwrite_page(closed_ledger, leaf[which])
    unreadable: list[tuple[int, int]] = []
    read = _read_all(closed_ledger, unreadable)
    assert read == sorted(read) and len(read) == len(set(read))
    missing = sorted(set(stored) - set(read))
    assert len(missing) == lost and missing == list(range(missing[0], missing[-1] + 1))
    assert unreadable == sorted(unreadable)
    assert all(type(bound) is int for bounds in unreadable for bound in bounds)
    assert _covered(unreadable, set(stored)) == set(missing)


def test_reading_stops_at_a_damaged_last_page_and_names_what_follows(
    closed_ledger: Path,
) -> None:
    stored = _stored(closed_ledger)
    leaf = _leaves(closed_ledger)[-1]
    lost = _cells(closed_ledger, leaf)
    _overwrite_page(closed_ledger, leaf)
    unreadable: list[tuple[int, int]] = []
    read = _read_all(closed_ledger, unreadable)
    assert read == sorted(stored)[: len(stored) - lost]
    # Nothing can be found after it: every id from the first lost one on is given up.
    assert unreadable == [(read[-1] + 1, 2**62)]


def test_a_dead_letter_whose_raw_bytes_are_damaged_is_named_alone(tmp_path: Path) -> None:
    # Damage on a large body's overflow page: the b-tree still leads to the row, its
    # columns are lost; the dead letters on either side are read whole.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    try:
        letters = [
            DeadLetter("malformed", "not JSON", raw, None, BASE_MS + n)
            for n, raw in enumerate([b"{a", b"{" * 20000, b"{c"])
        ]
        ledger.commit([Submission([], letters)])
    finally:
        ledger.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (overflow,) = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'dead_letters' AND pagetype = 'overflow' "
            "ORDER BY pageno LIMIT 1"
        ).fetchone()
    _overwrite_page(path, int(overflow))
    unreadable: list[tuple[int, int]] = []
    conn = open_damaged(path)
    try:
        rows = list(read_rows(conn, "dead_letters", "id", "received_at, raw", unreadable))
    finally:
        conn.close()
    assert rows == [(1, BASE_MS, b"{a"), (3, BASE_MS + 2, b"{c")]
    assert unreadable == [(2, 2)]


SOUND: tuple[Any, ...] = (7, BASE_MS, "malformed", "not JSON", None, b"{nope")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (SOUND, DeadLetter("malformed", "not JSON", b"{nope", None, BASE_MS, None)),
        (
            (7, BASE_MS, "conflict", "differs", "k", b"{}", 9000),
            DeadLetter("conflict", "differs", b"{}", "k", BASE_MS, 9000),
        ),
        (SOUND + (None,), DeadLetter("malformed", "not JSON", b"{nope", None, BASE_MS, None)),
    ],
    ids=["without-raw-size", "with-raw-size", "raw-size-null"],
)
def test_a_sound_dead_letter_row_is_kept_whole(row: tuple[Any, ...], expected: DeadLetter) -> None:
    assert dead_letter_from_row(row) == expected


@pytest.mark.parametrize(
    "row",
    [
        (7, "soon", "malformed", "not JSON", None, b"{nope"),
        (7, BASE_MS, 3, "not JSON", None, b"{nope"),
        (7, BASE_MS, "malformed", b"not JSON", None, b"{nope"),
        (7, BASE_MS, "malformed", "not JSON", 5, b"{nope"),
        (7, BASE_MS, "malformed", "not JSON", None, "{nope"),
        (7, BASE_MS, "malformed", "not JSON", None, b"{nope", "big"),
    ],
    ids=["received-at", "reason", "error", "key", "raw", "raw-size"],
)
def test_a_dead_letter_row_with_a_damaged_column_is_not_salvaged(row: tuple[Any, ...]) -> None:
    assert dead_letter_from_row(row) is None


def _insert_events(path: Path, rows: dict[int, bytes]) -> None:
    """Rows of ``events`` as the ledger writes them, with the given seqs and bodies."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO events (seq, key, key_hash, type, ref, ts, received_at, body, state)"
            " VALUES (?, ?, ?, 'payment:received', NULL, ?, ?, ?, 1)",
            [(seq, f"k{seq}", 2**60, BASE_MS, BASE_MS, body) for seq, body in rows.items()],
        )
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_the_page_scan_reads_rows_up_to_the_largest_a_leaf_holds_whole(tmp_path: Path) -> None:
    # A 4 KiB page holds a row's record of up to 4,061 bytes itself; a larger one goes
    # on overflow pages and is skipped, and the rows after it on the leaf are still read.
    # With 49 bytes of columns besides the body, a body of 4,012 bytes is the largest.
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    largest, overflowing = b"x" * 4012, b"y" * 4013
    _insert_events(path, {1: b"{}", 2: largest, 3: overflowing, 4: b"[]"})
    with contextlib.closing(sqlite3.connect(path)) as conn:
        overflow = conn.execute(
            "SELECT count(*) FROM dbstat WHERE name = 'events' AND pagetype = 'overflow'"
        ).fetchone()
    assert overflow == (1,)
    assert dict(scan_pages(path)) == {1: b"{}", 2: largest, 4: b"[]"}


def test_the_page_scan_skips_a_damaged_cell_and_reads_the_rest_of_its_leaf(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    rows = {seq: f'{{"n":{seq}}}'.encode() for seq in range(1, 11)}
    _insert_events(path, rows)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'events'"
        ).fetchone()
    data = bytearray(path.read_bytes())
    page_at = (root - 1) * 4096
    assert data[page_at] == 0x0D  # the ten rows fit on one leaf
    cell = page_at + int.from_bytes(data[page_at + 8 : page_at + 10], "big")  # the first
    # The cell: payload size, rowid and record header size (one byte each here), then
    # the serial types; the third (key_hash) becomes 10, a type SQLite reserves.
    assert data[cell + 1] == 1
    data[cell + 3 + 2] = 10
    path.write_bytes(bytes(data))
    assert dict(scan_pages(path)) == {seq: body for seq, body in rows.items() if seq != 1}
