"""The ledger's storage rules that only show at their edges: the settlement deadline's
bookkeeping, a single-sink ledger's dead letters, the default page of dead letters, and
the waiting count when the ledger cannot be read."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import received, settled, wait_until
from ledger_faults import ending_transactions_on_insert
from ledger_helpers import prepare

from exporter.errors import LedgerUnavailableError
from exporter.ledger import DeadLetter, Ledger, LedgerTuning, Outcome, Submission
from exporter.records import StoreRejection

TIMEOUT_MS = 900_000
FOREVER = 2**62


def _now_ms() -> int:
    return int(time.time() * 1000)


def _tick_past(ms: int) -> None:
    """Wait until the clock reads later than ``ms``, so the next commit is received after it."""
    wait_until(lambda: _now_ms() > ms, what="the clock to pass the last commit")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on a fresh file, written from the test's own thread."""
    opened = Ledger(tmp_path / "ledger.sqlite3")
    yield opened
    opened.close()


def _events(ledger: Ledger) -> list[tuple[int, str, str]]:
    """Every stored event as (seq, type, paymentId), in commit order."""
    found = []
    for seq, _, body in ledger.iter_events():
        event = json.loads(body)
        found.append((seq, event["type"], event["data"]["paymentId"]))
    return found


def _key_index_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return sorted(seq for (seq,) in conn.execute("SELECT seq FROM key_index"))


def test_a_payment_marked_pending_later_keeps_its_own_deadline(ledger: Ledger) -> None:
    # Releasing the payments overdue now must not forget those marked since: each ends
    # at its own deadline.
    ledger.commit([Submission([prepare(received("p1"))], pending_settlements=["p1"])])
    first_marked = _now_ms()
    _tick_past(first_marked)
    ledger.commit([Submission([prepare(received("p2"))], pending_settlements=["p2"])])

    ledger.release_overdue_settlements(first_marked + TIMEOUT_MS, TIMEOUT_MS)
    assert _events(ledger)[-1] == (3, "payment:failed", "p1")
    # The failure is stored, counted and handed to the forwarders like a posted one.
    assert ledger.stats().events == 3
    assert [row.record.key for row in ledger.read_outbox(10)][-1] == "payment:failed:p1"
    assert ledger.backlog == 3
    ledger.release_overdue_settlements(FOREVER, TIMEOUT_MS)
    assert _events(ledger)[-1] == (4, "payment:failed", "p2")
    assert ledger.release_overdue_settlements(FOREVER, TIMEOUT_MS) == []


def test_a_timed_out_settlement_takes_its_turn_in_the_key_merge(tmp_path: Path) -> None:
    # The failure a deadline writes is an event like any other: its key counts towards
    # the next move of recent keys into the key index, which its own commit makes.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, tuning=LedgerTuning(key_merge_events=2, key_merge_parts=1))
    try:
        ledger.commit([Submission([prepare(received("p1"))], pending_settlements=["p1"])])
        assert _key_index_seqs(path) == []
        ledger.release_overdue_settlements(FOREVER, TIMEOUT_MS)
        assert _key_index_seqs(path) == [1, 2]
        # Both keys are still known after the move: the same events are duplicates.
        [again] = ledger.commit([Submission([prepare(received("p1"))])])
        assert again.outcomes == [Outcome.DUPLICATE]
    finally:
        ledger.close()


def test_a_timed_out_settlement_is_numbered_above_the_keys_retention_deleted(
    tmp_path: Path,
) -> None:
    # After retention deleted every event and a restart, max(seq) + 1 is 1 again: a
    # failure written by the deadline must still be numbered above every seq the key
    # index named (1 and 2), or the key of a deleted event would stand for it.
    path = tmp_path / "ledger.sqlite3"
    tuning = LedgerTuning(key_merge_events=2, key_merge_parts=1)
    ledger = Ledger(path, tuning=tuning)
    try:
        ledger.commit([Submission([prepare(received("p1")), prepare(received("p2"))])])
        ledger.commit([Submission([prepare(received("p3"))], pending_settlements=["p3"])])
        ledger.mark_delivered(ledger.read_outbox(10)[-1].seq)
        # p3's receipt stays in the payments table (not ended); its event goes.
        assert ledger.apply_retention(FOREVER) == 3
    finally:
        ledger.close()
    reopened = Ledger(path, tuning=tuning)
    try:
        reopened.release_overdue_settlements(FOREVER, TIMEOUT_MS)
        assert _events(reopened) == [(3, "payment:failed", "p3")]
    finally:
        reopened.close()


def test_retention_deletes_exactly_the_events_received_before_the_cut_off(
    ledger: Ledger,
) -> None:
    # The cut-off is found by a binary search over seq: wherever it falls, every event
    # received before it goes and none after it.
    sizes = [2, 1, 3, 1, 2, 1, 1]
    marks: list[int] = []
    for n, size in enumerate(sizes):
        if marks:
            _tick_past(marks[-1])
        ledger.commit([Submission([prepare(received(f"c{n}-{i}")) for i in range(size)])])
        marks.append(_now_ms())
    ledger.mark_delivered(ledger.read_outbox(100)[-1].seq)
    assert ledger.apply_retention(marks[0] - 10_000) == 0
    deleted = 0
    for upto in (0, 2, 3, 5, 6):
        expected = sum(sizes[: upto + 1]) - deleted
        assert ledger.apply_retention(marks[upto] + 1) == expected
        deleted += expected
        kept = {pid.split("-")[0] for _, _, pid in _events(ledger)}
        assert kept == {f"c{n}" for n in range(upto + 1, len(sizes))}
    assert ledger.stats().events == 0


def _received_at(path: Path, seq: int) -> int:
    with sqlite3.connect(path) as conn:
        (at,) = conn.execute("SELECT received_at FROM events WHERE seq = ?", (seq,)).fetchone()
    return int(at)


def test_an_event_received_at_the_cut_off_itself_is_kept(ledger: Ledger) -> None:
    ledger.commit([Submission([prepare(received("p1"))])])
    first = _now_ms()
    _tick_past(first)
    ledger.commit([Submission([prepare(received("p2"))])])
    ledger.mark_delivered(ledger.read_outbox(10)[-1].seq)
    assert ledger.apply_retention(_received_at(ledger.path, 2)) == 1
    assert [pid for _, _, pid in _events(ledger)] == ["p2"]


def test_retention_deletes_at_most_ten_thousand_events_a_call(ledger: Ledger) -> None:
    ledger.commit([Submission([prepare(received(f"p{i}")) for i in range(10_001)])])
    ledger.mark_delivered(ledger.read_outbox(20_000)[-1].seq)
    assert ledger.apply_retention(FOREVER) == 10_000
    assert ledger.apply_retention(FOREVER) == 1


def test_keys_retention_deleted_no_longer_count_towards_the_key_merge(tmp_path: Path) -> None:
    # Keys move to the key index once recent_keys holds three; the two retention
    # deleted are not among them.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, tuning=LedgerTuning(key_merge_events=3, key_merge_parts=1))
    try:
        ledger.commit([Submission([prepare(received("p1")), prepare(received("p2"))])])
        ledger.mark_delivered(ledger.read_outbox(10)[-1].seq)
        assert ledger.apply_retention(FOREVER) == 2
        ledger.commit([Submission([prepare(received("p3")), prepare(received("p4"))])])
        assert _key_index_seqs(path) == []
        ledger.commit([Submission([prepare(received("p5"))])])
        assert _key_index_seqs(path) == [3, 4, 5]
    finally:
        ledger.close()


def test_a_sink_mistake_names_the_sinks(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", sinks=("duckdb", "influxdb"))
    try:
        with pytest.raises(ValueError) as unnamed:
            ledger.read_outbox(10)
        assert str(unnamed.value) == "name the sink: this ledger feeds duckdb, influxdb"
        with pytest.raises(ValueError) as unknown:
            ledger.backlog_of("influx")
        assert str(unknown.value) == "'influx' is not a sink of this ledger"
    finally:
        ledger.close()


def test_a_read_from_the_table_and_memory_together_keeps_to_its_limit(tmp_path: Path) -> None:
    # Records 1-3 left memory (it keeps the newest two); a read of four takes them from
    # the table and only the first of the two in memory.
    tuning = LedgerTuning(handoff_max_records=2, outbox_row_records=1)
    ledger = Ledger(tmp_path / "ledger.sqlite3", tuning=tuning)
    try:
        ledger.commit([Submission([prepare(received(f"p{n}")) for n in range(1, 6)])])
        assert [row.seq for row in ledger.read_outbox(4)] == [1, 2, 3, 4]
        assert [row.seq for row in ledger.read_outbox(2, after=2)] == [3, 4]
        assert [row.seq for row in ledger.read_outbox(10)] == [1, 2, 3, 4, 5]
    finally:
        ledger.close()


def test_events_after_a_restart_are_numbered_above_the_keys_retention_deleted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    tuning = LedgerTuning(key_merge_events=2, key_merge_parts=1)
    ledger = Ledger(path, tuning=tuning)
    try:
        ledger.commit([Submission([prepare(received("p1")), prepare(received("p2"))])])
        ledger.mark_delivered(ledger.read_outbox(10)[-1].seq)
        assert ledger.apply_retention(FOREVER) == 2
    finally:
        ledger.close()
    reopened = Ledger(path, tuning=tuning)
    try:
        reopened.commit([Submission([prepare(received("p3"))])])
        assert _events(reopened) == [(3, "payment:received", "p3")]
    finally:
        reopened.close()


@pytest.mark.parametrize("parts", [2, 3], ids=["two-parts", "three-parts"])
def test_keys_at_the_edges_of_the_hash_range_move_to_the_key_index(
    tmp_path: Path, parts: int
) -> None:
    # Each part of a merge takes a range of the hash: together they take every hash,
    # the edges of each range too, whatever the number of parts. A key left behind
    # would be forgotten at the next restart (recent keys are rebuilt from past the
    # merged seq), and its event accepted again.
    width = 2**64 // parts
    edges = [-(2**63), -(2**63) + width - 1, -(2**63) + width, 2**63 - 1]

    def at_the_edges() -> Submission:
        return Submission(
            [prepare(received(f"p{n}"), known_key_hash=h) for n, h in enumerate(edges)]
        )

    path = tmp_path / "ledger.sqlite3"
    tuning = LedgerTuning(key_merge_events=len(edges), key_merge_parts=parts)
    ledger = Ledger(path, tuning=tuning)
    try:
        ledger.commit([at_the_edges()])
        for _ in range(parts - 1):
            ledger.commit([Submission(dead_letters=[DeadLetter("invalid", "x", b"{}")])])
        assert _key_index_seqs(path) == [1, 2, 3, 4]
    finally:
        ledger.close()
    reopened = Ledger(path, tuning=tuning)
    try:
        [again] = reopened.commit([at_the_edges()])
        assert again.outcomes == [Outcome.DUPLICATE] * len(edges)
    finally:
        reopened.close()


def test_a_sink_new_to_a_ledger_starts_at_the_first_record_it_still_holds(
    tmp_path: Path,
) -> None:
    # Records 1-2 went (delivered to the one sink there was); a sink added later gets
    # record 3 on, and its backlog ends at zero once it has it.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    try:
        ledger.commit([Submission([prepare(received("p1")), prepare(received("p2"))])])
        ledger.mark_delivered(2)
        ledger.commit([Submission([prepare(received("p3"))])])
    finally:
        ledger.close()
    reopened = Ledger(path, sinks=("store", "duckdb"))
    try:
        assert [row.seq for row in reopened.read_outbox(10, "duckdb")] == [3]
        assert reopened.backlog_of("duckdb") == 1
        assert reopened.mark_delivered(3, sink="duckdb") == 1
        assert reopened.backlog_of("duckdb") == 0
    finally:
        reopened.close()


def _events_in_the_file_alone(path: Path, scratch: Path) -> int:
    """Events in the database file without its WAL (a copy of it alone): those checkpointed."""
    shutil.copyfile(path, scratch)
    with sqlite3.connect(scratch) as conn:
        (tables,) = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'events'"
        ).fetchone()
        count = conn.execute("SELECT count(*) FROM events").fetchone()[0] if tables else 0
    scratch.unlink()
    return int(count)


def test_the_checkpointer_copies_commits_into_the_file_on_its_own(tmp_path: Path) -> None:
    # No commit checkpoints (autocheckpoint is off): the checkpointer's thread does,
    # every interval, while the ledger stays open.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, tuning=LedgerTuning(checkpoint_interval_seconds=0.01))
    try:
        ledger.commit([Submission([prepare(received("p1")), prepare(received("p2"))])])
        wait_until(
            lambda: _events_in_the_file_alone(path, tmp_path / "copy.sqlite3") == 2,
            what="the checkpointer to copy the commit into the file",
        )
    finally:
        ledger.close()


def test_the_checkpointer_runs_on_a_named_daemon_thread_that_close_ends(tmp_path: Path) -> None:
    # Named for thread dumps; a daemon, so that a ledger left open never holds the
    # process at exit; ended by close().
    def checkpointers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "ledger-checkpoint"]

    before = len(checkpointers())
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        [thread] = checkpointers()[before:]
        assert thread.daemon and thread.is_alive()
    finally:
        ledger.close()
    assert not thread.is_alive()


def test_store_refusals_of_a_single_sink_ledger_name_its_sink(ledger: Ledger) -> None:
    ledger.commit([Submission([prepare(received("poison")), prepare(received("fine"))])])
    rows = ledger.read_outbox(10)
    refused = (StoreRejection(rows[0].record, "400 unable to parse"),)
    assert ledger.mark_delivered(rows[-1].seq, refused) == 2
    [letter] = ledger.dead_letters(reason="store")
    assert (letter.key, letter.error) == ("payment:received:poison", "store: 400 unable to parse")


def test_dead_letters_are_listed_a_thousand_at_a_time_newest_first(ledger: Ledger) -> None:
    letters = [DeadLetter("invalid", f"error {n}", b"{}") for n in range(1001)]
    ledger.commit([Submission(dead_letters=letters)])
    listed = ledger.dead_letters()
    assert len(listed) == 1000
    assert (listed[0].error, listed[-1].error) == ("error 1000", "error 1")
    assert ledger.stats().dead_letters == 1001


def test_expiry_deletes_at_most_ten_thousand_dead_letters_a_call(ledger: Ledger) -> None:
    # The maintenance job's pass stays short however many letters are due.
    letters = [DeadLetter("invalid", "old", b"{}", received_at=1_000) for _ in range(10_001)]
    ledger.commit([Submission(dead_letters=letters)])
    assert ledger.expire_dead_letters(2_000) == 10_000
    assert ledger.expire_dead_letters(2_000) == 1
    assert ledger.stats().dead_letters == 0


def test_a_transaction_sqlite_ended_itself_fails_as_unavailable(ledger: Ledger) -> None:
    # The writer's ROLLBACK then has nothing to end: the failure is still the ledger's
    # one-line error, and the next commit goes through.
    with ending_transactions_on_insert(ledger.path, "events"):
        with pytest.raises(LedgerUnavailableError, match="disk I/O error"):
            ledger.commit([Submission([prepare(received("p1"))])])
    [result] = ledger.commit([Submission([prepare(received("p1"))])])
    assert result.outcomes == [Outcome.ACCEPTED]
    assert ledger.stats().events == 1


def test_the_waiting_count_outlives_a_ledger_that_cannot_be_read(tmp_path: Path) -> None:
    # Read at scrape time: a closed or failing ledger answers the last count, never an
    # error in the middle of /metrics.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.commit([Submission([prepare(settled("p1")), prepare(settled("p2"))])])
    assert ledger.waiting_events() == 2
    ledger.close()
    assert ledger.waiting_events() == 2
