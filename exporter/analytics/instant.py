"""The one reading of an instant the operator names: the API's ``?at=`` and the command
line's ``--at``, ``--since`` and ``--until`` accept exactly the same forms.

An instant is epoch milliseconds (ASCII digits) or an RFC 3339 date-time with its UTC
offset (``2026-01-01T00:00:00Z``, ``2026-01-01T02:00:00.250+02:00``; ``t`` or a space may
stand for ``T``, ``z`` for ``Z``). A fraction finer than a millisecond is truncated toward
the past. Instants run from the Unix epoch to the last millisecond of 9999, the range in
which Python can name the UTC date of every analytics bucket.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

MAX_INSTANT_MS: Final = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: the last instant whose UTC date Python can name."""

FORMS: Final = "epoch milliseconds or an RFC 3339 time such as 2026-01-01T00:00:00Z"
"""The accepted forms, as error messages and help texts name them."""

_EPOCH_MS = re.compile(r"-?[0-9]+")  # ASCII: str.isdigit() also admits "²"
_RFC3339 = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]"
    r"(?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.(?P<fraction>[0-9]+))?"
    r"(?:(?P<utc>[Zz])|(?P<sign>[+-])(?P<hours>[0-9]{2}):(?P<minutes>[0-9]{2}))"
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class InstantError(ValueError):
    """An instant that is not one of the accepted forms, or out of range; ``str()``
    names the option or parameter and what it accepts."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def parse_instant(text: str, option: str) -> int:
    """Epoch milliseconds of ``text``, or :class:`InstantError` naming ``option``.

    ``option`` is how the caller spells the value: ``--at`` on the command line, ``at``
    in a query string.
    """
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    if _EPOCH_MS.fullmatch(text):
        at_ms = int(text) if len(text) <= 20 else -1  # int() refuses 4,300 digits and more
    else:
        at_ms = _rfc3339_ms(text, option, shown)
    if not 0 <= at_ms <= MAX_INSTANT_MS:
        raise InstantError(
            option,
            f"must be from 1970-01-01 to 9999-12-31 (epoch ms 0 to {MAX_INSTANT_MS}), "
            f"got {shown}",
        )
    return at_ms


def _rfc3339_ms(text: str, option: str, shown: str) -> int:
    match = _RFC3339.fullmatch(text)
    if match is None:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9:.]+", text):
            raise InstantError(option, f"{shown} needs a UTC offset (e.g. Z)")
        raise InstantError(option, f"expected {FORMS}, got {shown}")
    offset = timedelta(0)
    if not match["utc"]:
        hours, minutes = int(match["hours"]), int(match["minutes"])
        if hours > 23 or minutes > 59:
            raise InstantError(option, f"{shown} has a UTC offset beyond -23:59..+23:59")
        offset = timedelta(hours=hours, minutes=minutes) * (-1 if match["sign"] == "-" else 1)
    try:
        local = datetime.fromisoformat(f"{match['date']}T{match['time']}")
    except ValueError as error:  # a month, day, hour, minute or second out of its range
        raise InstantError(option, f"{shown} is not a valid time: {error}") from None
    moment = local.replace(tzinfo=timezone(offset))
    fraction_ms = int((match["fraction"] or "0")[:3].ljust(3, "0"))
    return (moment - _EPOCH) // timedelta(seconds=1) * 1000 + fraction_ms
