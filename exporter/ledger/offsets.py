"""Point offsets: the sub-millisecond part of each store record's timestamp, unique per
series and millisecond (docs/architecture.md section 6)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence

from ..records import NS_PER_MS, StoreRecord, key_digest, series_of
from .rows import insert_chunk, row_chunks

log = logging.getLogger(__name__)

# Point offsets (docs/architecture.md section 6). Every record's point starts at the
# offset its key hashes to; the offsets taken go to point_times in the same multi-row
# statements as other rows, and the primary key refuses a statement holding a taken one
# (probability about 10^-6 per pair of records of one series and millisecond). Only
# then are that statement's records placed one by one: each probes upwards (wrapping
# within the millisecond) to the first offset not taken, or to its own when it was
# emitted before.
_INSERT_POINT_TIMES = "INSERT INTO point_times (time_ms, series, offset_ns, key_hash)"
_PROBE_SPAN = 64
_TAKEN_IN = (
    "SELECT offset_ns, key_hash FROM point_times WHERE time_ms = ? AND series = ?"
    " AND offset_ns >= ? AND offset_ns < ? ORDER BY offset_ns"
)
_SERIES_IDS: dict[str, int] = {}
_SERIES_IDS_LIMIT = 4096  # series are few (measurements x networks x statuses)
_SIGN = 1 << 63


def _series_id(series: str) -> int:
    """A signed 64-bit hash of a series identity (two series sharing it only probe more)."""
    found = _SERIES_IDS.get(series)
    if found is None:
        found = key_digest(series) - _SIGN
        if len(_SERIES_IDS) < _SERIES_IDS_LIMIT:
            _SERIES_IDS[series] = found
    return found


def take_offsets(
    cur: sqlite3.Cursor, records: Sequence[StoreRecord], digests: Mapping[str, int]
) -> None:
    """Give each record a point offset no other record of its series and millisecond has.

    Sets ``time_offset_ns`` of every record and stores the offsets taken, in this
    transaction; records are placed in order, so the same records in the same order
    always get the same offsets. ``digests`` holds :func:`key_digest` of keys known
    already (the dedup key hash is the same digest); others are computed.
    """
    rows: list[tuple[int, int, int, int]] = []
    series_ids = _SERIES_IDS  # looked up here first: a call per record costs more
    for record in records:
        digest = digests.get(record.key)
        if digest is None:
            digest = key_digest(record.key)
        offset = record.time_offset_ns = digest % NS_PER_MS
        series = series_of(record)
        series_id = series_ids.get(series)
        if series_id is None:
            series_id = _series_id(series)
        rows.append((record.time_ms, series_id, offset, digest - _SIGN))
    for start, end in row_chunks(cur, rows):
        try:
            insert_chunk(cur, _INSERT_POINT_TIMES, rows[start:end], "")
        except sqlite3.IntegrityError:  # the statement is undone, the transaction goes on
            for index in range(start, end):
                records[index].time_offset_ns = _probe(cur, *rows[index])


def _probe(cur: sqlite3.Cursor, time_ms: int, series: int, start: int, key_hash: int) -> int:
    """The first offset from ``start`` (wrapping) that is free or already this key's."""
    offset, wrapped = start, False
    while True:
        # The offsets taken in the next _PROBE_SPAN: usually none or one.
        span_end = min(offset + _PROBE_SPAN, NS_PER_MS)
        for found, owner in cur.execute(_TAKEN_IN, (time_ms, series, offset, span_end)):
            if found > offset:
                break  # a gap: ``offset`` is free
            if owner == key_hash:
                return int(found)  # emitted before: its own offset again
            offset = found + 1
        else:
            if offset == span_end and offset < NS_PER_MS and not (wrapped and offset >= start):
                continue  # the whole span is taken: look further
        if wrapped and offset >= start:
            # Every offset of this series and millisecond is taken: a million points
            # with one timestamp each. This one shares its hash offset with another.
            log.warning(
                "no free point offset in this millisecond; the point may overwrite another",
                extra={"time_ms": time_ms},
            )
            return start
        if offset < NS_PER_MS:
            cur.execute(
                f"{_INSERT_POINT_TIMES} VALUES (?, ?, ?, ?)", (time_ms, series, offset, key_hash)
            )
            return offset
        offset, wrapped = 0, True
