"""Point offsets when a millisecond of one series is full: the probe wraps to offset 0 and,
with every offset taken, gives the record its hash offset and says so (docs/architecture.md
section 6)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BASE_MS, received
from ledger_helpers import prepare

from exporter.ledger import Ledger, Submission
from exporter.ledger.schema import key_hash
from exporter.records import NS_PER_MS, key_digest


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An empty ledger, written from the test's own thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


def late_id_at_a_span_start() -> str:
    """A payment id whose receipt hashes to an offset the probe's spans start at (a
    multiple of 64), where the probe that wrapped stops exactly at its start."""
    for i in range(10_000):
        pid = f"late-{i}"
        if key_digest(f"payment:received:{pid}") % NS_PER_MS % 64 == 0:
            return pid
    raise AssertionError("no such id")


def fill_millisecond(ledger: Ledger, time_ms: int, keep_free: int | None) -> None:
    """Take every offset of the ``payment received`` series in ``time_ms`` but
    ``keep_free``, as another exporter's points would (a backfill adopts them so)."""
    ledger.commit([Submission([prepare(received("seed", time_ms))])])
    [[(_, series, _, _)]] = list(ledger.iter_point_times())
    taken = (
        (time_ms, series, offset, -1 - offset)
        for offset in range(NS_PER_MS)
        if offset != keep_free
    )
    ledger.adopt_point_times(list(taken))


def offset_of(ledger: Ledger, pid: str) -> int:
    """The offset the ledger gave the receipt of ``pid``."""
    [row] = [row for row in ledger.read_outbox(10) if row.record.key == f"payment:received:{pid}"]
    assert row.record.time_offset_ns is not None
    return row.record.time_offset_ns


def test_a_full_millisecond_wraps_to_its_one_free_offset_at_zero(ledger: Ledger) -> None:
    fill_millisecond(ledger, BASE_MS, keep_free=0)
    ledger.commit([Submission([prepare(received("late", BASE_MS))])])
    assert offset_of(ledger, "late") == 0


def test_a_millisecond_with_every_offset_taken_shares_the_hash_offset_and_warns(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    fill_millisecond(ledger, BASE_MS, keep_free=None)
    pid = late_id_at_a_span_start()
    with caplog.at_level(logging.WARNING, logger="exporter.ledger.offsets"):
        ledger.commit([Submission([prepare(received(pid, BASE_MS))])])
    assert offset_of(ledger, pid) == key_digest(f"payment:received:{pid}") % NS_PER_MS
    [warning] = [r for r in caplog.records if r.name == "exporter.ledger.offsets"]
    assert warning.getMessage() == (
        "no free point offset in this millisecond; the point may overwrite another"
    )
    assert warning.__dict__["time_ms"] == BASE_MS


@pytest.mark.parametrize("key", ["payment:received:p-1", "id:evt-42", "", "batch:created:é"])
def test_the_dedup_hash_read_unsigned_is_the_offset_digest(key: str) -> None:
    """The ledger places a record from its event's dedup hash instead of hashing the key
    again: both must be the same 64-bit digest, or offsets would move between versions."""
    assert key_hash(key) % 2**64 == key_digest(key)
    assert key_digest(key) < 2**64
