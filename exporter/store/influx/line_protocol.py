"""InfluxDB line protocol for store records: the schema, escaping and timestamps.

Schema (docs/architecture.md section 6): measurements ``payment``, ``batch``, ``revenue`` and
``websocket``; tags only ``network``, ``status`` and ``kind`` (bounded values); ids and
addresses are fields (series cardinality); money is integer micro-units (``i``),
durations are floats. A point's timestamp is :func:`~exporter.records.point_time_ns`: the
event's millisecond plus the offset the ledger chose for it (unique per series and
millisecond, starting from a hash of the event's dedup key), so two events with equal tags
in the same millisecond stay two points while a replay of the outbox overwrites the same
point instead of doubling it.

The schema is written once as :class:`influxdb_client.Point` construction
(:func:`to_point`). Shipping renders the same bytes with :func:`to_line`, a renderer
unrolled per measurement: ``Point.to_line_protocol`` costs ~13 us a point here against
~3 us, and the encoding is most of what shipping costs. Tests hold the two byte-equal
on golden records and on generated ones. Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from ...records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    point_time_ns,
)


class PointLike(Protocol):
    """The part of :class:`influxdb_client.Point` used here (its methods are unannotated)."""

    def tag(self, key: str, value: str) -> PointLike: ...

    def field(self, field: str, value: object) -> PointLike: ...

    def time(self, time: int, write_precision: str) -> PointLike: ...

    def to_line_protocol(self) -> str: ...


_new_point = cast(Callable[[str], PointLike], Point)
_NS: str = WritePrecision.NS


def _int(value: int | None) -> int | None:
    return None if value is None else int(value)


def _float(value: float | None) -> float | None:
    # An integral float must stay a float field: ``1500`` without ``i`` is a float in
    # line protocol, but an int here would become ``1500i`` and conflict with the type
    # already stored.
    return None if value is None else float(value)


def to_point(record: StoreRecord) -> PointLike:
    """The InfluxDB point for one store record (docs/architecture.md section 6)."""
    point = _new_point(record.measurement)
    if isinstance(record, PaymentRecord):
        point.tag("network", record.network).tag("status", record.status)
        point.field("payment_id", record.payment_id)
        point.field("payer", record.payer).field("payee", record.payee)
        point.field("amount_micro", _int(record.amount_micro))
        point.field("fee_micro", _int(record.fee_micro))
        point.field("settlement_ms", _float(record.settlement_ms))
        point.field("verification_ms", _float(record.verification_ms))
        point.field("tx", record.tx).field("error", record.error)
    elif isinstance(record, BatchRecord):
        point.tag("network", record.network).tag("status", record.status)
        point.field("batch_id", record.batch_id)
        point.field("payment_count", int(record.payment_count))
        point.field("total_amount_micro", int(record.total_amount_micro))
        point.field("total_fees_micro", _int(record.total_fees_micro))
        point.field("gas_used", _int(record.gas_used))
        point.field("tx", record.tx)
    elif isinstance(record, RevenueRecord):
        point.tag("network", record.network).tag("kind", record.kind)
        point.field("amount_micro", int(record.amount_micro))
        point.field("payment_id", record.payment_id)
    else:
        point.field("count", int(record.count))
    return point.time(point_time_ns(record), _NS)


def point_line(record: StoreRecord) -> str:
    """The line protocol of :func:`to_point`, rendered by ``influxdb_client`` itself."""
    return to_point(record).to_line_protocol()


# --------------------------------------------------------------------------- fast path
# ``Point.to_line_protocol`` costs ~13 us a point here (sorting, type dispatch and
# escaping per field, every time); shipping at 50k+ points/s needs ~2.5 us. The
# renderer below writes the same bytes for the four record types: tags and fields in
# Point's (sorted) order, Point's escaping, integers with ``i``, floats as ``str`` minus
# a trailing ``.0``, non-finite floats and None left out. Tests compare it with
# :func:`point_line` on golden records and on generated ones (hypothesis).

_ESCAPE_TAG = str.maketrans(
    {",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
)
_ESCAPE_STRING = str.maketrans({'"': '\\"', "\\": "\\\\"})
_TAG_CACHE: dict[str, str] = {}
_TAG_CACHE_LIMIT = 4096  # tag values are few (networks, statuses, kinds)


def _tag(key: str, value: str) -> str:
    escaped = _TAG_CACHE.get(value)
    if escaped is None:
        escaped = value.translate(_ESCAPE_TAG)
        if escaped.endswith("\\"):
            escaped += " "
        if len(_TAG_CACHE) < _TAG_CACHE_LIMIT:
            _TAG_CACHE[value] = escaped
    return f",{key}={escaped}" if escaped else ""


def _q(value: str) -> str:
    # Quotes and backslashes are rare in ids and addresses: test before translating.
    if '"' in value or "\\" in value:
        return value.translate(_ESCAPE_STRING)
    return value


def _f(value: float) -> str | None:
    number = float(value)
    if not _isfinite(number):
        return None
    text = str(number)
    return text[:-2] if text.endswith(".0") else text


_isfinite = math.isfinite


def to_line(record: StoreRecord) -> str:
    """The line protocol of one record's point: the bytes :func:`point_line` gives, faster.

    Every record type has a required field, so a line is never empty. Fields come in
    Point's order (sorted by name); the code is unrolled per measurement because a
    generic loop over field specs costs about twice as much.
    """
    out: list[str] = []
    add = out.append
    text: str | None
    if isinstance(record, PaymentRecord):
        tags = _tag("network", record.network) + _tag("status", record.status)
        if (n := record.amount_micro) is not None:
            add(f"amount_micro={int(n)}i")
        if (s := record.error) is not None:
            add(f'error="{_q(s)}"')
        if (n := record.fee_micro) is not None:
            add(f"fee_micro={int(n)}i")
        if (s := record.payee) is not None:
            add(f'payee="{_q(s)}"')
        if (s := record.payer) is not None:
            add(f'payer="{_q(s)}"')
        add(f'payment_id="{_q(record.payment_id)}"')
        if (x := record.settlement_ms) is not None and (text := _f(x)) is not None:
            add(f"settlement_ms={text}")
        if (s := record.tx) is not None:
            add(f'tx="{_q(s)}"')
        if (x := record.verification_ms) is not None and (text := _f(x)) is not None:
            add(f"verification_ms={text}")
    elif isinstance(record, BatchRecord):
        tags = _tag("network", record.network) + _tag("status", record.status)
        add(f'batch_id="{_q(record.batch_id)}"')
        if (n := record.gas_used) is not None:
            add(f"gas_used={int(n)}i")
        add(f"payment_count={int(record.payment_count)}i")
        add(f"total_amount_micro={int(record.total_amount_micro)}i")
        if (n := record.total_fees_micro) is not None:
            add(f"total_fees_micro={int(n)}i")
        if (s := record.tx) is not None:
            add(f'tx="{_q(s)}"')
    elif isinstance(record, RevenueRecord):
        tags = _tag("kind", record.kind) + _tag("network", record.network)
        add(f"amount_micro={int(record.amount_micro)}i")
        if (s := record.payment_id) is not None:
            add(f'payment_id="{_q(s)}"')
    else:
        tags = ""
        add(f"count={int(record.count)}i")
    timestamp = point_time_ns(record)
    return f"{record.measurement}{tags} {','.join(out)} {timestamp}"


def analytics_lines(rows: Sequence[tuple[str, str, int, str, float]]) -> list[str]:
    """Line protocol of computed analytics: one point per (name, window, time)."""
    points: dict[tuple[str, str, int], list[str]] = {}
    for name, window, time_ms, field, value in rows:
        text = _f(value)
        if text is not None:
            points.setdefault((name, window, time_ms), []).append(f"{field}={text}")
    return [
        f"analytics{_tag('name', name)}{_tag('window', window)} {','.join(fields)} "
        f"{time_ms * 1_000_000}"
        for (name, window, time_ms), fields in points.items()
    ]


Encoder = Callable[[StoreRecord], str]
"""Renders one record as a line-protocol line (:func:`to_line` or :func:`point_line`)."""
