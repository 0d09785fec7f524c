"""Point timestamps never collide: the ledger gives each record an offset inside its
millisecond that no other point of its series has (docs/architecture.md section 6).

InfluxDB keeps one point per series and timestamp. The offset starts at a hash of the event
key and, when that is taken, probes to the next free one; the choice is stored with the
record, so export, replay and backfill render the same timestamp.
"""

from __future__ import annotations

import pickle
import random
import sqlite3
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from conftest import BASE_MS, received, settled
from influx_fault_server import split_point
from ledger_helpers import prepare

from exporter.ledger import Ledger, PreparedEvent, Submission
from exporter.records import (
    NS_PER_MS,
    PaymentRecord,
    decode_records,
    key_digest,
    unique_time_ns,
)
from exporter.store.influx.line_protocol import to_line


@cache
def colliding_payment_ids() -> tuple[str, str]:
    """Two payment ids whose ``payment:received`` keys hash to the same offset."""
    seen: dict[int, str] = {}
    for i in range(1_000_000):
        pid = f"collide-{i}"
        offset = key_digest(f"payment:received:{pid}") % NS_PER_MS
        if offset in seen:
            return seen[offset], pid
        seen[offset] = pid
    raise AssertionError("no collision found")


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """Two empty ledgers: two exporters fed the same stream."""
    first, second = Ledger(tmp_path / "a.sqlite3"), Ledger(tmp_path / "b.sqlite3")
    yield first, second
    first.close()
    second.close()


def lines_of(ledger: Ledger) -> list[str]:
    """The line protocol of every record in the ledger's outbox, in outbox order."""
    return [to_line(row.record) for row in ledger.read_outbox(1_000_000)]


def commit(ledger: Ledger, events: list[PreparedEvent], per_commit: int = 500) -> None:
    """Commit ``events`` in order, ``per_commit`` to a transaction."""
    for start in range(0, len(events), per_commit):
        ledger.commit([Submission(events[start : start + per_commit])])


def point_keys(lines: list[str]) -> set[tuple[str, int]]:
    """(series, timestamp) of each line: what InfluxDB keeps one point of."""
    return {(series, ts) for series, _, ts in map(split_point, lines)}


def test_two_events_whose_keys_hash_alike_get_two_points(ledgers: tuple[Ledger, Ledger]) -> None:
    """The second of two colliding keys probes to the next offset; neither overwrites."""
    ledger, _ = ledgers
    first, second = colliding_payment_ids()
    commit(ledger, [prepare(received(first)), prepare(received(second))])
    lines = lines_of(ledger)
    start = unique_time_ns(BASE_MS, f"payment:received:{first}")
    assert [split_point(line)[2] for line in lines] == [start, start + 1]
    assert len(point_keys(lines)) == 2


def test_ten_thousand_events_in_one_millisecond_are_ten_thousand_points(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    """One network, one status, one millisecond: every point keeps its own timestamp,
    inside that millisecond, whatever the collisions of their hashes (~50 expected)."""
    ledger, _ = ledgers
    events = [prepare(received(f"same-ms-{i}")) for i in range(10_000)]
    commit(ledger, events, per_commit=1_000)
    lines = lines_of(ledger)
    keys = point_keys(lines)
    assert len(keys) == 10_000
    assert all(ts // NS_PER_MS == BASE_MS for _, ts in keys)
    hashed = {unique_time_ns(BASE_MS, f"payment:received:same-ms-{i}") for i in range(10_000)}
    assert len(hashed) < 10_000  # the hash alone would have merged some


def _stream() -> list[dict[str, object]]:
    """A stream with many events per millisecond: receipts, settlements, both orders."""
    events: list[dict[str, object]] = []
    for i in range(3_000):
        ms = BASE_MS + i // 300  # 300 receipts per millisecond
        network = ("eip155:8453", "eip155:10")[i % 2]
        events.append(received(f"s{i}", ms, network=network))
        if i % 3 == 0:
            events.append(settled(f"s{i}", ms + 1))
    return events


def test_two_exporters_fed_one_stream_in_different_orders_write_the_same_points(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    """Without colliding keys the offset is the key's hash in both: the same lines, so a
    redundant pair writing to one InfluxDB overwrites rather than doubles."""
    one, other = ledgers
    stream = _stream()
    shuffled = list(stream)
    random.Random(5).shuffle(shuffled)
    commit(one, [prepare(event) for event in stream])
    commit(other, [prepare(event) for event in shuffled], per_commit=137)
    lines = lines_of(one)
    assert len(lines) == 4_000
    assert sorted(lines) == sorted(lines_of(other))
    series_ms = [(series, ts // NS_PER_MS) for series, _, ts in map(split_point, lines)]
    assert len(series_ms) > len(set(series_ms))  # many points share a series and millisecond


def test_with_colliding_keys_two_exporters_may_swap_the_two_offsets(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    """What docs/architecture.md section 6 says happens when two keys collide and two
    exporters see them in different orders: each exporter keeps both points apart, but
    the first to arrive takes the hash offset, so the two exporters swap the two
    timestamps; everything else is identical."""
    one, other = ledgers
    first, second = colliding_payment_ids()
    a, b = prepare(received(first)), prepare(received(second))
    commit(one, [a, b])
    commit(other, [b, a])
    start = unique_time_ns(BASE_MS, a.key)
    by_pid = {
        ledger_name: {
            split_point(line)[1].rsplit('payment_id="', 1)[1][:-1]: split_point(line)[2]
            for line in lines_of(ledger)
        }
        for ledger_name, ledger in (("one", one), ("other", other))
    }
    assert by_pid["one"] == {first: start, second: start + 1}
    assert by_pid["other"] == {second: start, first: start + 1}


def test_a_backfill_ledger_seeded_with_the_offsets_renders_every_point_as_before(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    """Backfill derives the records again in a scratch ledger seeded with the source's
    offsets: each record finds its own offset again, colliding keys included, whatever
    the order."""
    source, scratch = ledgers
    first, second = colliding_payment_ids()
    stream = [received(first), received(second), *_stream()[:900]]
    commit(source, [prepare(event) for event in stream])
    for rows in source.iter_point_times(batch=100):
        scratch.adopt_point_times(rows)
    commit(scratch, [prepare(event) for event in reversed(stream)])
    assert sorted(lines_of(scratch)) == sorted(lines_of(source))


def test_an_outbox_row_without_offsets_renders_the_hash_offset_it_was_written_with() -> None:
    """Rows written before offsets were stored hold records one value short: they decode
    with no offset and render the timestamp they always had."""
    old = pickle.dumps(
        [("payment", "payment:received:p1", BASE_MS, "eip155:8453", "received", "p1")],
        protocol=5,
    )
    (record,) = decode_records(old)
    assert isinstance(record, PaymentRecord) and record.time_offset_ns is None
    assert split_point(to_line(record))[2] == unique_time_ns(BASE_MS, "payment:received:p1")


def test_retention_forgets_the_offsets_of_old_points(tmp_path: Path) -> None:
    """Offsets of points older than the retention cut-off go; newer ones stay."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        commit(ledger, [prepare(received(f"r{i}", BASE_MS + i * 1000)) for i in range(10)])
        ledger.apply_retention(BASE_MS + 5_000)
    finally:
        ledger.close()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as conn:
        kept = [ms for (ms,) in conn.execute("SELECT time_ms FROM point_times ORDER BY 1")]
    assert kept == [BASE_MS + i * 1000 for i in range(5, 10)]


def test_probing_wraps_within_the_millisecond(tmp_path: Path) -> None:
    """Offsets taken up to the millisecond's last nanosecond: the probe wraps to its start,
    never into the next millisecond (Flux windows stay exact)."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    event = prepare(received("wraps"))
    start = unique_time_ns(BASE_MS, event.key) - BASE_MS * NS_PER_MS
    series = key_digest("payment\x00eip155:8453\x00received") - (1 << 63)
    try:
        ledger.adopt_point_times(
            [(BASE_MS, series, offset, offset) for offset in range(start, NS_PER_MS)]
            + [(BASE_MS, series, 0, -1), (BASE_MS, series, 1, -1)]
        )
        commit(ledger, [event])
        (line,) = lines_of(ledger)
    finally:
        ledger.close()
    assert split_point(line)[2] == BASE_MS * NS_PER_MS + 2
