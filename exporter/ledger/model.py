"""The values passed in and out of the ledger: prepared events, outcomes and metric effects."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..events import Event, event_identity, join_ref
from .schema import key_hash


class Outcome(Enum):
    """What the ledger did with one valid event."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3x more to build
class PreparedEvent:
    """A validated event with its dedup key, canonical body and the bytes it arrived as.

    The key's hash and the join reference are worked out where the event is prepared
    (the receiver's event loop), not in the commit: the one ledger writer is what every
    acknowledgement waits for. Build one with :meth:`of`, or :meth:`keyed` for a key
    given from elsewhere.
    """

    event: Event
    key: str
    body: bytes
    raw: bytes
    key_hash: int
    """:func:`~exporter.ledger.schema.key_hash` of ``key`` (a test makes keys collide)."""
    ref: str | None
    """The payment or batch id the event joins on (:func:`join_ref`)."""

    @classmethod
    def of(cls, event: Event, raw: bytes | None = None) -> PreparedEvent:
        """``event`` with its own dedup key and canonical body; ``raw``: the bytes it
        arrived as (None: it was built here, and its body stands for them)."""
        ref, body, key = event_identity(event)
        return cls(event, key, body, raw or body, key_hash(key), ref)

    @classmethod
    def keyed(cls, event: Event, key: str, body: bytes, raw: bytes) -> PreparedEvent:
        """``event`` under a key and body given from elsewhere (a backfill re-sends the
        keys a ledger stored)."""
        return cls(event, key, body, raw, key_hash(key), join_ref(event))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input that was refused, kept with its raw bytes for inspection."""

    reason: str
    error: str
    raw: bytes
    key: str | None = None
    received_at: int | None = None
    """Epoch ms it was first received (None: now); ``recover`` keeps the original."""
    raw_size: int | None = None
    """The size of the input as received when ``raw`` is only its head (None: whole)."""


@dataclass(slots=True)
class PendingChange:
    """``facilitator_pending_payments{network}`` moves by ``delta``."""

    network: str
    delta: int


@dataclass(slots=True)
class TerminalPayment:
    """A settled or failed payment event whose join is complete."""

    network: str
    status: str  # success | failed
    amount_micro: int = 0
    fee_micro: int = 0
    settlement_ms: float | None = None


@dataclass(slots=True)
class BatchGas:
    """A settled batch's gas, on the network its ``batch:created`` named."""

    network: str
    gas_used: int


@dataclass(slots=True)
class WebsocketCount:
    """The newest ``websocket:clients`` count so far."""

    count: int


@dataclass(slots=True)
class NewEvent:
    """A deduplicated event was committed."""

    type: str


@dataclass(slots=True)
class JoinTimeout:
    """An event was released without its join partner, past the join timeout."""

    type: str


Effect = PendingChange | TerminalPayment | BatchGas | WebsocketCount | NewEvent | JoinTimeout
"""A change to the exported metrics caused by a commit.

Effects are built per event on the ledger writer, so they are plain (not frozen)
dataclasses: a frozen one costs several times as much to build.
"""


@dataclass(slots=True)
class Submission:
    """One request's worth of work for a commit."""

    events: list[PreparedEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    pending_settlements: list[str] = field(default_factory=list)
    """Payment ids whose settle was answered as not final (``settlement_pending``): each
    ends as failed (``settlement_timeout``) unless it ends before the settlement
    deadline (:meth:`~exporter.ledger.Ledger.release_overdue_settlements`)."""
    derived: bool = False
    """The events were derived from observed verify/settle exchanges (proxy mode): one
    whose stage the ledger already holds, under any body, or that ends a payment that has
    ended, is a duplicate (a replayed exchange records nothing new), never a conflict."""


@dataclass(slots=True)
class SubmissionResult:
    """Per-event outcomes of a committed submission, and its metric effects."""

    outcomes: list[Outcome]
    effects: list[Effect]


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """Counts for ``/readyz`` and gauges."""

    events: int
    backlog: int
    waiting_for_join: int
    dead_letters: int


@dataclass(frozen=True, slots=True)
class GaugeSnapshot:
    """Gauge values restored from the ledger at startup."""

    pending_by_network: dict[str, int]
    websocket_clients: int | None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A stored dead letter."""

    id: int
    received_at: int
    reason: str
    error: str
    key: str | None
    raw: bytes
    raw_size: int | None = None
    """The size of the input as received when ``raw`` is only its head (None: whole)."""
