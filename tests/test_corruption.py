"""A ledger or store damaged while the exporter is stopped: found at startup, recoverable.

What SQLite and DuckDB notice by themselves differs from what they silently accept:
SQLite reads neither the bytes past its header's page count (appended garbage) nor a
page before a query reaches it (a truncated file, a page overwritten in the middle), and
DuckDB reads a block (and checks its checksum) only when a query needs it. So the
exporter checks file sizes against the headers and reads every page/block at open;
these tests damage real files each way and check that ``serve`` refuses to start with a
message naming the file and the recovery command, and that the command recovers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from _exporter_process import run_cli
from conftest import BASE_MS, batch_created, batch_settled, received, settled

from exporter.cli.recover import RecoverySummary, recover
from exporter.config import Settings
from exporter.errors import (
    LedgerCorruptError,
    LedgerUnavailableError,
    RecoveryPendingError,
    StoreCorruptError,
    StoreError,
)
from exporter.events import parse_event_json
from exporter.ledger import (
    DeadLetter,
    Ledger,
    PreparedEvent,
    Submission,
    is_damage,
    recovery_marker,
)
from exporter.ledger.salvage import scan_pages
from exporter.records import StoreRecord, StoreRejection
from exporter.store.duckdb import DuckDBStore

PAYMENTS = 3000
BATCHES = 50
EVENTS = 2 * PAYMENTS + 2 * BATCHES

Damage = Callable[[Path], None]


def _ndjson(path: Path) -> None:
    lines = []
    for n in range(PAYMENTS):
        pid = f"pay-{n:05d}"
        lines.append(received(pid, BASE_MS + n * 10))
        lines.append(settled(pid, BASE_MS + n * 10 + 2000))
    for n in range(BATCHES):
        lines.append(batch_created(f"batch-{n}", BASE_MS + n))
        lines.append(batch_settled(f"batch-{n}", BASE_MS + n + 5000))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose ledger and DuckDB store hold every event (built once)."""
    root = tmp_path_factory.mktemp("pristine")
    events = root / "events.ndjson"
    _ndjson(events)
    data_dir = root / "data"
    result = run_cli("replay", str(events), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accepted"] == EVENTS
    return data_dir


@pytest.fixture
def data_dir(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine data directory for one test to damage."""
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def _truncate(fraction: float, extra: int = 0) -> Damage:
    def damage(path: Path) -> None:
        os.truncate(path, int(path.stat().st_size * fraction) + extra)

    return damage


def _append(count: int) -> Damage:
    def damage(path: Path) -> None:
        with open(path, "ab") as handle:
            handle.write(random.Random(count).randbytes(count))

    return damage


def _overwrite(path: Path, offset: int, count: int = 4096) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(random.Random(offset).randbytes(count))


def _events_leaf_in_the_middle(path: Path) -> int:
    """The byte offset of the middle one of the ``events`` table's leaf pages."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # leaves a WAL as it is
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [
            page
            for (page,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' "
                "ORDER BY pageno"
            )
        ]
    finally:
        conn.close()
    return int((pages[len(pages) // 2] - 1) * page_size)


def _overwrite_events_page(path: Path) -> None:
    _overwrite(path, _events_leaf_in_the_middle(path))


def _zero_header(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"\0" * 100)


LEDGER_DAMAGE: dict[str, Damage] = {
    "truncated-to-half": _truncate(0.5),
    "truncated-mid-page": _truncate(0.5, 1234),
    "empty": _truncate(0),
    "garbage-appended": _append(1000),
    "pages-appended": _append(8192),
    "page-overwritten": _overwrite_events_page,
    "header-zeroed": _zero_header,
}


def _ledger(data_dir: Path) -> Path:
    return data_dir / "ledger.sqlite3"


def _store(data_dir: Path) -> Path:
    return data_dir / "store.duckdb"


def _recovery_hint(data_dir: Path) -> str:
    return f"facilitator-exporter recover --data-dir {data_dir}"


@pytest.mark.parametrize("damage", LEDGER_DAMAGE.values(), ids=LEDGER_DAMAGE.keys())
def test_a_damaged_ledger_is_refused_at_open(data_dir: Path, damage: Damage) -> None:
    path = _ledger(data_dir)
    damage(path)
    damaged = path.read_bytes()
    with pytest.raises(LedgerCorruptError) as caught:
        Ledger(path)
    message = str(caught.value)
    assert f"ledger file {path} is damaged" in message
    assert _recovery_hint(data_dir) in message
    assert path.read_bytes() == damaged  # never reset, never repaired in place


def test_sqlite_alone_misses_appended_bytes(data_dir: Path) -> None:
    """Why the size check exists: SQLite opens, checks and reads such a file happily."""
    path = _ledger(data_dir)
    _append(8192)(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (EVENTS,)
    finally:
        conn.close()


def test_a_ledger_with_a_hot_wal_is_not_damage(tmp_path: Path) -> None:
    """The files as a kill -9 leaves them (WAL not checkpointed) open normally."""
    live = tmp_path / "live"
    ledger = Ledger(live / "ledger.sqlite3")
    try:
        prepared = []
        for n in range(500):
            raw = json.dumps(received(f"hot-{n}", BASE_MS + n)).encode()
            prepared.append(PreparedEvent.of(parse_event_json(raw), raw))
        ledger.commit([Submission(prepared)])
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal"):
            shutil.copy(live / name, crashed / name)
    finally:
        ledger.close()
    assert (crashed / "ledger.sqlite3-wal").stat().st_size > 32
    reopened = Ledger(crashed / "ledger.sqlite3")
    try:
        assert reopened.stats().events == 500
    finally:
        reopened.close()


def _serve_refuses(data_dir: Path, path: Path) -> str:
    """Run ``serve`` on the damaged directory; returns its stderr after the checks."""
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    paragraph = [line for line in result.stderr.splitlines() if line.startswith("facilitator")]
    assert len(paragraph) == 1, result.stderr
    assert str(path) in paragraph[0]
    assert _recovery_hint(data_dir) in paragraph[0]
    structured = [line for line in result.stderr.splitlines() if 'msg="cannot start"' in line]
    assert len(structured) == 1 and str(path) in structured[0], result.stderr
    return result.stderr


@pytest.mark.slow
def test_serve_refuses_a_damaged_ledger_and_recover_salvages_it(data_dir: Path) -> None:
    path = _ledger(data_dir)
    _overwrite_events_page(path)
    _serve_refuses(data_dir, path)

    result = run_cli("recover", "--data-dir", str(data_dir))
    summary = json.loads(result.stdout)
    assert result.returncode == 1, result.stderr  # one page of events is gone
    assert summary["ledgerProblem"].startswith(f"ledger file {path} is damaged")
    assert summary["storeProblem"] is None
    aside = [Path(p) for p in summary["movedAside"]]
    assert aside[0].name.startswith("ledger.sqlite3.damaged-") and aside[0].exists()
    # One 4 KiB page of events is lost; every other event is salvaged.
    assert EVENTS - 20 <= summary["salvagedEvents"] < EVENTS
    assert summary["unreadableSeqRanges"]

    # The new ledger is sound and the exporter starts on it.
    ledger = Ledger(path)
    try:
        assert ledger.stats().events == summary["salvagedEvents"]
    finally:
        ledger.close()
    again = run_cli("recover", "--data-dir", str(data_dir))
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.slow
def test_recover_salvages_every_event_of_a_file_with_pages_appended(data_dir: Path) -> None:
    path = _ledger(data_dir)
    _append(8192)(path)
    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["lossless"] and summary["salvagedEvents"] == EVENTS
    assert summary["pageScanEvents"] == 0 and summary["unreadableSeqRanges"] == []
    ledger = Ledger(path)
    try:
        assert ledger.stats().events == EVENTS
    finally:
        ledger.close()


@pytest.mark.slow
def test_recover_salvages_what_the_btree_no_longer_reaches(data_dir: Path) -> None:
    """Half the file is gone: the pages leading to its rows were allocated last, so
    SQLite reaches few of them; reading the leaves page by page finds the rest."""
    path = _ledger(data_dir)
    _truncate(0.5)(path)
    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert not summary["lossless"] and summary["unreadableSeqRanges"]
    assert summary["pageScanEvents"] > 0
    ledger = Ledger(path)
    try:
        salvaged = ledger.stats().events
    finally:
        ledger.close()
    assert salvaged == summary["salvagedEvents"]
    assert EVENTS * 0.4 < salvaged < EVENTS


def _used_block_offset(path: Path) -> int:
    """The byte offset of the middle of a block holding ``payment`` rows."""
    conn = duckdb.connect(str(path), read_only=True)
    try:
        blocks = [
            block
            for (block,) in conn.execute(
                "SELECT DISTINCT block_id FROM pragma_storage_info('payment') "
                "WHERE block_id >= 0 ORDER BY block_id"
            ).fetchall()
        ]
    finally:
        conn.close()
    return 3 * 4096 + int(blocks[len(blocks) // 2]) * 262144 + 131072


def _overwrite_store_block(path: Path) -> None:
    _overwrite(path, _used_block_offset(path))


STORE_DAMAGE: dict[str, Damage] = {
    "truncated-to-half": _truncate(0.5),
    "truncated-mid-block": _truncate(0.5, 1234),
    "empty": _truncate(0),
    "garbage-appended": _append(1000),
    "block-appended": _append(262144),
    "block-overwritten": _overwrite_store_block,
    "header-zeroed": _zero_header,
}


@pytest.mark.parametrize("damage", STORE_DAMAGE.values(), ids=STORE_DAMAGE.keys())
def test_a_damaged_store_is_refused_at_open(data_dir: Path, damage: Damage) -> None:
    path = _store(data_dir)
    damage(path)
    damaged = path.read_bytes()
    with pytest.raises(StoreCorruptError) as caught:
        DuckDBStore.open(path)
    message = str(caught.value)
    assert f"DuckDB store {path} is damaged" in message
    assert _recovery_hint(data_dir) in message
    assert path.read_bytes() == damaged


def test_duckdb_alone_misses_a_truncated_file(data_dir: Path) -> None:
    """Why the store checks its size and reads every block: DuckDB opens a file cut in
    half and answers from its metadata; only reading a lost block fails."""
    path = _store(data_dir)
    _truncate(0.5)(path)
    conn = duckdb.connect(str(path))
    try:
        assert conn.execute("SELECT count(*) FROM payment").fetchone() == (2 * PAYMENTS,)
        with pytest.raises(duckdb.IOException, match="Could not read enough bytes"):
            conn.execute("SELECT * FROM payment").fetchall()
    finally:
        conn.close()


def _store_rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = duckdb.connect(str(path), read_only=True)
    try:
        return {
            table: conn.execute(f'SELECT * FROM "{table}" ORDER BY ALL').fetchall()
            for table in ("payment", "batch")
        }
    finally:
        conn.close()


@pytest.mark.slow
def test_serve_refuses_a_damaged_store_and_recover_rebuilds_it(data_dir: Path) -> None:
    path = _store(data_dir)
    before = _store_rows(path)
    assert len(before["payment"]) == 2 * PAYMENTS
    _overwrite_store_block(path)
    _serve_refuses(data_dir, path)

    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ledgerProblem"] is None
    assert summary["storeProblem"].startswith(f"DuckDB store {path} is damaged")
    assert summary["storeComplete"] and summary["lossless"]
    assert any(Path(p).name.startswith("store.duckdb.damaged-") for p in summary["movedAside"])
    assert _store_rows(path) == before  # every record, once, as it was


def _delete_events_up_to(data_dir: Path, seq: int) -> None:
    """Delete the ledger's first events, as retention does."""
    conn = sqlite3.connect(_ledger(data_dir))
    try:
        conn.execute("DELETE FROM events WHERE seq <= ?", (seq,))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.slow
def test_recover_says_what_retention_kept_it_from_rebuilding(data_dir: Path) -> None:
    _delete_events_up_to(data_dir, 10)
    _truncate(0.5)(_store(data_dir))
    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert json.loads(result.stdout)["retentionRemovedBeforeSeq"] == 11
    assert "retention" in result.stderr


def test_recover_leaves_intact_files_alone(data_dir: Path) -> None:
    files = ("ledger.sqlite3", "store.duckdb")
    before = {name: (data_dir / name).read_bytes() for name in files}
    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert {name: (data_dir / name).read_bytes() for name in files} == before
    assert not [p for p in data_dir.iterdir() if ".damaged-" in p.name]


# --------------------------------------------------------------------------- recover's own faults


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, listen="127.0.0.1:0")


def _recover(data_dir: Path, drain_seconds: float = 60.0) -> RecoverySummary:
    return asyncio.run(recover(_settings(data_dir), err=io.StringIO(), drain_seconds=drain_seconds))


def _prepared(raw: bytes) -> PreparedEvent:
    return PreparedEvent.of(parse_event_json(raw), raw)


def test_an_interrupted_ledger_recovery_blocks_startup_and_the_next_run_finishes_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _ledger(data_dir)
    _append(1000)(path)
    commit = Ledger.commit
    commits = 0

    def disk_full_on_the_second_commit(self: Ledger, submissions: list[Submission]) -> Any:
        nonlocal commits
        if self.path != path:
            commits += 1
            if commits == 2:
                raise LedgerUnavailableError("ledger commit failed: database or disk is full")
        return commit(self, submissions)

    monkeypatch.setattr(Ledger, "commit", disk_full_on_the_second_commit)
    with pytest.raises(LedgerUnavailableError):
        _recover(data_dir)
    monkeypatch.undo()
    # Part of the events are salvaged, in a file that is not the ledger; nothing may
    # start on the data directory until a recover finishes.
    assert recovery_marker(path).exists() and not path.exists()
    with pytest.raises(RecoveryPendingError) as caught:
        Ledger(path)
    assert _recovery_hint(data_dir) in str(caught.value)
    _serve_refuses(data_dir, path)

    summary = _recover(data_dir)
    assert summary.resumed and summary.lossless
    assert summary.salvaged_events == EVENTS
    assert not recovery_marker(path).exists()
    assert not [p for p in data_dir.iterdir() if p.name.startswith("ledger.sqlite3.recovering")]
    ledger = Ledger(path)
    try:
        assert ledger.stats().events == EVENTS
    finally:
        ledger.close()


def test_an_interrupted_store_rebuild_blocks_startup_and_the_next_run_finishes_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _store(data_dir)
    before = _store_rows(path)
    _truncate(0.5)(path)

    async def disk_full(self: DuckDBStore, records: list[StoreRecord]) -> list[StoreRejection]:
        raise StoreError("IO Error: could not write: no space left on device")

    monkeypatch.setattr(DuckDBStore, "write", disk_full)
    summary = _recover(data_dir, drain_seconds=0.5)
    monkeypatch.undo()
    assert not summary.store_complete and not summary.lossless
    assert recovery_marker(path).exists() and not path.exists()
    with pytest.raises(RecoveryPendingError):
        DuckDBStore.open(path)

    summary = _recover(data_dir)
    assert summary.resumed and summary.store_complete and summary.lossless
    assert not recovery_marker(path).exists()
    assert _store_rows(path) == before


def test_is_damage_counts_only_corrupt_and_not_a_database() -> None:
    def error(code: int) -> sqlite3.DatabaseError:
        made = sqlite3.DatabaseError("x")
        made.sqlite_errorcode = code
        return made

    assert is_damage(error(11)) and is_damage(error(26))
    assert is_damage(error(11 | 3 << 8))  # SQLITE_CORRUPT_INDEX, an extended code
    # full, I/O error, cannot open, busy, read-only
    assert not any(is_damage(error(code)) for code in (13, 10, 10 | 12 << 8, 14, 5, 8))


@pytest.mark.slow
def test_a_ledger_that_cannot_be_opened_is_not_damage_and_recover_leaves_it(
    data_dir: Path,
) -> None:
    path = _ledger(data_dir)
    original = path.read_bytes()
    # SQLite cannot open a WAL where a directory stands: "unable to open database file".
    path.with_name(path.name + "-wal").mkdir()
    with pytest.raises(LedgerUnavailableError) as caught:
        Ledger(path)
    message = str(caught.value)
    assert not isinstance(caught.value, LedgerCorruptError)
    assert f"cannot open ledger file {path}: unable to open database file" in message
    assert "is damaged" not in message and "not damaged" in message

    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "left in place" in result.stderr
    assert path.read_bytes() == original
    assert not [p for p in data_dir.iterdir() if ".damaged-" in p.name]


def test_a_ledger_path_that_is_a_directory_is_not_damage(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.mkdir()
    with pytest.raises(LedgerUnavailableError, match="cannot read ledger file") as caught:
        Ledger(path)
    assert not isinstance(caught.value, LedgerCorruptError)


def test_a_failed_open_closes_its_connections(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _ledger(data_dir)
    _overwrite_events_page(path)
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def tracking(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", tracking)
    with pytest.raises(LedgerCorruptError):
        Ledger(path)
    assert len(opened) >= 2
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")


def _ledger_with_a_hot_wal(tmp_path: Path, checkpointed: int, in_wal: int) -> Path:
    """A ledger as a crash leaves it: ``checkpointed`` events in the file and ``in_wal``
    more, in a second transaction, only in its WAL."""
    live = tmp_path / "live"
    ledger = Ledger(live / "ledger.sqlite3")
    ledger.commit(
        [
            Submission(
                [
                    _prepared(json.dumps(received(f"old-{n}", BASE_MS + n)).encode())
                    for n in range(checkpointed)
                ]
            )
        ]
    )
    ledger.close()
    ledger = Ledger(live / "ledger.sqlite3")
    try:
        ledger.commit(
            [
                Submission(
                    [
                        _prepared(json.dumps(received(f"new-{n}", BASE_MS + n)).encode())
                        for n in range(in_wal)
                    ]
                )
            ]
        )
        crashed = tmp_path / "data"
        crashed.mkdir()
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal"):
            shutil.copy(live / name, crashed / name)
    finally:
        ledger.close()
    return crashed / "ledger.sqlite3"


def test_recover_reads_the_damaged_ledger_and_its_wal_without_writing_them(
    tmp_path: Path,
) -> None:
    path = _ledger_with_a_hot_wal(tmp_path, 3000, 500)
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 32
    _overwrite_events_page(path)
    damaged, damaged_wal = path.read_bytes(), wal.read_bytes()
    with pytest.raises(LedgerCorruptError):
        Ledger(path)  # closing what it opened does not checkpoint the WAL into the file
    assert (path.read_bytes(), wal.read_bytes()) == (damaged, damaged_wal)

    summary = _recover(path.parent)
    aside = Path(summary.moved_aside[0])
    assert aside.read_bytes() == damaged
    assert aside.with_name(aside.name + "-wal").read_bytes() == damaged_wal
    # The WAL's events were read too: only the overwritten page's rows are missing.
    assert summary.unreadable_ranges
    assert 3500 - 40 <= summary.salvaged_events < 3500
    ledger = Ledger(path)
    try:
        keys = {key for _, key, _ in ledger.iter_events()}
    finally:
        ledger.close()
    assert sum(1 for key in keys if "new-" in key) == 500


def test_the_page_scan_skips_wal_frames_of_a_transaction_that_never_committed(
    tmp_path: Path,
) -> None:
    path = _ledger_with_a_hot_wal(tmp_path, 0, 400)
    wal = path.with_name(path.name + "-wal")
    everything = {bytes(body) for _, body in scan_pages(path)}
    assert sum(b'"new-' in body for body in everything) == 400
    # A crash while the transaction was written: its commit frame (the last) is missing.
    page_size = int.from_bytes(path.read_bytes()[16:18], "big")
    os.truncate(wal, wal.stat().st_size - (24 + page_size))
    assert not any(b'"new-' in bytes(body) for _, body in scan_pages(path))


def test_salvage_keeps_dead_letters_with_their_time(data_dir: Path) -> None:
    path = _ledger(data_dir)
    ledger = Ledger(path)
    try:
        first = json.dumps(received("dl-1", BASE_MS)).encode()
        conflicting = json.dumps(received("dl-1", BASE_MS, amount="9.99")).encode()
        ledger.commit([Submission([_prepared(first)])])
        ledger.commit(
            [
                Submission(
                    [_prepared(conflicting)],
                    [
                        DeadLetter("malformed", "not JSON", b"{nope", None, 1_700_000_000_000),
                        DeadLetter("too_large", "over", b"[[[", None, 1_700_000_000_001, 8 << 20),
                    ],
                )
            ]
        )
        letters = ledger.dead_letters()
    finally:
        ledger.close()
    assert {letter.reason for letter in letters} == {"conflict", "malformed", "too_large"}
    _append(1000)(path)

    summary = _recover(data_dir)
    assert summary.salvaged_dead_letters == len(letters) and summary.lossless
    ledger = Ledger(path)
    try:
        salvaged = ledger.dead_letters()
    finally:
        ledger.close()
    assert [(d.received_at, d.reason, d.error, d.key, d.raw, d.raw_size) for d in salvaged] == [
        (d.received_at, d.reason, d.error, d.key, d.raw, d.raw_size) for d in letters
    ]


@pytest.mark.slow
def test_recover_reports_retention_when_both_files_are_damaged(data_dir: Path) -> None:
    _delete_events_up_to(data_dir, 10)
    _append(1000)(_ledger(data_dir))
    _truncate(0.5)(_store(data_dir))
    result = run_cli("recover", "--data-dir", str(data_dir))
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["salvagedEvents"] == EVENTS - 10 and summary["storeComplete"]
    assert summary["retentionRemovedBeforeSeq"] == 11
    assert "before sequence number 11" in result.stderr


def _set_block_count(path: Path, extra: int) -> None:
    """Make the newer database header count ``extra`` more blocks than before, with its
    checksum recomputed (DuckDB's: 5381 xor each 64-bit word times a constant)."""
    with open(path, "r+b") as handle:
        head = handle.read(3 * 4096)
        offsets = (4096, 8192)
        iterations = [int.from_bytes(head[o + 8 : o + 16], "little") for o in offsets]
        at = offsets[iterations.index(max(iterations))]
        block = bytearray(head[at : at + 4096])
        count = int.from_bytes(block[32:40], "little") + extra
        block[32:40] = count.to_bytes(8, "little")
        checksum = 5381
        for (word,) in struct.iter_unpack("<Q", block[8:]):
            checksum ^= (word * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        block[0:8] = checksum.to_bytes(8, "little")
        handle.seek(at)
        handle.write(block)


def test_a_store_shorter_than_its_header_but_readable_is_accepted(data_dir: Path) -> None:
    """A checkpoint writes the header and then cuts free blocks off the file's end: the
    header may count blocks the file no longer has. Only reading every table decides."""
    path = _store(data_dir)
    before = _store_rows(path)
    _set_block_count(path, 2)
    store = DuckDBStore.open(path)
    asyncio.run(store.close())
    assert _store_rows(path) == before
