"""Ledger: dedup, conflicts, joins in any order, dead letters, outbox, restart state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BASE_MS,
    async_wait_until,
    batch_created,
    batch_settled,
    failed,
    received,
    settled,
    verified,
)
from ledger_faults import refusing_inserts
from ledger_helpers import prepare

from exporter.config import Durability
from exporter.errors import LedgerCorruptError, LedgerError, LedgerUnavailableError
from exporter.ledger import (
    BatchGas,
    DataDirLock,
    DeadLetter,
    GroupCommitter,
    JoinTimeout,
    Ledger,
    LedgerStats,
    LedgerTuning,
    NewEvent,
    Outcome,
    PendingChange,
    Submission,
    SubmissionResult,
    TerminalPayment,
)
from exporter.ledger.schema import (
    DEAD_LETTER_COLUMNS,
    EVENTS_BODY_COLUMN,
    EVENTS_COLUMNS,
    EVENTS_TABLE,
    SCHEMA_VERSION,
    key_hash,
    payment_id_hash,
)
from exporter.records import BatchRecord, PaymentRecord, StoreRecord, decode_records


@pytest.fixture
async def committer(tmp_path: Path) -> AsyncIterator[GroupCommitter]:
    """A ledger on a fresh file behind its writer thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger)
    yield committer
    committer.close()
    ledger.close()


@contextlib.contextmanager
def writing(path: Path, tuning: LedgerTuning | None = None) -> Iterator[GroupCommitter]:
    """The ledger at ``path`` behind its writer thread, closed on exit (to test a restart)."""
    ledger = Ledger(path, tuning=tuning)
    committer = GroupCommitter(ledger)
    try:
        yield committer
    finally:
        committer.close()
        ledger.close()


async def submit(committer: GroupCommitter, *events: dict[str, Any]) -> SubmissionResult:
    """Commit ``events`` as one request."""
    return await committer.submit(Submission([prepare(e) for e in events]))


def payment_records(committer: GroupCommitter) -> list[PaymentRecord]:
    """Payment records waiting in the outbox, in order."""
    return [
        r.record for r in committer.ledger.read_outbox(1000) if isinstance(r.record, PaymentRecord)
    ]


async def test_duplicate_is_acknowledged_once(committer: GroupCommitter) -> None:
    first = await submit(committer, received("p1"))
    again = await submit(committer, received("p1"), received("p1"))
    assert first.outcomes == [Outcome.ACCEPTED]
    assert again.outcomes == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert again.effects == []
    assert committer.ledger.stats().events == 1


async def test_same_key_different_body_is_a_conflict_kept_as_dead_letter(
    committer: GroupCommitter,
) -> None:
    await submit(committer, settled("p1", fee="0.01"))
    result = await submit(committer, settled("p1", fee="0.02"))
    assert result.outcomes == [Outcome.CONFLICT]
    letters = committer.ledger.dead_letters()
    assert [(d.reason, d.key) for d in letters] == [("conflict", "payment:settled:p1")]
    assert b'"0.02"' in letters[0].raw


async def test_settled_before_received_joins_when_received_arrives(
    committer: GroupCommitter,
) -> None:
    early = await submit(committer, settled("p1", fee="0.25", settlement_ms=2500))
    assert early.outcomes == [Outcome.ACCEPTED]
    assert early.effects == [NewEvent("payment:settled")]  # nothing counted yet
    assert payment_records(committer) == []
    assert committer.ledger.stats().waiting_for_join == 1

    late = await submit(committer, received("p1", amount="10", network="eip155:10"))
    assert late.effects == [
        NewEvent("payment:received"),
        PendingChange("eip155:10", 1),
        TerminalPayment("eip155:10", "success", 10_000_000, 250_000, 2500),
        PendingChange("eip155:10", -1),
    ]
    records = payment_records(committer)
    assert [(r.status, r.network, r.amount_micro) for r in records] == [
        ("received", "eip155:10", 10_000_000),
        ("settled", "eip155:10", 10_000_000),
    ]
    assert records[1].fee_micro == 250_000
    assert records[1].payer == "0x" + "a" * 40
    assert committer.ledger.stats().waiting_for_join == 0


async def test_partners_waiting_in_the_table_and_in_the_same_commit_join_together(
    tmp_path: Path,
) -> None:
    # p1's verification waits from an earlier commit; its settlement, and a whole batch
    # in reverse order, wait within the commit that brings their partners.
    path = tmp_path / "ledger.sqlite3"
    with writing(path) as committer:
        ledger = committer.ledger
        await submit(committer, verified("p1"))
        result = await submit(
            committer,
            settled("p1"),
            batch_settled("b1"),
            received("p1", network="eip155:10"),
            batch_created("b1", network="eip155:10"),
            settled("p2"),  # no partner: still waits
        )
        assert result.outcomes == [Outcome.ACCEPTED] * 5
        assert TerminalPayment("eip155:10", "success", 1_500_000, 10_000, 1500) in result.effects
        assert BatchGas("eip155:10", 84_000) in result.effects
        assert [(r.status, r.network) for r in payment_records(committer)] == [
            ("received", "eip155:10"),
            ("verified", "eip155:10"),
            ("settled", "eip155:10"),
        ]
        batches = [r.record for r in ledger.read_outbox(100) if isinstance(r.record, BatchRecord)]
        assert [(b.status, b.network) for b in batches] == [
            ("created", "eip155:10"),
            ("settled", "eip155:10"),
        ]
        assert ledger.stats().waiting_for_join == 1
        assert await submit(committer, settled("p1")) == SubmissionResult([Outcome.DUPLICATE], [])
    with writing(path) as reopened:
        # p2's settlement, stored as waiting
        assert reopened.ledger.stats().waiting_for_join == 1


def test_bulk_inserts_keep_within_the_bound_parameter_limit(tmp_path: Path) -> None:
    # SQLite before 3.32 allows 999 bound parameters per statement; events take 9 each.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        ledger._write.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        events = [received(f"p{i}") for i in range(300)] + [settled(f"p{i}") for i in range(300)]
        [result] = ledger.commit([Submission([prepare(e) for e in events])])
        assert result.outcomes == [Outcome.ACCEPTED] * 600
        assert ledger.stats().events == 600
        assert len(ledger.read_outbox(1000)) == 600
    finally:
        ledger.close()


async def test_in_order_lifecycle_carries_network_to_every_record(
    committer: GroupCommitter,
) -> None:
    await submit(committer, received("p1", network="eip155:137"))
    result = await submit(committer, verified("p1"), settled("p1"))
    assert TerminalPayment("eip155:137", "success", 1_500_000, 10_000, 1500) in result.effects
    assert {r.network for r in payment_records(committer)} == {"eip155:137"}
    assert [r.status for r in payment_records(committer)] == ["received", "verified", "settled"]


async def test_unknown_failure_never_joins_and_uses_its_own_network(
    committer: GroupCommitter,
) -> None:
    await submit(committer, received("unknown", network="eip155:1"))
    result = await submit(
        committer, failed("unknown", network="eip155:8453"), failed("unknown", error="nonce_reused")
    )
    assert [e for e in result.effects if isinstance(e, TerminalPayment)] == [
        TerminalPayment("eip155:8453", "failed"),
        TerminalPayment("unknown", "failed"),
    ]
    assert not any(isinstance(e, PendingChange) for e in result.effects)


async def test_failure_that_never_joins_is_released_after_the_timeout(
    committer: GroupCommitter,
) -> None:
    await submit(committer, failed("p9", network="eip155:10"))
    assert committer.ledger.release_unjoined(older_than_ms=0) == []
    effects = await committer.call(lambda: committer.ledger.release_unjoined(2**62))
    assert effects == [TerminalPayment("eip155:10", "failed"), JoinTimeout("payment:failed")]
    late = await submit(committer, received("p9", network="eip155:10"))
    assert not any(isinstance(e, PendingChange | TerminalPayment) for e in late.effects)
    assert committer.ledger.gauges().pending_by_network == {}


async def test_batch_settled_before_created_takes_the_created_network(
    committer: GroupCommitter,
) -> None:
    early = await submit(committer, batch_settled("b1", gas="210000"))
    assert not any(isinstance(e, BatchGas) for e in early.effects)
    late = await submit(committer, batch_created("b1", network="eip155:42161", count=4))
    assert BatchGas("eip155:42161", 210_000) in late.effects
    batches = [
        r.record for r in committer.ledger.read_outbox(100) if isinstance(r.record, BatchRecord)
    ]
    assert [(b.status, b.network, b.payment_count, b.gas_used) for b in batches] == [
        ("created", "eip155:42161", 4, None),
        ("settled", "eip155:42161", 4, 210_000),
    ]


async def test_a_batch_keeps_its_first_definition_across_commits_and_restarts(
    tmp_path: Path,
) -> None:
    # The second batch:created of b1 (another event id, another body) is a conflict and
    # does not redefine the batch; a settlement in a later commit, after a restart, finds
    # the first one.
    path = tmp_path / "ledger.sqlite3"
    with writing(path) as committer:
        first = batch_created("b1", network="eip155:10", count=4)
        again = {**batch_created("b1", network="eip155:1", count=9), "id": "created-again"}
        result = await submit(committer, first, again, batch_created("b2", count=2))
        assert result.outcomes == [Outcome.ACCEPTED, Outcome.CONFLICT, Outcome.ACCEPTED]
    with writing(path) as committer:
        result = await submit(committer, batch_settled("b1", gas="21000"), batch_settled("b3"))
        assert BatchGas("eip155:10", 21_000) in result.effects
        settled_batches = [
            r.record
            for r in committer.ledger.read_outbox(100)
            if isinstance(r.record, BatchRecord) and r.record.status == "settled"
        ]
        assert [(b.batch_id, b.network, b.payment_count) for b in settled_batches] == [
            ("b1", "eip155:10", 4)
        ]
        assert committer.ledger.stats().waiting_for_join == 1  # b3 has no batch:created yet


async def test_second_terminal_event_is_a_conflict_and_pending_drops_once(
    committer: GroupCommitter,
) -> None:
    await submit(committer, received("p1"))
    result = await submit(committer, settled("p1"), failed("p1"))
    assert result.outcomes == [Outcome.ACCEPTED, Outcome.CONFLICT]
    pending = [e for e in result.effects if isinstance(e, PendingChange)]
    assert pending == [PendingChange("eip155:8453", -1)]


async def test_concurrent_submissions_share_commits(committer: GroupCommitter) -> None:
    results = await asyncio.gather(*(submit(committer, received(f"p{i}")) for i in range(200)))
    assert all(r.outcomes == [Outcome.ACCEPTED] for r in results)
    assert committer.ledger.stats().events == 200
    assert committer.commits < 200


def _committing_threads(committer: GroupCommitter) -> list[str]:
    names: list[str] = []
    committer.on_commit_hooks.append(lambda: names.append(threading.current_thread().name))
    return names


async def _still_waiting_while_the_loop_runs(request: asyncio.Future[Any]) -> None:
    """Let the event loop run many passes: it must not be held, and ``request`` must wait."""
    for _ in range(50):
        await asyncio.sleep(0)
    assert not request.done()


async def test_small_requests_commit_on_the_event_loop_and_large_ones_on_the_writer(
    committer: GroupCommitter,
) -> None:
    threads = _committing_threads(committer)
    await submit(committer, received("p1"))
    await submit(committer, *(received(f"q{i}") for i in range(100)))
    assert threads == [threading.current_thread().name, "ledger-writer"]
    assert committer.ledger.stats().events == 101


async def test_with_power_durability_every_commit_runs_on_the_writer(tmp_path: Path) -> None:
    # Each of its commits syncs the disk: never on the event loop.
    ledger = Ledger(tmp_path / "ledger.sqlite3", Durability.POWER)
    committer = GroupCommitter(ledger)
    try:
        threads = _committing_threads(committer)
        await submit(committer, received("p1"))
        assert threads == ["ledger-writer"]
    finally:
        committer.close()
        ledger.close()


async def test_with_commits_off_the_loop_every_commit_runs_on_the_writer(
    tmp_path: Path,
) -> None:
    # For slow disks: no commit, however small, holds the event loop.
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    committer = GroupCommitter(ledger, commit_on_loop=False)
    try:
        threads = _committing_threads(committer)
        results = await asyncio.gather(
            *(submit(committer, received(f"p{i}")) for i in range(50)),
            submit(committer, *(received(f"q{i}") for i in range(100))),
        )
        assert all(r.outcomes[0] is Outcome.ACCEPTED for r in results)
        assert ledger.stats().events == 150
        assert threads and set(threads) == {"ledger-writer"}
    finally:
        committer.close()
        ledger.close()


async def test_the_committer_keeps_how_the_last_commit_ended(committer: GroupCommitter) -> None:
    path = committer.ledger.path
    assert committer.last_commit is None
    await submit(committer, received("p1"))
    first = committer.last_commit
    assert first is not None and first.ok and first.error is None
    with refusing_inserts(path, "events"):
        with pytest.raises(LedgerUnavailableError):
            await submit(committer, received("p2"))
        failed_commit = committer.last_commit
        assert failed_commit is not None and not failed_commit.ok
        assert failed_commit.error is not None
        assert failed_commit.error.startswith("LedgerUnavailableError: ")
        assert "database or disk is full" in failed_commit.error
        assert failed_commit.monotonic >= first.monotonic
    await submit(committer, received("p2"))
    assert committer.last_commit is not None and committer.last_commit.ok


async def test_a_request_refused_for_its_own_content_does_not_mark_the_ledger_failed(
    committer: GroupCommitter,
) -> None:
    await submit(committer, received("p1"))
    poison = Submission(dead_letters=[DeadLetter("invalid", "lone surrogate \ud800", b"")])
    with pytest.raises(LedgerUnavailableError):
        await committer.submit(poison)
    assert committer.last_commit is not None and committer.last_commit.ok


async def test_last_outcome_writes_only_when_no_commit_is_recent(
    committer: GroupCommitter,
) -> None:
    path = committer.ledger.path
    await submit(committer, received("p1"))
    recent = committer.last_commit
    assert await committer.last_outcome(60.0) is recent  # no write: the commit is recent

    # Stale: one small write answers every caller waiting at the time.
    outcomes = await asyncio.gather(*(committer.last_outcome(0.0) for _ in range(5)))
    assert outcomes[0] is not recent and outcomes[0].ok
    assert all(outcome is outcomes[0] for outcome in outcomes)
    assert committer.last_commit is outcomes[0]

    with refusing_inserts(path, "meta"):
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM meta WHERE key = 'write_probe'")
        refused = await committer.last_outcome(0.0)
    assert not refused.ok and refused.error is not None
    assert "database or disk is full" in refused.error
    assert committer.last_commit is refused


async def test_a_busy_writer_takes_the_event_loops_requests_without_blocking_it(
    committer: GroupCommitter,
) -> None:
    threads = _committing_threads(committer)
    started, release = threading.Event(), threading.Event()

    def hold_the_writer() -> bool:
        started.set()
        return release.wait(10)

    async def writer_is_held() -> bool:
        return started.is_set()

    job = asyncio.ensure_future(committer.call(hold_the_writer))
    await async_wait_until(writer_is_held, what="the writer to run the job")
    pending = asyncio.ensure_future(submit(committer, received("p1")))
    await _still_waiting_while_the_loop_runs(pending)
    release.set()
    result = await pending
    assert await job is True
    assert result.outcomes == [Outcome.ACCEPTED]
    assert threads == ["ledger-writer"]


async def test_a_checkpoint_holding_the_ledger_sends_the_loops_requests_to_the_writer(
    committer: GroupCommitter,
) -> None:
    # The WAL checkpoint takes the ledger's write lock (rarely, and while it syncs the
    # file): a commit on the event loop must not wait for it there.
    threads = _committing_threads(committer)
    held, release = threading.Event(), threading.Event()

    def checkpoint() -> None:
        with committer.ledger._write_lock:
            held.set()
            release.wait(10)

    checkpointer = threading.Thread(target=checkpoint)
    checkpointer.start()
    try:
        held.wait(10)
        pending = asyncio.ensure_future(submit(committer, received("p1")))
        await _still_waiting_while_the_loop_runs(pending)
    finally:
        release.set()
        checkpointer.join()
    assert (await pending).outcomes == [Outcome.ACCEPTED]
    assert threads == ["ledger-writer"]


async def test_loop_and_writer_commits_interleave_without_losing_or_renumbering(
    committer: GroupCommitter,
) -> None:
    ledger = committer.ledger
    small = [submit(committer, received(f"s{i}")) for i in range(300)]
    large = [submit(committer, *(received(f"l{j}-{i}") for i in range(80))) for j in range(10)]
    delivered = [committer.call(lambda: ledger.mark_delivered(0)) for _ in range(5)]
    small_results, large_results, _ = await asyncio.gather(
        asyncio.gather(*small), asyncio.gather(*large), asyncio.gather(*delivered)
    )
    outcomes = [o for r in [*small_results, *large_results] for o in r.outcomes]
    assert outcomes == [Outcome.ACCEPTED] * 1100
    assert ledger.stats().events == 1100
    seqs = [row.seq for row in ledger.read_outbox(5000)]
    assert seqs == list(range(seqs[0], seqs[0] + 1100))
    assert committer.commits < 310


async def test_dead_letters_are_stored_with_raw_bytes(committer: GroupCommitter) -> None:
    await committer.submit(
        Submission(dead_letters=[DeadLetter("invalid", "data.amount: bad", b'{"raw": 1}')])
    )
    [letter] = committer.ledger.dead_letters(reason="invalid")
    assert (letter.error, letter.raw) == ("data.amount: bad", b'{"raw": 1}')


async def test_outbox_delivery_and_backlog(committer: GroupCommitter) -> None:
    await submit(committer, received("p1"), received("p2"), received("p3"))
    ledger = committer.ledger
    rows = ledger.read_outbox(2)
    assert ledger.backlog == 3
    await committer.call(lambda: ledger.mark_delivered(rows[-1].seq))
    assert ledger.backlog == 1
    assert [r.record.key for r in ledger.read_outbox(10)] == ["payment:received:p3"]


def table_outbox(ledger: Ledger) -> list[tuple[int, StoreRecord]]:
    """The outbox as stored in the file, decoded: each record with its seq."""
    with sqlite3.connect(ledger.path) as conn:
        rows = conn.execute("SELECT seq, last_seq, records FROM outbox ORDER BY seq").fetchall()
    found: list[tuple[int, StoreRecord]] = []
    for first, last, blob in rows:
        records = decode_records(blob)
        assert len(records) == last - first + 1
        found.extend(enumerate(records, start=first))
    return found


async def test_outbox_read_in_memory_matches_the_table_through_overflow_and_restart(
    tmp_path: Path,
) -> None:
    # Records pass to the forwarder in memory while few; past the cap (a store outage)
    # and after a restart they are read from the table, until it has drained.
    tuning = LedgerTuning(handoff_max_records=5)
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, tuning=tuning)
    committer = GroupCommitter(ledger)

    def outbox() -> list[tuple[int, StoreRecord]]:
        return [(r.seq, r.record) for r in ledger.read_outbox(100)]

    async def drain() -> None:
        while rows := ledger.read_outbox(2):
            await committer.call(functools.partial(ledger.mark_delivered, rows[-1].seq))

    try:
        await submit(committer, received("p1"), received("p2"), settled("p1"))
        assert outbox() == table_outbox(ledger) and len(outbox()) == 3
        await submit(committer, settled("p2"), received("p3"), received("p4"))  # over the cap
        assert outbox() == table_outbox(ledger) and len(outbox()) == 6
        await drain()
        assert ledger.backlog == 0 and outbox() == []
        await submit(committer, settled("p3"), received("p5"))  # back in memory
        assert outbox() == table_outbox(ledger) and len(outbox()) == 2
    finally:
        committer.close()
        ledger.close()

    reopened = Ledger(path, tuning=tuning)
    committer = GroupCommitter(reopened)
    try:
        ledger = reopened
        await submit(committer, settled("p4"))
        assert outbox() == table_outbox(reopened)
        assert [r.key for _, r in outbox()] == [
            "payment:settled:p3",
            "payment:received:p5",
            "payment:settled:p4",
        ]
        await drain()
        assert table_outbox(reopened) == [] and reopened.backlog == 0
    finally:
        committer.close()
        reopened.close()


async def test_a_commit_fills_outbox_rows_that_deliver_record_by_record(tmp_path: Path) -> None:
    # One commit's records share rows of at most _OUTBOX_ROW_RECORDS; a row delivered in
    # part stays, and its delivered records are not read again, after a restart either.
    tuning = LedgerTuning(outbox_row_records=2, handoff_max_records=1)
    path = tmp_path / "ledger.sqlite3"
    keys = [f"payment:received:p{n}" for n in range(1, 8)]

    def unread(ledger: Ledger) -> list[tuple[int, str]]:
        return [(r.seq, r.record.key) for r in ledger.read_outbox(10)]

    with writing(path, tuning) as committer:
        ledger = committer.ledger
        await submit(committer, *(received(f"p{n}") for n in range(1, 6)))
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT seq, last_seq FROM outbox ORDER BY seq").fetchall()
        assert rows == [(1, 2), (3, 4), (5, 5)]
        assert [(seq, r.key) for seq, r in table_outbox(ledger)] == list(enumerate(keys[:5], 1))
        first = ledger.read_outbox(3)  # two rows from the table
        assert [(r.seq, r.record.key) for r in first] == list(enumerate(keys[:3], 1))
        assert await committer.call(functools.partial(ledger.mark_delivered, 3)) == 3
        assert ledger.backlog == 2
        assert [seq for seq, _ in table_outbox(ledger)] == [3, 4, 5]  # row 3-4 stays
        assert unread(ledger) == [(4, keys[3]), (5, keys[4])]

    with writing(path, tuning) as committer:
        ledger = committer.ledger
        assert ledger.backlog == 2 and unread(ledger) == [(4, keys[3]), (5, keys[4])]
        await submit(committer, received("p6"))
        assert [seq for seq, _ in unread(ledger)] == [4, 5, 6]
        assert await committer.call(functools.partial(ledger.mark_delivered, 6)) == 3
        assert ledger.backlog == 0 and table_outbox(ledger) == []

    # The outbox is empty, and numbering goes on above the delivered mark: a record
    # numbered again from 1 would pass for delivered.
    with writing(path, tuning) as committer:
        await submit(committer, received("p7"))
        assert unread(committer.ledger) == [(7, keys[6])] and committer.ledger.backlog == 1


async def test_restart_restores_pending_websocket_and_backlog(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, Durability.POWER)
    committer = GroupCommitter(ledger)
    await submit(
        committer,
        received("p1", network="eip155:10"),
        received("p2"),
        received("p3"),
        settled("p3"),
        {"type": "websocket:clients", "data": {"count": 9, "timestamp": BASE_MS + 5}},
        {"type": "websocket:clients", "data": {"count": 4, "timestamp": BASE_MS}},
    )
    committer.close()
    ledger.close()

    reopened = Ledger(path)
    gauges = reopened.gauges()
    assert gauges.pending_by_network == {"eip155:10": 1, "eip155:8453": 1}
    assert gauges.websocket_clients == 9  # the latest timestamp, not the last arrival
    assert reopened.backlog == 6
    reopened.close()


async def test_retention_drops_only_delivered_events(committer: GroupCommitter) -> None:
    ledger = committer.ledger
    await submit(committer, received("p1"), settled("p2"))  # p2 waits for its join
    rows = ledger.read_outbox(10)
    assert await committer.call(lambda: ledger.apply_retention(2**62)) == 0
    await committer.call(lambda: ledger.mark_delivered(rows[-1].seq))
    assert await committer.call(lambda: ledger.apply_retention(0)) == 0  # all too recent
    assert await committer.call(lambda: ledger.apply_retention(2**62)) == 1
    assert [key for _, key, _ in ledger.iter_events()] == ["payment:settled:p2"]


async def test_the_event_count_follows_commits_duplicates_and_retention(
    committer: GroupCommitter,
) -> None:
    # /readyz shows it; the ledger keeps it rather than count a table with no narrow index.
    ledger = committer.ledger

    def counted() -> int:
        with sqlite3.connect(ledger.path) as conn:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])

    await submit(committer, received("p1"), received("p2"), settled("p3"))
    await submit(committer, received("p1"), received("p4"))  # one duplicate
    assert ledger.stats().events == counted() == 4
    await committer.call(lambda: ledger.mark_delivered(ledger.read_outbox(10)[-1].seq))
    assert await committer.call(lambda: ledger.apply_retention(2**62)) == 3  # p3 waits
    assert ledger.stats().events == counted() == 1
    path = ledger.path
    committer.close()
    ledger.close()
    reopened = Ledger(path)
    try:
        assert reopened.stats().events == 1
    finally:
        reopened.close()


def key_index_seqs(path: Path) -> list[int]:
    """Seqs the ledger file's merged key index names, in order."""
    with sqlite3.connect(path) as conn:
        return sorted(seq for (seq,) in conn.execute("SELECT seq FROM key_index"))


def negative_hash_seqs(*pids: str) -> list[int]:
    """Seqs (1, 2, ... in the order given) of ``payment:received`` events of ``pids``
    whose key hash is negative: the first half of the hash range a merge moves."""
    return [seq for seq, pid in enumerate(pids, start=1) if key_hash(f"payment:received:{pid}") < 0]


async def test_keys_are_found_before_during_and_after_they_move_to_the_key_index(
    tmp_path: Path,
) -> None:
    # Keys of the newest events live in a temp table and move to key_index every three
    # events, half of the hash range per commit; dedup and conflicts must see every key
    # at every step, across restarts too (one in the middle of a merge).
    # Ordered so that both merges have keys in both halves of the hash range.
    a, b, c, d, e, f, g, h = pids = ["p1", "p5", "p2", "p3", "p6", "p4", "p7", "p8"]
    first_half = negative_hash_seqs(*pids)
    assert first_half == [2, 5, 7]
    tuning = LedgerTuning(key_merge_events=3, key_merge_parts=2)
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, tuning=tuning)
    committer = GroupCommitter(ledger)
    try:
        await submit(committer, received(a), received(b))
        assert key_index_seqs(path) == []  # two events: still recent
        merging = await submit(committer, received(c), received(a))
        assert merging.outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]
        assert key_index_seqs(path) == [2]  # the first half of the hash range
        mid_merge = await submit(
            committer, received(d), received(b, amount="9.99"), received(c, amount="9.99")
        )
        assert mid_merge.outcomes == [Outcome.ACCEPTED, Outcome.CONFLICT, Outcome.CONFLICT]
        assert key_index_seqs(path) == [1, 2, 3]
        await submit(committer, received(e), received(f))  # a merge of 4-6 starts
        assert key_index_seqs(path) == [1, 2, 3, 5]
    finally:
        committer.close()
        ledger.close()
    reopened = Ledger(path, tuning=tuning)  # 4-6 are recent again, rebuilt from the events table
    committer = GroupCommitter(reopened)
    try:
        after_restart = await submit(
            committer,
            *(received(pid) for pid in pids[:6]),
            received(e, amount="9.99"),
            received(d, amount="9.99"),
            received(g),
            received(h),
        )
        assert after_restart.outcomes == [Outcome.DUPLICATE] * 6 + [
            Outcome.CONFLICT,
            Outcome.CONFLICT,
            Outcome.ACCEPTED,
            Outcome.ACCEPTED,
        ]
        await submit(committer, received(a))  # the merge of 4-8 ends
        assert key_index_seqs(path) == [1, 2, 3, 4, 5, 6, 7, 8]
        assert reopened.stats().events == 8
    finally:
        committer.close()
        reopened.close()


async def test_retention_removes_the_keys_of_deleted_events(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, tuning=LedgerTuning(key_merge_events=2, key_merge_parts=1))
    committer = GroupCommitter(ledger)
    try:
        await submit(committer, received("p1"), received("p2"))  # merged into key_index
        await submit(committer, received("p3"))  # recent
        rows = ledger.read_outbox(10)
        await committer.call(lambda: ledger.mark_delivered(rows[-1].seq))
        assert await committer.call(lambda: ledger.apply_retention(2**62)) == 3
        assert key_index_seqs(path) == []
        # Past the dedup horizon the receipt of a payment still pending is known to the
        # join table: a duplicate when it says the same, a conflict when it does not.
        resent = await submit(committer, received("p1"), received("p3", amount="7"))
        assert resent.outcomes == [Outcome.DUPLICATE, Outcome.CONFLICT]
        # New events are numbered above every seq that key_index held (1 and 2) and
        # every seq given before (3).
        await submit(committer, received("p4"), received("p5"))
        assert [seq for seq, _, _ in ledger.iter_events()] == [4, 5]
        assert (await submit(committer, received("p4"))).outcomes == [Outcome.DUPLICATE]
    finally:
        committer.close()
        ledger.close()


def test_damaged_ledger_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerCorruptError) as caught:
        Ledger(path)
    assert str(path) in str(caught.value)
    assert "move" in str(caught.value)


async def test_a_failing_submission_does_not_fail_those_sharing_its_commit(
    committer: GroupCommitter,
) -> None:
    poison = Submission(dead_letters=[DeadLetter("invalid", "lone surrogate \ud800", b"")])
    good = [submit(committer, received(f"p{i}")) for i in range(20)]
    outcomes = await asyncio.gather(committer.submit(poison), *good, return_exceptions=True)
    assert isinstance(outcomes[0], LedgerUnavailableError)
    assert all(isinstance(r, SubmissionResult) for r in outcomes[1:])
    assert committer.ledger.stats().events == 20


def test_second_holder_of_a_data_dir_is_refused(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    script = (
        "import sys; from pathlib import Path; from exporter.ledger import DataDirLock;"
        "DataDirLock(Path(sys.argv[1]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert other.returncode != 0
    assert f"data directory {tmp_path} is in use by another exporter process" in other.stderr
    assert f"pid {os.getpid()}" in other.stderr
    first.release()
    again = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert again.returncode == 0


async def test_keys_whose_hashes_collide_stay_distinct(committer: GroupCommitter) -> None:
    def colliding(*events: dict[str, Any]) -> Submission:
        return Submission([prepare(event, known_key_hash=7) for event in events])

    first = await committer.submit(colliding(received("p1"), received("p2"), settled("p1")))
    again = await committer.submit(colliding(received("p2"), settled("p1", fee="0.99")))
    assert first.outcomes == [Outcome.ACCEPTED] * 3
    assert again.outcomes == [Outcome.DUPLICATE, Outcome.CONFLICT]
    assert committer.ledger.stats().events == 3


async def test_payment_ids_whose_hashes_collide_keep_their_own_join_state(
    committer: GroupCommitter,
) -> None:
    # Payments are found through a 32-bit hash of their id: these two ids share one.
    first_id, second_id = "pay-629908", "pay-21000606"
    assert payment_id_hash(first_id) == payment_id_hash(second_id)
    await submit(committer, received(first_id, amount="1.00"))
    await submit(committer, received(second_id, amount="2.00"))
    result = await submit(committer, settled(second_id))
    assert [e for e in result.effects if isinstance(e, TerminalPayment)] == [
        TerminalPayment("eip155:8453", "success", 2_000_000, 10_000, 1500)
    ]
    assert committer.ledger.gauges().pending_by_network == {"eip155:8453": 1}
    settled_record = payment_records(committer)[-1]
    assert (settled_record.payment_id, settled_record.amount_micro) == (second_id, 2_000_000)


SCHEMA_1_LEDGER = Path(__file__).parent / "fixtures" / "ledger-schema1.sqlite3"
"""A ledger written by schema 1 (payments keyed by id in a WITHOUT ROWID table): a
pending payment (received, verified), a settled one, a settlement waiting for its
receipt, a failure released without its receipt, a dead letter and five undelivered
store records."""
SCHEMA_2_LEDGER = Path(__file__).parent / "fixtures" / "ledger-schema2.sqlite3"
"""The schema 1 ledger as schema 2 left it after its upgrade (an outbox row per
record)."""


@pytest.fixture(params=[SCHEMA_1_LEDGER, SCHEMA_2_LEDGER], ids=["schema1", "schema2"])
def old_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of a ledger file written by each older schema."""
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(request.param.read_bytes())
    return path


async def test_an_old_ledger_is_upgraded_with_its_join_state_and_outbox(old_ledger: Path) -> None:
    path = old_ledger
    ledger = Ledger(path)
    committer = GroupCommitter(ledger)
    try:
        assert ledger.stats() == LedgerStats(
            events=6, backlog=5, waiting_for_join=1, dead_letters=1
        )
        assert ledger.gauges().pending_by_network == {"eip155:8453": 1}
        assert [r.record.key for r in ledger.read_outbox(10)] == [
            "payment:received:pending-1",
            "payment:verified:pending-1",
            "payment:received:done-1",
            "payment:settled:done-1",
            "payment:failed:orphan-1",
        ]
        again = await submit(committer, received("done-1"), settled("done-1"))
        assert again.outcomes == [Outcome.DUPLICATE, Outcome.DUPLICATE]
        pending_settles = await submit(committer, settled("pending-1"))
        assert PendingChange("eip155:8453", -1) in pending_settles.effects
        waiting_joins = await submit(committer, received("waits-1"))
        assert [e for e in waiting_joins.effects if isinstance(e, TerminalPayment)] == [
            TerminalPayment("eip155:8453", "success", 1_500_000, 10_000, 1500)
        ]
        late_receipt = await submit(committer, received("orphan-1"))
        assert not [e for e in late_receipt.effects if isinstance(e, PendingChange)]
    finally:
        committer.close()
        ledger.close()
    reopened = Ledger(path)
    try:
        assert reopened.gauges().pending_by_network == {}
        assert reopened.stats().waiting_for_join == 0
    finally:
        reopened.close()
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    assert schema == (str(SCHEMA_VERSION),)
    assert "payments_schema1" not in tables and "payments_id_hash" in tables
    assert "events_key_hash" not in tables and "outbox_schema2" not in tables
    assert "point_times" in tables  # schema 4
    assert key_index_seqs(path) == [1, 2, 3, 4, 5, 6]  # the schema 1 events, merged


@pytest.mark.parametrize("fixture", [None, SCHEMA_1_LEDGER], ids=["new", "upgraded"])
def test_the_events_layout_constants_name_the_stored_columns(
    tmp_path: Path, fixture: Path | None
) -> None:
    # A reader of a damaged file's pages finds an event's body by the column order
    # that EVENTS_COLUMNS names: it must hold for new and upgraded files alike.
    path = tmp_path / "ledger.sqlite3"
    if fixture is not None:
        path.write_bytes(fixture.read_bytes())
    Ledger(path).close()
    with sqlite3.connect(path) as conn:
        columns = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({EVENTS_TABLE})"))
        letters = tuple(row[1] for row in conn.execute("PRAGMA table_info(dead_letters)"))
    assert columns == EVENTS_COLUMNS
    assert columns[EVENTS_BODY_COLUMN] == "body"
    assert letters == DEAD_LETTER_COLUMNS


def test_a_failed_upgrade_leaves_the_schema_1_ledger_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(SCHEMA_1_LEDGER.read_bytes())
    with sqlite3.connect(path) as conn:  # the upgrade's scratch name is taken: it fails
        conn.execute("CREATE TABLE payments_schema1 (x)")
    with pytest.raises(LedgerError, match="could not be upgraded from schema 1") as caught:
        Ledger(path)
    assert str(path) in str(caught.value)
    with sqlite3.connect(path) as conn:
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        payments = conn.execute("SELECT count(*) FROM payments").fetchone()
        indexes = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    assert schema == ("1",) and payments == (3,)
    assert "events_key_hash" in indexes and "key_index" not in indexes


def test_a_failed_outbox_upgrade_leaves_the_ledger_at_schema_2(old_ledger: Path) -> None:
    path = old_ledger
    with sqlite3.connect(path) as conn:  # the outbox upgrade's scratch name is taken
        conn.execute("CREATE TABLE outbox_schema2 (x)")
    left = "from schema 2 to 3 .*; it is left at schema 2. The upgrade copies the outbox"
    with pytest.raises(LedgerError, match=left):
        Ledger(path)
    with sqlite3.connect(path) as conn:
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        columns = [row[1] for row in conn.execute("PRAGMA table_info(outbox)")]
        outbox = conn.execute("SELECT seq FROM outbox ORDER BY seq").fetchall()
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    assert schema == ("2",) and columns == ["seq", "event_seq", "record"]
    assert outbox == [(1,), (2,), (3,), (4,), (5,)]
    assert "key_index" in tables and "payments_schema1" not in tables


def test_a_ledger_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(LedgerError, match="has schema 99, this exporter reads 4"):
        Ledger(path)


class _ReaderUntilFirstCheckpoint:
    """Stands in for the checkpointer's connection. A reader's snapshot keeps the first
    PASSIVE checkpoint from copying the newest frames, as a commit landing during it
    does under continuous ingest; the reader ends right after that first pass."""

    def __init__(self, conn: sqlite3.Connection, end_reader: Callable[[], object]) -> None:
        self.conn = conn
        self.end_reader = end_reader
        self.results: list[tuple[int, int, int]] = []

    def execute(self, sql: str) -> _Row:
        row = self.conn.execute(sql).fetchone()
        self.results.append(row)
        if len(self.results) == 1:
            self.end_reader()
        return _Row(row)

    def close(self) -> None:
        self.conn.close()


class _Row:
    def __init__(self, row: tuple[int, int, int]) -> None:
        self.row = row

    def fetchone(self) -> tuple[int, int, int]:
        return self.row


def _wal_resets(wal: Path) -> int:
    # The WAL header's checkpoint sequence number (bytes 12-15) counts the times SQLite
    # started the WAL over from its beginning.
    return int.from_bytes(wal.read_bytes()[12:16], "big")


def test_a_large_wal_is_rewound_although_the_first_checkpoint_falls_short(tmp_path: Path) -> None:
    # A PASSIVE checkpoint copies only the frames no reader or writer still needs. Under
    # continuous ingest it never copies the whole WAL, SQLite never starts the WAL over,
    # and the file grows without bound (11-40 MB in a minute of writes). The
    # checkpointer's second pass under the write lock copies the rest, so the next
    # commit rewinds the WAL.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(
        path, tuning=LedgerTuning(checkpoint_interval_seconds=3600.0, wal_restart_frames=16)
    )
    wal = tmp_path / "ledger.sqlite3-wal"
    batches = iter(range(1000))

    def commit() -> None:
        n = next(batches)
        ledger.commit([Submission([prepare(received(f"p{n}-{i}")) for i in range(50)])])

    reader = sqlite3.connect(path, isolation_level=None)
    try:
        commit()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # holds this snapshot
        commit()
        connection = _ReaderUntilFirstCheckpoint(
            ledger._checkpointer._conn, lambda: reader.execute("COMMIT")
        )
        ledger._checkpointer._conn = connection  # type: ignore[assignment]
        resets = _wal_resets(wal)
        size = wal.stat().st_size
        ledger._checkpointer.checkpoint()
        (_, frames, copied), *second = connection.results
        assert copied < frames, "the reader kept the first pass from copying everything"
        assert second, "the WAL was large: a second pass must run"
        commit()
        assert _wal_resets(wal) == resets + 1, "the commit after the checkpoint rewinds the WAL"
        assert wal.stat().st_size == size, "the rewound WAL reuses the file instead of growing"
    finally:
        reader.close()
        ledger.close()


async def test_a_joined_id_is_no_longer_remembered_as_waiting(committer: GroupCommitter) -> None:
    # Every payment that once arrived out of order would otherwise cost a lookup (and
    # memory) for good.
    await submit(committer, settled("p1"), batch_settled("b1"))
    await submit(committer, received("p1"), batch_created("b1"))
    assert committer.ledger._waiting_refs == set()
    assert committer.ledger.stats().waiting_for_join == 0


async def test_read_outbox_after_a_seq_reads_ahead_of_the_cursor(tmp_path: Path) -> None:
    # A forwarder reads its next batch while the current one is written: from the table
    # (handoff of one record) and from memory alike, never behind the sink's cursor.
    tuning = LedgerTuning(outbox_row_records=2, handoff_max_records=1)
    with writing(tmp_path / "ledger.sqlite3", tuning) as committer:
        ledger = committer.ledger
        await submit(committer, *(received(f"p{n}") for n in range(1, 7)))

        def seqs(limit: int, after: int | None) -> list[int]:
            return [row.seq for row in ledger.read_outbox(limit, after=after)]

        assert seqs(2, None) == [1, 2]
        assert seqs(2, 2) == [3, 4]  # from the table, mid-way through its rows
        assert seqs(10, 3) == [4, 5, 6]  # the last one from the handoff
        assert seqs(10, 6) == []
        assert await committer.call(functools.partial(ledger.mark_delivered, 4)) == 4
        assert seqs(10, 1) == [5, 6]  # behind the cursor: read from the cursor
        assert ledger.backlog == 2  # reading ahead delivered nothing
