"""InfluxDB line protocol: the golden lines, escaping, timestamps, and the fast renderer.

The shipping renderer (``to_line``) must write exactly what ``influxdb_client``'s
``Point`` writes (``point_line``), on golden records and on generated ones.
"""

from __future__ import annotations

import pytest
from conftest import BASE_MS
from hypothesis import given, settings
from hypothesis import strategies as st
from influx_fault_server import split_point
from store_helpers import GOLDEN, point_key

from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
    unique_time_ns,
)
from exporter.store.influx.line_protocol import point_line, to_line


@pytest.mark.parametrize(("record", "line"), GOLDEN, ids=lambda v: getattr(v, "key", ""))
def test_points_match_golden_line_protocol(record: StoreRecord, line: str) -> None:
    """Both renderers give the golden line: sorted tags and fields, escaping, i suffix, ns."""
    assert to_line(record) == line
    assert point_line(record) == line


def test_timestamp_is_the_event_millisecond_plus_a_per_event_offset() -> None:
    """The timestamp is nanoseconds inside the event's millisecond, fixed per event key."""
    record = GOLDEN[0][0]
    _, _, timestamp = split_point(to_line(record))
    assert timestamp // 1_000_000 == record.time_ms
    assert timestamp == unique_time_ns(record.time_ms, record.key)


def test_equal_events_in_one_millisecond_stay_distinct_and_a_replay_is_identical() -> None:
    """Different events with equal tags and time are two points; the same event is one."""
    one = PaymentRecord("payment:received:a", BASE_MS, "eip155:8453", "received", "a")
    two = PaymentRecord("payment:received:b", BASE_MS, "eip155:8453", "received", "b")
    key_one, key_two = point_key(one), point_key(two)
    assert key_one[0] == key_two[0]  # the same series
    assert key_one != key_two
    replay = PaymentRecord("payment:received:a", BASE_MS, "eip155:8453", "received", "a")
    assert to_line(replay) == to_line(one)


def test_integral_durations_stay_floats_and_money_stays_integer() -> None:
    """A whole-number duration is written without ``i`` (a float field), money with ``i``."""
    record = PaymentRecord(
        "payment:settled:p",
        BASE_MS,
        "eip155:8453",
        "settled",
        "p",
        amount_micro=2,
        fee_micro=0,
        settlement_ms=1500,
        verification_ms=float("nan"),
    )
    _, fields, _ = split_point(to_line(record))
    assert fields.split(",") == [
        "amount_micro=2i",
        "fee_micro=0i",
        'payment_id="p"',
        "settlement_ms=1500",
    ]


_text = st.text(max_size=12)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True)
_maybe_text = st.none() | _text
_maybe_int = st.none() | _ints
_maybe_float = st.none() | _floats
_time = st.integers(min_value=946_684_800_000, max_value=4_102_444_800_000)

_records = st.one_of(
    st.builds(
        PaymentRecord,
        _text,
        _time,
        _text,
        _text,
        _text,
        _maybe_text,
        _maybe_text,
        _maybe_int,
        _maybe_int,
        _maybe_float,
        _maybe_float,
        _maybe_text,
        _maybe_text,
    ),
    st.builds(
        BatchRecord,
        _text,
        _time,
        _text,
        _text,
        _text,
        _ints,
        _ints,
        _maybe_int,
        _maybe_int,
        _maybe_text,
    ),
    st.builds(RevenueRecord, _text, _time, _text, _text, _ints, _maybe_text),
    st.builds(WebsocketRecord, _text, _time, _ints),
)


@settings(max_examples=400, deadline=None)
@given(_records)
def test_fast_renderer_writes_exactly_what_point_writes(record: StoreRecord) -> None:
    """For any record, the shipping renderer and influxdb_client's Point agree byte for byte."""
    assert to_line(record) == point_line(record)
