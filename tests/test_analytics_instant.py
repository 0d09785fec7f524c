"""One reading of an instant for the API's ``?at=`` and the command line's options."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.analytics.instant import MAX_INSTANT_MS, InstantError, parse_instant


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("0", 0),
        ("1767225600000", 1_767_225_600_000),
        (str(MAX_INSTANT_MS), MAX_INSTANT_MS),
        ("2026-01-01T00:00:00Z", 1_767_225_600_000),
        ("2026-01-01t00:00:00z", 1_767_225_600_000),
        ("2026-01-01 00:00:00Z", 1_767_225_600_000),
        ("2026-01-01T00:00:00.001Z", 1_767_225_600_001),
        ("2026-01-01T00:00:00.1Z", 1_767_225_600_100),
        ("2026-01-01T00:00:00.0019999Z", 1_767_225_600_001),  # finer than ms: truncated
        ("2026-01-01T02:00:00+02:00", 1_767_225_600_000),
        ("2025-12-31T18:30:00-05:30", 1_767_225_600_000),
        ("2026-01-01T00:00:00-00:00", 1_767_225_600_000),
        ("1970-01-01T00:00:00Z", 0),
        ("9999-12-31T23:59:59.999Z", MAX_INSTANT_MS),
        ("1970-01-01T01:00:00+01:00", 0),
    ],
)
def test_accepted_forms(text: str, ms: int) -> None:
    assert parse_instant(text, "--at") == ms


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("yesterday", "--at: expected epoch milliseconds or an RFC 3339 time"),
        ("²", "--at: expected epoch milliseconds"),
        ("١٢٣", "--at: expected epoch milliseconds"),
        ("1.5", "--at: expected epoch milliseconds"),
        ("2026-01-01", "--at: expected epoch milliseconds"),
        ("2026-01-01T00:00Z", "--at: expected epoch milliseconds"),  # no seconds
        ("20260101T000000Z", "--at: expected epoch milliseconds"),  # ISO basic, not RFC 3339
        ("2026-01-01T00:00:00", "--at: '2026-01-01T00:00:00' needs a UTC offset (e.g. Z)"),
        ("2026-01-01T00:00:00+0200", "--at: expected epoch milliseconds"),
        ("2026-02-30T00:00:00Z", "--at: '2026-02-30T00:00:00Z' is not a valid time"),
        ("2026-01-01T00:00:60Z", "is not a valid time"),
        ("2026-01-01T00:00:00+24:00", "UTC offset beyond -23:59..+23:59"),
        ("-1", "--at: must be from 1970-01-01 to 9999-12-31"),
        (str(MAX_INSTANT_MS + 1), "--at: must be from 1970-01-01 to 9999-12-31"),
        ("9" * 5000, "--at: must be from 1970-01-01 to 9999-12-31"),
        ("1969-12-31T23:59:59.999Z", "--at: must be from 1970-01-01"),
        ("9999-12-31T23:59:59.999-00:01", "--at: must be from 1970-01-01"),
        ("0001-01-01T00:00:00Z", "--at: must be from 1970-01-01"),
    ],
)
def test_refused_forms_name_the_option(text: str, says: str) -> None:
    with pytest.raises(InstantError) as refused:
        parse_instant(text, "--at")
    assert says in str(refused.value)
    assert refused.value.option == "--at"
    assert isinstance(refused.value, ValueError)
    assert len(str(refused.value)) < 200


@given(st.integers(0, MAX_INSTANT_MS))
def test_epoch_ms_and_its_rfc3339_text_read_the_same(ms: int) -> None:
    seconds, millis = divmod(ms, 1000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    text = f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"
    assert parse_instant(str(ms), "at") == parse_instant(text, "at") == ms
