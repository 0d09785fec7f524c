"""One commit's writes: dedup, the payment and batch joins, the outbox rows.

:class:`TransactionWriter` applies a commit's events inside an open transaction and
collects their outcomes and metric effects.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from ..events import (
    UNKNOWN_PAYMENT_ID,
    BatchCreated,
    BatchSettled,
    Event,
    PaymentFailed,
    PaymentReceived,
    PaymentSettled,
    PaymentVerified,
    WebsocketClients,
    parse_event,
    to_micro,
)
from ..networks import UNKNOWN_NETWORK
from ..records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
    encode_records,
)
from .model import (
    BatchGas,
    DeadLetter,
    Effect,
    JoinTimeout,
    NewEvent,
    Outcome,
    PendingChange,
    PreparedEvent,
    TerminalPayment,
    WebsocketCount,
)
from .offsets import take_offsets
from .rows import insert_rows
from .schema import EMITTED, EVENTS_COLUMNS, EVENTS_TABLE, WAITING, EventRow, payment_id_hash

log = logging.getLogger(__name__)

UNKNOWN_PARTY = "unknown"
"""Payer and payee of a settlement released without its payment (nothing names them)."""


@dataclass(slots=True)
class RowNumbers:
    """The next seq of ``events`` and ``outbox`` and the next ``payments`` id.

    The one writer numbers the rows it appends itself, so that a commit needs no query
    to learn them (each SQLite call hands the GIL away and must wait to get it back).
    A rolled-back transaction leaves them as they were: numbers are taken for good
    only when a commit succeeds.
    """

    event_seq: int
    outbox_seq: int
    payment_id: int


# What a commit looks up, each as one row of JSON rather than a row per match (each
# row is a step of SQLite, and each step gives the GIL away). ``_LOOKUP_ALL`` reads all
# three in one statement.
def _found_keys(param: str) -> str:
    return (
        "(SELECT json_group_array(json_array(key_hash, key, CAST(body AS TEXT)))"
        " FROM events WHERE seq IN ("
        f" SELECT seq FROM key_index WHERE key_hash IN (SELECT value FROM json_each({param}))"
        " UNION ALL SELECT seq FROM temp.recent_keys"
        f" WHERE key_hash IN (SELECT value FROM json_each({param}))))"
    )


def _found_payments(param: str) -> str:
    return (
        "(SELECT json_group_array(json_array(id, payment_id, network, payer, payee,"
        " amount_micro, received, terminal))"
        f" FROM payments WHERE id_hash IN (SELECT value FROM json_each({param})))"
    )


def _found_batches(param: str) -> str:
    return (
        "(SELECT json_group_array(json_array(batch_id, network, payment_count,"
        " total_amount_micro))"
        f" FROM batches WHERE batch_id IN (SELECT value FROM json_each({param})))"
    )


_INSERT_EVENTS = f"INSERT INTO {EVENTS_TABLE} ({', '.join(EVENTS_COLUMNS)})"
_LOOKUP_ALL = f"SELECT {_found_keys('?1')}, {_found_payments('?2')}, {_found_batches('?3')}"
_UNSIGNED_64 = 2**64 - 1
_LOOKUP_PAYMENTS = f"SELECT {_found_payments('?')}"
_LOOKUP_BATCHES = f"SELECT {_found_batches('?')}"


def _payment_id_hashes(payment_ids: set[str]) -> str:
    return orjson.dumps(
        sorted({payment_id_hash(payment_id) for payment_id in payment_ids})
    ).decode()


class TransactionWriter:
    """Applies events inside an open transaction, collecting outcomes and metric effects.

    Writes are gathered and sent in bulk by :meth:`flush` (``executemany``), and the
    stored keys and payments the transaction's events refer to are read with one query
    each up front (:meth:`load`): per-event statements cost more in Python than SQLite
    spends on the rows.
    """

    def __init__(
        self,
        cur: sqlite3.Cursor,
        now_ms: int,
        waiting_refs: set[str],
        numbers: RowNumbers,
        outbox_row_records: int,
    ) -> None:
        self.cur = cur
        self._outbox_row_records = outbox_row_records
        self.waiting_refs = waiting_refs
        self.now = now_ms
        self.effects: list[Effect] = []
        self.emitted: list[tuple[int, StoreRecord]] = []
        """(outbox seq, record) of every record written to the outbox, in order."""
        self._outbox: list[tuple[int, StoreRecord]] = []  # (event seq, record)
        # key_digest of the keys of events added here: their signed dedup hash, unsigned.
        self._key_digests: dict[str, int] = {}
        # Keys already stored, by key hash: those loaded up front plus the writer's own.
        self._stored: dict[int, list[tuple[str, bytes]]] = {}
        # Rows for ``events``, inserted at flush; numbered here (one writer at a time),
        # consecutively from ``_rows_from_seq``.
        self._event_rows: list[EventRow] = []
        self._numbers = numbers
        self._rows_from_seq = numbers.event_seq
        self.added = 0
        """Events written to ``events`` (and recent_keys) so far."""
        self._current_seq = 0
        self._current_waits = False
        # Seqs of the rows in ``_event_rows`` written as waiting, by the ref they wait for.
        self._waits_in_rows: dict[str, list[int]] = {}
        # Refs no stored row waits for: they began waiting in this transaction.
        self._refs_new_here: set[str] = set()
        # Join state by payment id (None: no row), as of this writer's own changes.
        self._payments: dict[str, _Payment | None] = {}
        self._changed_payments: dict[str, _Payment] = {}
        # Row ids of the payments this writer read or numbered.
        self._payment_rows: dict[str, int] = {}
        # Batches by id (None: no row), as of this writer's own changes, and those it
        # created, inserted at flush.
        self._batches: dict[str, _Batch | None] = {}
        self._created_batches: dict[str, _Batch] = {}

    def load(self, events: Sequence[PreparedEvent]) -> None:
        """Read what ``events`` will look up, in one query."""
        if not events:
            return
        # In index order: each probe then finds its pages where the one before it left them.
        hashes = sorted([prepared.key_hash for prepared in events])
        payment_ids: set[str] = set()
        batch_ids: set[str] = set()
        for prepared in events:
            if (ref := prepared.ref) is not None:
                kind = prepared.event["type"]
                (batch_ids if kind.startswith("batch:") else payment_ids).add(ref)
        keys, payments, batches = self.cur.execute(
            _LOOKUP_ALL,
            (
                orjson.dumps(hashes).decode(),
                _payment_id_hashes(payment_ids),
                orjson.dumps(sorted(batch_ids)).decode(),
            ),
        ).fetchone()
        for key_hash, key, body in orjson.loads(keys):
            self._stored.setdefault(key_hash, []).append((key, body.encode()))
        self._take_payments(payment_ids, payments)
        self._take_batches(batch_ids, batches)

    def take_effects(self) -> list[Effect]:
        """The metric effects gathered since the last call."""
        effects, self.effects = self.effects, []
        return effects

    def _load_payments(self, payment_ids: set[str]) -> None:
        wanted = payment_ids.difference(self._payments)
        if wanted:
            (found,) = self.cur.execute(_LOOKUP_PAYMENTS, (_payment_id_hashes(wanted),)).fetchone()
            self._take_payments(wanted, found)

    def _take_payments(self, wanted: set[str], found: str) -> None:
        self._payments.update(dict.fromkeys(wanted))
        for row_id, payment_id, *values in orjson.loads(found):
            if payment_id in wanted:  # not another id of the same hash
                self._payments[payment_id] = _Payment(*values)
                self._payment_rows[payment_id] = row_id

    def _load_batches(self, batch_ids: set[str]) -> None:
        wanted = batch_ids.difference(self._batches)
        if wanted:
            (found,) = self.cur.execute(
                _LOOKUP_BATCHES, (orjson.dumps(sorted(wanted)).decode(),)
            ).fetchone()
            self._take_batches(wanted, found)

    def _take_batches(self, wanted: set[str], found: str) -> None:
        self._batches.update(dict.fromkeys(wanted))
        for batch_id, *values in orjson.loads(found):
            self._batches[batch_id] = _Batch(*values)

    def _batch(self, batch_id: str) -> _Batch | None:
        if batch_id not in self._batches:
            self._load_batches({batch_id})
        return self._batches[batch_id]

    def _payment(self, payment_id: str) -> _Payment | None:
        if payment_id not in self._payments:
            self._load_payments({payment_id})
        return self._payments[payment_id]

    def _set_payment(self, payment_id: str, payment: _Payment) -> None:
        self._payments[payment_id] = payment
        self._changed_payments[payment_id] = payment

    def add(self, prepared: PreparedEvent, derived: bool = False) -> Outcome:
        """Apply one event (after :meth:`load`): accepted, a duplicate or a conflict.

        ``derived``: the event was derived from an observed exchange (proxy mode), where
        a stage the ledger already holds, or a second end of a payment, means the exchange
        was replayed: a duplicate, not a conflict.
        """
        event, key_hash = prepared.event, prepared.key_hash
        for stored_key, stored_body in self._stored.get(key_hash, ()):
            if stored_key != prepared.key:
                continue  # a hash collision: another key
            if stored_body == prepared.body or derived:
                return Outcome.DUPLICATE
            self.dead_letter(
                DeadLetter(
                    "conflict",
                    f"key {prepared.key!r} was already stored with a different body",
                    prepared.raw,
                    prepared.key,
                )
            )
            return Outcome.CONFLICT
        kind = event["type"]
        defined = (
            self._already_defined(prepared)
            if kind == "payment:received" or kind == "batch:created"
            else None
        )
        if defined is not None:
            if defined or derived:
                return Outcome.DUPLICATE
            self.dead_letter(
                DeadLetter(
                    "conflict",
                    f"{kind} {prepared.ref!r} was already stored with other fields",
                    prepared.raw,
                    prepared.key,
                )
            )
            return Outcome.CONFLICT
        if prepared.ref is not None and kind in _ENDINGS:
            payment = self._payment(prepared.ref)
            if payment is not None and payment.terminal:
                if derived and kind == "payment:failed":
                    return Outcome.DUPLICATE  # a replayed settle refused upstream
                # A payment ends once (section 2): whatever its id, a second settled or
                # failed event is never counted. A derived settlement lands here only
                # when the payment failed (its settled key would have matched above),
                # e.g. past the settlement deadline: the facilitator contradicts it.
                self.dead_letter(
                    DeadLetter(
                        "conflict",
                        f"payment {prepared.ref!r} has already ended (settled or failed)",
                        prepared.raw,
                        prepared.key,
                    )
                )
                return Outcome.CONFLICT
        self._stored.setdefault(key_hash, []).append((prepared.key, prepared.body))
        self._key_digests[prepared.key] = key_hash & _UNSIGNED_64
        seq = self._current_seq = self._numbers.event_seq
        self._numbers.event_seq += 1
        self._current_waits = False
        self.effects.append(NewEvent(kind))
        self._apply(seq, prepared.key, event)
        ref = prepared.ref
        if self._current_waits:
            assert ref is not None  # only joined events wait
            self._waits_in_rows.setdefault(ref, []).append(seq)
        self._event_rows.append(
            (
                seq,
                prepared.key,
                key_hash,
                kind,
                ref,
                event["data"]["timestamp"],
                self.now,
                bytearray(prepared.body),  # bound as it is: see :data:`~.schema.EventRow`
                WAITING if self._current_waits else EMITTED,
            )
        )
        return Outcome.ACCEPTED

    def mark_settlement_pending(self, payment_ids: Sequence[str]) -> None:
        """Note when each payment's settle was first answered as not final."""
        if payment_ids:
            self.cur.executemany(
                "INSERT OR IGNORE INTO pending_settlements (payment_id, since) VALUES (?, ?)",
                [(payment_id, self.now) for payment_id in payment_ids],
            )

    def time_out_settlement(self, payment_id: str, deadline_ms: int) -> None:
        """End a payment still pending settlement at its deadline with a ``payment:failed``
        (``settlement_timeout``) event of its own, joined like any other."""
        payment = self._payment(payment_id)
        if payment is None or not payment.received or payment.terminal:
            return  # ended meanwhile, or forgotten by retention
        raw = {
            "type": "payment:failed",
            "data": {
                "paymentId": payment_id,
                "error": SETTLEMENT_TIMEOUT,
                "timestamp": deadline_ms,
                "network": payment.network,
            },
        }
        # Not ended, so no failure of it is stored: its key is new.
        self.add(PreparedEvent.of(parse_event(raw)))

    def _already_defined(self, prepared: PreparedEvent) -> bool | None:
        """For a receipt or batch creation whose payment or batch the join tables hold
        already (stored by an earlier version under an ``id:`` key, or whose event
        retention deleted): whether it says the same; None when nothing holds it."""
        event, ref = prepared.event, prepared.ref
        if ref is None:
            return None
        if event["type"] == "payment:received":
            payment = self._payment(ref)
            if payment is None or not payment.received:
                return None
            r = event["data"]
            said = (r["network"], r["payer"], r["payee"], to_micro(r["amount"]))
            return said == (payment.network, payment.payer, payment.payee, payment.amount_micro)
        if event["type"] == "batch:created":
            batch = self._batch(ref)
            if batch is None:
                return None
            c = event["data"]
            return (c["network"], c["paymentCount"], to_micro(c["totalAmount"])) == batch
        return None

    def _flush_events(self) -> None:
        if self._event_rows:
            insert_rows(
                self.cur,
                _INSERT_EVENTS,
                self._event_rows,
            )
            # Copied from the rows just written: one statement that SQLite runs without
            # the GIL, rather than binding each key hash again.
            self.cur.execute(
                "INSERT INTO temp.recent_keys (key_hash, seq) "
                "SELECT key_hash, seq FROM events WHERE seq BETWEEN ? AND ?",
                (self._event_rows[0][0], self._event_rows[-1][0]),
            )
            self.added += len(self._event_rows)
            self._event_rows.clear()
            self._rows_from_seq = self._numbers.event_seq
            self._waits_in_rows.clear()
            self._refs_new_here.clear()  # their rows are stored now

    def dead_letter(self, letter: DeadLetter) -> None:
        """Keep refused input as a dead letter, in this transaction."""
        self.cur.execute(
            "INSERT INTO dead_letters (received_at, reason, error, key, raw, raw_size) "
            "VALUES (?,?,?,?,?,?)",
            (
                self.now if letter.received_at is None else letter.received_at,
                letter.reason,
                letter.error,
                letter.key,
                letter.raw,
                letter.raw_size,
            ),
        )

    def _emit(self, event_seq: int, record: StoreRecord) -> None:
        self._outbox.append((event_seq, record))

    def flush(self) -> None:
        """Write the events, join state and store records gathered so far, in order."""
        self._flush_events()
        if self._changed_payments:
            self._flush_payments()
        if self._created_batches:
            insert_rows(
                self.cur,
                "INSERT INTO batches (batch_id, network, payment_count, total_amount_micro, "
                "updated_at)",
                [(bid, *batch, self.now) for bid, batch in self._created_batches.items()],
            )
            self._created_batches.clear()
        if self._outbox:
            take_offsets(self.cur, [record for _, record in self._outbox], self._key_digests)
            first = self._numbers.outbox_seq
            rows = []
            for start in range(0, len(self._outbox), self._outbox_row_records):
                part = self._outbox[start : start + self._outbox_row_records]
                rows.append(
                    (
                        first + start,
                        first + start + len(part) - 1,
                        min(event_seq for event_seq, _ in part),
                        encode_records(record for _, record in part),
                    )
                )
            insert_rows(self.cur, "INSERT INTO outbox (seq, last_seq, event_seq, records)", rows)
            self._numbers.outbox_seq += len(self._outbox)
            self.emitted.extend(
                zip(
                    range(first, self._numbers.outbox_seq),
                    (record for _, record in self._outbox),
                    strict=True,
                )
            )
            self._outbox.clear()

    def _flush_payments(self) -> None:
        ids = self._payment_rows
        rows = []
        for payment_id, payment in self._changed_payments.items():
            row_id = ids.get(payment_id)
            if row_id is None:
                row_id = ids[payment_id] = self._numbers.payment_id
                self._numbers.payment_id += 1
            rows.append((row_id, payment_id_hash(payment_id), payment_id, *payment, self.now))
        insert_rows(
            self.cur,
            "INSERT INTO payments (id, id_hash, payment_id, network, payer, payee, "
            "amount_micro, received, terminal, updated_at)",
            rows,
            " ON CONFLICT (id) DO UPDATE SET network = excluded.network, "
            "payer = excluded.payer, payee = excluded.payee, "
            "amount_micro = excluded.amount_micro, received = excluded.received, "
            "terminal = excluded.terminal, updated_at = excluded.updated_at",
        )
        self._changed_payments.clear()

    def _wait(self, seq: int, ref: str) -> None:
        # Only the event being added can wait: one released by its partner has it.
        assert seq == self._current_seq
        if ref not in self.waiting_refs:
            self.waiting_refs.add(ref)
            self._refs_new_here.add(ref)
        self._current_waits = True  # add() writes its row so, and notes it

    def _set_row_state(self, seq: int, state: int) -> None:
        index = seq - self._rows_from_seq
        _, key, key_hash, kind, ref, ts, received_at, body, _ = self._event_rows[index]
        self._event_rows[index] = (seq, key, key_hash, kind, ref, ts, received_at, body, state)

    def _apply(self, seq: int, key: str, event: Event) -> None:
        match event["type"]:
            case "payment:received":
                self._received(seq, key, event)
            case "payment:verified" | "payment:settled" | "payment:failed":
                self._payment_update(seq, key, event)
            case "batch:created":
                self._batch_created(seq, key, event)
            case "batch:settled":
                self._batch_settled(seq, key, event)
            case "revenue:recorded":
                r = event["data"]
                self._emit(
                    seq,
                    RevenueRecord(
                        key,
                        r["timestamp"],
                        r["network"],
                        r["kind"],
                        to_micro(r["amount"]),
                        r.get("paymentId"),
                    ),
                )
            case "websocket:clients":
                self._websocket(seq, key, event)

    def _received(self, seq: int, key: str, event: PaymentReceived) -> None:
        d = event["data"]
        payment_id, network = d["paymentId"], d["network"]
        amount = to_micro(d["amount"])
        payment = self._payment(payment_id)
        if payment is None:
            self._set_payment(payment_id, _Payment(network, d["payer"], d["payee"], amount, 1, 0))
            self.effects.append(PendingChange(network, 1))
        elif not payment.received:
            # Its ending came first: it waits for this receipt (and is counted just
            # below, as it joins), or it was released on its own past the join timeout.
            terminal = 0 if payment.terminal == ENDING_WAITS else payment.terminal
            self._set_payment(
                payment_id, _Payment(network, d["payer"], d["payee"], amount, 1, terminal)
            )
            if not terminal:
                self.effects.append(PendingChange(network, 1))
        self._emit(
            seq,
            PaymentRecord(
                key,
                d["timestamp"],
                network,
                "received",
                payment_id,
                d["payer"],
                d["payee"],
                amount,
            ),
        )
        for waiting_seq, waiting_key, body in self._take_waiting(
            payment_id, ("payment:verified", "payment:settled", "payment:failed")
        ):
            waiting = parse_event(orjson.loads(body))
            assert waiting["type"] in ("payment:verified", "payment:settled", "payment:failed")
            self._payment_update(waiting_seq, waiting_key, waiting)

    def _payment_update(
        self, seq: int, key: str, event: PaymentVerified | PaymentSettled | PaymentFailed
    ) -> None:
        payment_id, timestamp = event["data"]["paymentId"], event["data"]["timestamp"]
        if event["type"] == "payment:failed" and payment_id == UNKNOWN_PAYMENT_ID:
            error = event["data"]["error"]
            network = event["data"].get("network") or UNKNOWN_NETWORK
            self._emit(
                seq, PaymentRecord(key, timestamp, network, "failed", payment_id, error=error)
            )
            self.effects.append(TerminalPayment(network, "failed"))
            return
        payment = self._payment(payment_id)
        if payment is None or not payment.received:
            if event["type"] != "payment:verified" and (payment is None or not payment.terminal):
                # Ended already, although not yet counted: a second ending is refused
                # from now on, and the receipt, when it comes, adds nothing pending.
                network = event["data"].get("network") or UNKNOWN_NETWORK
                self._set_payment(
                    payment_id, _Payment(network, None, None, None, 0, ENDING_WAITS)
                )
            self._wait(seq, payment_id)
            return
        network, payer, payee, amount, _, terminal = payment
        assert amount is not None  # payment:received always sets it
        joined = (payment_id, payer, payee, amount)  # what payment:received said
        match event["type"]:
            case "payment:verified":
                verification_ms = event["data"].get("verificationTime")
                record = PaymentRecord(
                    key, timestamp, network, "verified", *joined, verification_ms=verification_ms
                )
                self._emit(seq, record)
                return
            case "payment:settled":
                s = event["data"]
                fee, settlement_ms = to_micro(s["fee"]), s.get("settlementTime")
                tx = s.get("transaction")
                record = PaymentRecord(
                    key, timestamp, network, "settled", *joined, fee, settlement_ms, tx=tx
                )
                self._emit(seq, record)
                self.effects.append(TerminalPayment(network, "success", amount, fee, settlement_ms))
            case "payment:failed":
                error = event["data"]["error"]
                self._emit(
                    seq, PaymentRecord(key, timestamp, network, "failed", *joined, error=error)
                )
                self.effects.append(TerminalPayment(network, "failed"))
        if not terminal:
            # received (checked above) and now ended; a new tuple is cheaper than _replace
            self._set_payment(payment_id, _Payment(network, payer, payee, amount, 1, 1))
            self.effects.append(PendingChange(network, -1))

    def release_unjoined(self, seq: int, key: str, event: Event) -> None:
        """Emit a stored event whose join partner did not come within the join timeout.

        It is counted with what it carries (docs/architecture.md section 2, "Join
        deadline"): its own ``network``, else ``unknown``; a settlement with amount 0 and
        payer and payee ``unknown``. An ending marks its payment ended, so a late receipt
        adds nothing pending and a second ending is a conflict.
        """
        self.cur.execute("UPDATE events SET state = ? WHERE seq = ?", (EMITTED, seq))
        record: StoreRecord
        match event["type"]:
            case "payment:failed":
                d = event["data"]
                network = d.get("network") or UNKNOWN_NETWORK
                self._end_unjoined(d["paymentId"], network)
                record = PaymentRecord(
                    key, d["timestamp"], network, "failed", d["paymentId"], error=d["error"]
                )
                self.effects.append(TerminalPayment(network, "failed"))
            case "payment:settled":
                s = event["data"]
                network = s.get("network") or UNKNOWN_NETWORK
                self._end_unjoined(s["paymentId"], network)
                fee, settlement_ms = to_micro(s["fee"]), s.get("settlementTime")
                record = PaymentRecord(
                    key,
                    s["timestamp"],
                    network,
                    "settled",
                    s["paymentId"],
                    UNKNOWN_PARTY,
                    UNKNOWN_PARTY,
                    0,
                    fee,
                    settlement_ms,
                    tx=s.get("transaction"),
                )
                self.effects.append(TerminalPayment(network, "success", 0, fee, settlement_ms))
            case "payment:verified":
                v = event["data"]
                record = PaymentRecord(
                    key,
                    v["timestamp"],
                    UNKNOWN_NETWORK,
                    "verified",
                    v["paymentId"],
                    verification_ms=v.get("verificationTime"),
                )
            case "batch:settled":
                b = event["data"]
                gas = int(b["gasUsed"])
                record = BatchRecord(
                    key,
                    b["timestamp"],
                    UNKNOWN_NETWORK,
                    "settled",
                    b["batchId"],
                    0,
                    0,
                    to_micro(b["totalFees"]),
                    gas,
                    b["transaction"],
                )
                self.effects.append(BatchGas(UNKNOWN_NETWORK, gas))
            case _:
                return  # other events never wait
        self.effects.append(JoinTimeout(event["type"]))
        self._emit(seq, record)

    def _end_unjoined(self, payment_id: str, network: str) -> None:
        payment = self._payment(payment_id)
        if payment is None or not payment.received:
            self._set_payment(payment_id, _Payment(network, None, None, None, 0, 1))

    def _batch_created(self, seq: int, key: str, event: BatchCreated) -> None:
        d = event["data"]
        batch_id, network, count = d["batchId"], d["network"], d["paymentCount"]
        total = to_micro(d["totalAmount"])
        if self._batch(batch_id) is None:  # the first batch:created of an id defines it
            batch = self._batches[batch_id] = _Batch(network, count, total)
            self._created_batches[batch_id] = batch
        self._emit(
            seq,
            BatchRecord(key, d["timestamp"], network, "created", batch_id, count, total),
        )
        for waiting_seq, waiting_key, body in self._take_waiting(batch_id, ("batch:settled",)):
            waiting = parse_event(orjson.loads(body))
            assert waiting["type"] == "batch:settled"
            self._batch_settled(waiting_seq, waiting_key, waiting)

    def _take_waiting(
        self, ref: str, types: tuple[str, ...]
    ) -> list[tuple[int, str, bytes | bytearray]]:
        """Events of ``types`` waiting for ``ref``, marked as no longer waiting."""
        if ref not in self.waiting_refs:
            return []
        # Stored rows first (they are older), then this transaction's own, which are
        # looked at in memory: writing them out first would split the bulk inserts.
        rows: list[tuple[int, str, bytes | bytearray, str]] = []
        if ref not in self._refs_new_here:
            (found,) = self.cur.execute(
                "SELECT json_group_array(json_array(seq, key, CAST(body AS TEXT), type))"
                " FROM events WHERE ref = ? AND state = 0",
                (ref,),
            ).fetchone()
            rows = [
                (seq, key, body.encode(), kind)
                for seq, key, body, kind in sorted(orjson.loads(found))  # in commit order
            ]
        stored = len(rows)
        for seq in self._waits_in_rows.get(ref, ()):
            row = self._event_rows[seq - self._rows_from_seq]
            if row[-1] == WAITING:
                rows.append((seq, row[1], row[7], row[3]))
        taken = [(seq, key, body) for seq, key, body, kind in rows if kind in types]
        if len(taken) == len(rows):
            self.waiting_refs.discard(ref)  # nothing else waits for it
            self._refs_new_here.discard(ref)
        taken_stored = [seq for seq, _, _, kind in rows[:stored] if kind in types]
        if taken_stored:
            self.cur.execute(
                "UPDATE events SET state = ? WHERE seq IN (SELECT value FROM json_each(?))",
                (EMITTED, orjson.dumps(taken_stored).decode()),
            )
        for seq, _, _, kind in rows[stored:]:
            if kind in types:
                self._set_row_state(seq, EMITTED)
        return taken

    def _batch_settled(self, seq: int, key: str, event: BatchSettled) -> None:
        d = event["data"]
        batch = self._batch(d["batchId"])
        if batch is None:
            self._wait(seq, d["batchId"])
            return
        network, count, total = batch
        gas = int(d["gasUsed"])
        self._emit(
            seq,
            BatchRecord(
                key,
                d["timestamp"],
                network,
                "settled",
                d["batchId"],
                count,
                total,
                to_micro(d["totalFees"]),
                gas,
                d["transaction"],
            ),
        )
        self.effects.append(BatchGas(network, gas))

    def _websocket(self, seq: int, key: str, event: WebsocketClients) -> None:
        timestamp, count = event["data"]["timestamp"], event["data"]["count"]
        self._emit(seq, WebsocketRecord(key, timestamp, count))
        row = self.cur.execute("SELECT ts FROM websocket_latest").fetchone()
        if row is None or timestamp >= row[0]:
            self.cur.execute(
                "INSERT INTO websocket_latest (id, ts, count) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET ts = excluded.ts, count = excluded.count",
                (timestamp, count),
            )
            self.effects.append(WebsocketCount(count))


SETTLEMENT_TIMEOUT = "settlement_timeout"
"""The error of the failure that ends a payment still pending settlement past its deadline."""
_ENDINGS = frozenset({"payment:settled", "payment:failed"})
"""Event types that end a payment."""
ENDING_WAITS = 2
"""``payments.terminal`` of a payment whose ending (settled or failed) waits for its
``payment:received``: not counted yet, but a second ending is already refused. 1 is an
ending that was counted, 0 none."""


class _Payment(NamedTuple):
    """A ``payments`` row: what ``payment:received`` said and whether the payment ended."""

    network: str
    payer: str | None
    payee: str | None
    amount_micro: int | None
    received: int
    terminal: int


class _Batch(NamedTuple):
    """A ``batches`` row: what ``batch:created`` said."""

    network: str
    payment_count: int
    total_amount_micro: int
