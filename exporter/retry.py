"""When to try again: exponential backoff with jitter, and ``Retry-After`` headers.

Pure functions (no clock, no sleeping), shared by the store forwarder, the InfluxDB store
and the ``simulate`` client, so that every retry in the exporter follows one rule.

Backoff uses *equal* jitter: the pause lies between half and all of the exponential
delay. Full jitter (anywhere from zero) spreads many clients a little better, but can
retry a store that just failed almost at once, again and again; equal jitter keeps a
floor that grows with each failure while still parting clients that failed together.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from datetime import UTC

MAX_RETRY_AFTER_SECONDS = 3600.0
"""The longest ``Retry-After`` the exporter honours; a longer one is shortened to this."""

_MAX_EXPONENT = 1000  # 2.0 ** 1024 overflows; any cap is reached long before this
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def backoff_seconds(
    attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """The pause before retry number ``attempt`` (0 for the first retry), with equal jitter.

    The delay doubles from ``base`` per attempt up to ``cap``; the pause is drawn
    uniformly from its upper half, using ``rng`` (the ``random`` module's generator
    when None).
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, not {attempt}")
    if not (base > 0 and cap > 0):
        raise ValueError(f"base and cap must be > 0, not base={base} cap={cap}")
    delay = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    return (rng or random).uniform(delay / 2, delay)


def parse_retry_after(
    value: str | None, now: float, *, default: float, cap: float = MAX_RETRY_AFTER_SECONDS
) -> float:
    """Seconds to wait as a ``Retry-After`` header says, at most ``cap``.

    Accepts delta seconds (``"7"``, ``"0.5"``) and an HTTP date, measured from ``now``
    (Unix seconds); a date already past means 0. An absent header, or one that is
    neither form (a negative number, ``"soon"``, ``"inf"``), gives ``default``.
    """
    text = (value or "").strip()
    if _DELTA_SECONDS.fullmatch(text):
        return min(float(text), cap)  # too many digits for a float: inf, so the cap
    seconds = _seconds_until_date(text, now) if text else None
    if seconds is None or not math.isfinite(seconds):
        return min(default, cap)
    return min(max(seconds, 0.0), cap)


def _seconds_until_date(text: str, now: float) -> float | None:
    """Seconds from ``now`` to the HTTP date ``text``; None when it is not a date."""
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": a time in UTC with no source zone named
            when = when.replace(tzinfo=UTC)
        return when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
