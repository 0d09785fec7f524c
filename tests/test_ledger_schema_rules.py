"""Upgrades of older ledger files: what an operator sees while they run and when they fail.

An upgrade rewrites the tables that hold acknowledged events, join state and undelivered
store records; a step that fails half-way must leave the file at the schema it started
from, say so in one line, and finish on the next start once the cause is gone.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.errors import LedgerError
from exporter.ledger import Ledger, LedgerStats
from exporter.ledger.schema import SCHEMA_VERSION

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMA_1_LEDGER = FIXTURES / "ledger-schema1.sqlite3"
SCHEMA_2_LEDGER = FIXTURES / "ledger-schema2.sqlite3"
OLD_LEDGER_STATS = LedgerStats(events=6, backlog=5, waiting_for_join=1, dead_letters=1)
"""What both fixtures hold (see their description in test_ledger.py)."""


def _copy(fixture: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(fixture.read_bytes())
    return path


def _schema(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (value,) = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return str(value)


@contextlib.contextmanager
def _files_limited_to(size: int) -> Iterator[None]:
    """No file this process writes may grow past ``size`` bytes: a disk that is full."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize(
    ("fixture", "first"), [(SCHEMA_1_LEDGER, 1), (SCHEMA_2_LEDGER, 2)], ids=["schema1", "schema2"]
)
def test_each_upgrade_step_logs_one_line_naming_the_file_and_both_schemas(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fixture: Path, first: int
) -> None:
    path = _copy(fixture, tmp_path)
    with caplog.at_level(logging.INFO, logger="exporter.ledger"):
        Ledger(path).close()
    steps = [r for r in caplog.records if r.getMessage() == "ledger schema upgraded"]
    assert [(vars(r)["from_schema"], vars(r)["to_schema"]) for r in steps] == [
        (version, version + 1) for version in range(first, SCHEMA_VERSION)
    ]
    for record in steps:
        assert vars(record)["path"] == str(path)
        seconds = vars(record)["seconds"]
        assert isinstance(seconds, float) and 0 <= seconds < 3  # a file of six events


def test_a_schema_3_ledger_gains_its_point_offsets_table_and_keeps_its_outbox(
    tmp_path: Path,
) -> None:
    path = _copy(SCHEMA_2_LEDGER, tmp_path)
    Ledger(path).close()
    # Schema 3 as an exporter of that version left it: no point_times table.
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE point_times")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    ledger = Ledger(path)
    try:
        assert ledger.stats() == OLD_LEDGER_STATS
        assert len(ledger.read_outbox(10)) == 5
    finally:
        ledger.close()
    assert _schema(path) == str(SCHEMA_VERSION)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert "point_times" in tables


def test_a_disk_that_fills_during_an_upgrade_leaves_a_whole_schema_and_one_line(
    tmp_path: Path,
) -> None:
    # A write that fails this way makes SQLite roll the transaction back itself, so the
    # upgrade's own ROLLBACK finds none to end: that must not hide the cause. With room
    # for the -shm file (32 KiB) and a few pages of WAL, the first step fits and a
    # later one does not.
    path = _copy(SCHEMA_1_LEDGER, tmp_path)
    with _files_limited_to(36_864), pytest.raises(LedgerError) as caught:
        Ledger(path)
    message = str(caught.value)
    found = re.fullmatch(
        rf"ledger file {re.escape(str(path))} could not be upgraded from schema (\d) to (\d) "
        r"\(.+\); it is left at schema (\d)\. The upgrade copies .+: free that much disk "
        r"space and restart",
        message,
    )
    assert found is not None, message
    step, to, left = (int(group) for group in found.groups())
    assert step > 1 and to == step + 1 and left == step and _schema(path) == str(step)
    ledger = Ledger(path)  # the space is back: the next start finishes the upgrade
    try:
        assert ledger.stats() == OLD_LEDGER_STATS
        assert [r.record.key for r in ledger.read_outbox(10)][-1] == "payment:failed:orphan-1"
    finally:
        ledger.close()
    assert _schema(path) == str(SCHEMA_VERSION)


def test_a_ledger_whose_creation_stopped_before_its_schema_row_is_finished(
    tmp_path: Path,
) -> None:
    # The tables are created one statement at a time, the schema row after them: a
    # crash between the two leaves tables that name no schema.
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM meta")
    ledger = Ledger(path)
    try:
        empty = LedgerStats(events=0, backlog=0, waiting_for_join=0, dead_letters=0)
        assert ledger.stats() == empty
    finally:
        ledger.close()
    assert _schema(path) == str(SCHEMA_VERSION)
