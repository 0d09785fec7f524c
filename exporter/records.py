"""Store records: events enriched with their joined payment or batch, ready for any store.

Records are plain slotted dataclasses (not frozen: frozen construction costs several
times more, and records are built and decoded once per event on the hot path).

The ledger writes one record per event once its join is complete (docs/architecture.md section 6),
so every store holds self-contained rows and every analytics query is a filter plus an
aggregate. Records travel through the ledger's outbox as pickled tuples of their values
(:func:`encode_records`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, ClassVar, Protocol

NS_PER_MS = 1_000_000
"""Nanosecond offsets inside one millisecond: a point's timestamp is ``ms * 10^6 + offset``."""


def key_digest(key: str) -> int:
    """The unsigned 64-bit blake2b digest of an event key, where its offset probing starts."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def unique_time_ns(time_ms: int, key: str) -> int:
    """The nanosecond timestamp inside ``time_ms`` where the point of event ``key`` starts
    looking for a free slot: ``time_ms * 10^6 + key_digest(key) % 10^6``.

    InfluxDB merges points with equal series and timestamp; deriving the sub-millisecond
    part from the event's dedup key keeps a replay of the same event on the same point.
    Two keys of one series and millisecond land here on the same offset with probability
    10^-6 per pair, so the ledger probes from here to a free offset and stores the one it
    chose with the record (:attr:`PaymentRecord.time_offset_ns`, :func:`point_time_ns`).
    """
    return time_ms * NS_PER_MS + key_digest(key) % NS_PER_MS


def point_time_ns(record: StoreRecord) -> int:
    """The timestamp of ``record``'s point: its millisecond plus the offset the ledger chose.

    A record without an offset (an outbox row written before offsets were stored) has
    the hash offset of :func:`unique_time_ns`, the timestamp it was written with before.
    """
    offset = record.time_offset_ns
    if offset is None:
        return unique_time_ns(record.time_ms, record.key)
    return record.time_ms * NS_PER_MS + offset


def series_of(record: StoreRecord) -> str:
    """The identity of ``record``'s InfluxDB series: measurement and tag values.

    Distinct series give distinct strings (the separator cannot occur in a tag value the
    ledger accepts); the ledger hashes it to find points that would share a timestamp.
    """
    # Exact types: records are never subclassed, and this runs per record in the commit.
    if type(record) is PaymentRecord or type(record) is BatchRecord:
        return f"{record.measurement}\x00{record.network}\x00{record.status}"
    if type(record) is RevenueRecord:
        return f"{record.measurement}\x00{record.network}\x00{record.kind}"
    return record.measurement


@dataclass(slots=True)
class PaymentRecord:
    """One payment lifecycle event with the joined ``payment:received`` fields."""

    measurement: ClassVar[str] = "payment"
    key: str
    time_ms: int
    network: str
    status: str  # received | verified | settled | failed
    payment_id: str
    payer: str | None = None
    payee: str | None = None
    amount_micro: int | None = None
    fee_micro: int | None = None
    settlement_ms: float | None = None
    verification_ms: float | None = None
    tx: str | None = None
    error: str | None = None
    time_offset_ns: int | None = None
    """The point's nanoseconds inside ``time_ms`` (0..999,999), chosen by the ledger so that no
    other point of its series and millisecond has them; None in rows from before."""


@dataclass(slots=True)
class BatchRecord:
    """One batch event with the joined ``batch:created`` fields."""

    measurement: ClassVar[str] = "batch"
    key: str
    time_ms: int
    network: str
    status: str  # created | settled
    batch_id: str
    payment_count: int
    total_amount_micro: int
    total_fees_micro: int | None = None
    gas_used: int | None = None
    tx: str | None = None
    time_offset_ns: int | None = None


@dataclass(slots=True)
class RevenueRecord:
    """Revenue beyond facilitator fees, by kind (``gas_sponsorship`` or ``premium``)."""

    measurement: ClassVar[str] = "revenue"
    key: str
    time_ms: int
    network: str
    kind: str
    amount_micro: int
    payment_id: str | None = None
    time_offset_ns: int | None = None


@dataclass(slots=True)
class WebsocketRecord:
    """The facilitator's connected WebSocket client count at an instant."""

    measurement: ClassVar[str] = "websocket"
    key: str
    time_ms: int
    count: int
    time_offset_ns: int | None = None


StoreRecord = PaymentRecord | BatchRecord | RevenueRecord | WebsocketRecord

_BY_MEASUREMENT: dict[str, type[StoreRecord]] = {
    cls.measurement: cls for cls in (PaymentRecord, BatchRecord, RevenueRecord, WebsocketRecord)
}


# Each record class's field values as a tuple, read in C.
_FIELD_VALUES: dict[type[StoreRecord], Callable[[StoreRecord], tuple[Any, ...]]] = {
    cls: attrgetter(*(f.name for f in fields(cls))) for cls in _BY_MEASUREMENT.values()
}
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _values(record: StoreRecord) -> tuple[Any, ...]:
    return (record.measurement, *_FIELD_VALUES[type(record)](record))


def record_to_json(record: StoreRecord) -> str:
    """A readable form of a record, ``[measurement, field values...]``, for dead letters."""
    return _ENCODER.encode(_values(record))


def encode_records(records: Iterable[StoreRecord]) -> bytes:
    """Serialise records for one outbox row.

    The outbox is private to the exporter and on the hot path, so records travel as one
    pickled list of tuples of plain values (str, int, float, None): several times faster
    than JSON both ways, and one call per commit rather than one per record. Only the
    exporter writes these rows.
    """
    values = _FIELD_VALUES  # :func:`_values` inlined: one call fewer per record
    return pickle.dumps(
        [(record.measurement, *values[type(record)](record)) for record in records], protocol=5
    )


def decode_records(blob: bytes) -> list[StoreRecord]:
    """Inverse of :func:`encode_records`."""
    return [_BY_MEASUREMENT[measurement](*values) for measurement, *values in pickle.loads(blob)]


def upgrade_schema_2_record(blob: bytes) -> bytes:
    """A schema 2 outbox row (one pickled record tuple) as a schema 3 row of one record."""
    return pickle.dumps([pickle.loads(blob)], protocol=5)


@dataclass(slots=True)  # not frozen: built per record on the hot path, 3x cheaper
class OutboxRow:
    """A record waiting for delivery, numbered in commit order."""

    seq: int
    record: StoreRecord


@dataclass(frozen=True, slots=True)
class StoreRejection:
    """A record the store refused for good (a poison record): kept as a dead letter."""

    record: StoreRecord
    reason: str


class Store(Protocol):
    """A time-series sink fed from the ledger outbox.

    ``write`` must be idempotent per record key: after a crash the same rows may be
    written again, and the store must then hold each once.
    """

    name: str

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Persist ``records``, returning those refused for good (stored as dead letters).

        Raise a :class:`~exporter.errors.StoreError` when nothing or not everything could
        be stored for a reason that may pass; all of ``records`` are then retried. Its
        message names the store's address or file (never a URL's user info) and the way
        out, since the forwarder logs it and ``/readyz`` shows it as it is.
        """
        ...

    async def close(self) -> None:
        """Release the store's resources."""
        ...
