"""Acknowledged means durable: ``kill -9`` the exporter while clients post, then check.

Several client threads post payment lifecycles (single events and NDJSON batches,
duplicates, settled-before-received, explicit event ids) with unique payment ids and
record which requests were acknowledged (202). The exporter is SIGKILLed mid-stream.
Afterwards every acknowledged event's dedup key must be in the SQLite ledger and
nothing that never reached the server may be. A restart on the same data directory
must restore the pending-payments gauge, deliver the ledger to the DuckDB store, and
leave every committed event there exactly once under its ledger key.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import duckdb
import pytest
from _exporter_process import ExporterProcess, labels, start_exporter
from conftest import BASE_MS, failed, received, settled, verified, wait_until

pytestmark = pytest.mark.slow

NETWORKS = ("eip155:8453", "eip155:10")
CLIENTS = 6
MAX_REQUESTS_PER_CLIENT = 20_000
"""Bounds each client's loop; far more than it can send before the kill."""
KILL_AFTER_ACKED = 300
"""Acknowledged requests (all clients together) before the exporter is killed."""
SCENARIOS = 8


class Outcome(Enum):
    """What became of one POST."""

    ACKED = "acked"
    """202: committed to the ledger."""
    AMBIGUOUS = "ambiguous"
    """Sent, but the connection broke before an answer: it may or may not be committed."""
    REFUSED = "refused"
    """The connection was refused: the request never reached the server."""
    ERROR = "error"
    """Answered with a status other than 202: a test failure."""


@dataclass(frozen=True)
class Sent:
    """One event as the test sent it, with the dedup key the ledger must use for it."""

    key: str
    type: str
    pid: str
    network: str
    event: dict[str, Any]


@dataclass
class Post:
    """One request and its outcome."""

    events: list[Sent]
    outcome: Outcome
    status: int | None = None
    answer: dict[str, Any] | None = None
    expected_accepted: int = 0
    expected_duplicates: int = 0


@dataclass
class ClientLog:
    """Everything one client thread sent, in order."""

    posts: list[Post] = field(default_factory=list)
    exhausted: bool = False
    crashed: str | None = None


def _sent(event: dict[str, Any], network: str, event_id: str | None = None) -> Sent:
    data = event["data"]
    if event_id is not None:
        event = {**event, "id": event_id}
    key = f"{event['type']}:{data['paymentId']}"  # lifecycle events: whatever their id
    return Sent(key, str(event["type"]), str(data["paymentId"]), network, event)


def payment_requests(pid: str, n: int) -> list[list[Sent]]:
    """The requests of payment number ``n`` (one scenario of :data:`SCENARIOS`)."""
    network = NETWORKS[n % len(NETWORKS)]
    ts = BASE_MS + n * 10
    rec = _sent(received(pid, ts, network=network), network)
    ver = _sent(verified(pid, ts + 100), network)
    setl = _sent(settled(pid, ts + 2000), network)
    fail = _sent(failed(pid, ts + 2000), network)
    match (n // len(NETWORKS)) % SCENARIOS:
        case 0:  # received, later settled
            return [[rec], [setl]]
        case 1:  # a whole lifecycle in one NDJSON batch
            return [[rec, ver, setl]]
        case 2:  # settled delivered before received
            return [[setl], [rec]]
        case 3:  # received and failed in one batch
            return [[rec, fail]]
        case 4:  # received only: stays pending
            return [[rec]]
        case 5:  # a duplicate inside a batch, a re-delivery, then settled
            return [[rec, rec], [rec], [setl]]
        case 6:  # producer event ids; the whole batch re-delivered
            rec_id = _sent(received(pid, ts, network=network), network, f"{pid}/r")
            setl_id = _sent(settled(pid, ts + 2000), network, f"{pid}/s")
            return [[rec_id, setl_id], [rec_id, setl_id]]
        case _:  # producer event id, pending
            return [[_sent(received(pid, ts, network=network), network, f"{pid}/r")]]


def client_requests(client: int) -> Iterator[list[Sent]]:
    """Client ``client``'s stream of requests, each payment id unique to it."""
    n = 0
    while True:
        yield from payment_requests(f"c{client}-p{n}", n)
        n += 1


def post(port: int, events: list[Sent]) -> Post:
    """POST ``events`` (one JSON event, or NDJSON for several) on a fresh connection."""
    if len(events) == 1:
        body = json.dumps(events[0].event).encode()
        content_type = "application/json"
    else:
        body = b"\n".join(json.dumps(s.event).encode() for s in events) + b"\n"
        content_type = "application/x-ndjson"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        try:
            conn.connect()
        except OSError:
            # Refused, or reset while the dying listener still held the handshake:
            # either way not one byte of the request was sent.
            return Post(events, Outcome.REFUSED)
        try:
            conn.request("POST", "/v1/events", body, {"Content-Type": content_type})
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            return Post(events, Outcome.AMBIGUOUS)
    finally:
        conn.close()
    answer = json.loads(raw)
    outcome = Outcome.ACKED if response.status == 202 else Outcome.ERROR
    return Post(events, outcome, response.status, answer)


class Clients:
    """Client threads posting until the exporter stops answering."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.logs = [ClientLog() for _ in range(CLIENTS)]
        self._lock = threading.Lock()
        self._acked = 0
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(CLIENTS)
        ]

    def start(self) -> None:
        """Start every client."""
        for thread in self._threads:
            thread.start()

    def acked(self) -> int:
        """Requests acknowledged so far, all clients together."""
        with self._lock:
            return self._acked

    def join(self, timeout: float) -> None:
        """Wait for every client to stop."""
        for thread in self._threads:
            thread.join(timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"clients still running: {alive}"

    def _run(self, client: int) -> None:
        log = self.logs[client]
        try:
            self._send_all(client, log)
        except Exception as error:  # reported by the test, never lost in a thread
            log.crashed = repr(error)

    def _send_all(self, client: int, log: ClientLog) -> None:
        seen: set[str] = set()
        requests = client_requests(client)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            events = next(requests)
            result = post(self.port, events)
            log.posts.append(result)
            if result.outcome is not Outcome.ACKED:
                break
            # Before the first failure every earlier request was committed, so the
            # answer's counts are known exactly.
            for sent in events:
                if sent.key in seen:
                    result.expected_duplicates += 1
                else:
                    result.expected_accepted += 1
                    seen.add(sent.key)
            with self._lock:
                self._acked += 1
        else:
            log.exhausted = True


def keys_of(posts: list[Post], outcome: Outcome) -> set[str]:
    """Dedup keys of every event in ``posts`` with ``outcome``."""
    return {s.key for p in posts if p.outcome is outcome for s in p.events}


def ledger_keys(path: Path) -> set[str]:
    """Every dedup key in the ledger's ``events`` table, read through a read-only handle."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(row[0]) for row in conn.execute("SELECT key FROM events")}
    finally:
        conn.close()


def store_payment_rows(path: Path) -> list[tuple[str, str, str, str]]:
    """``(key, network, status, payment_id)`` of every row of the store's payment table."""
    conn = duckdb.connect(str(path), read_only=True)
    try:
        rows = conn.execute("SELECT key, network, status, payment_id FROM payment").fetchall()
    finally:
        conn.close()
    return [(str(k), str(n), str(s), str(p)) for k, n, s, p in rows]


def settled_before_received(logs: list[ClientLog]) -> set[str]:
    """Payment ids whose settled event was acknowledged before their received event."""
    found: set[str] = set()
    for log in logs:
        received_pids: set[str] = set()
        settled_early: set[str] = set()
        for p in log.posts:
            if p.outcome is not Outcome.ACKED:
                continue
            for sent in p.events:
                if sent.type == "payment:received":
                    received_pids.add(sent.pid)
                    if sent.pid in settled_early:
                        found.add(sent.pid)
                elif sent.type == "payment:settled" and sent.pid not in received_pids:
                    settled_early.add(sent.pid)
    return found


def expected_pending(committed: list[Sent]) -> dict[str, int]:
    """Per network, payments whose receipt is committed and that neither settled nor failed."""
    received_pids = {s.pid: s.network for s in committed if s.type == "payment:received"}
    ended = {s.pid for s in committed if s.type in ("payment:settled", "payment:failed")}
    pending: dict[str, int] = {}
    for pid, network in received_pids.items():
        if pid not in ended:
            pending[network] = pending.get(network, 0) + 1
    return pending


def test_acknowledged_events_survive_kill_and_reach_the_store_once(tmp_path: Path) -> None:
    """SIGKILL mid-ingest loses no acknowledged event; a restart delivers each once."""
    data_dir = tmp_path / "data"
    exporter = start_exporter(data_dir, tmp_path / "exporter-1.log")
    clients = Clients(exporter.port)
    try:
        clients.start()
        wait_until(
            lambda: clients.acked() >= KILL_AFTER_ACKED,
            30,
            0.01,
            f"{KILL_AFTER_ACKED} acknowledged requests",
        )
        os.kill(exporter.proc.pid, signal.SIGKILL)
        assert exporter.proc.wait(10) == -signal.SIGKILL
        clients.join(30)
    finally:
        exporter.kill()
    # The exporter is gone: fresh payments posted now never reach it.
    probes = [post(exporter.port, payment_requests(f"probe-{n}", n)[0]) for n in range(3)]
    assert [p.outcome for p in probes] == [Outcome.REFUSED] * 3

    posts = [p for log in clients.logs for p in log.posts] + probes
    assert [log.crashed for log in clients.logs] == [None] * CLIENTS
    assert not any(log.exhausted for log in clients.logs), "a client finished before the kill"
    errors = [(p.status, p.answer) for p in posts if p.outcome is Outcome.ERROR]
    assert errors == []
    for p in posts:
        if p.outcome is Outcome.ACKED:
            assert p.answer == {
                "accepted": p.expected_accepted,
                "duplicates": p.expected_duplicates,
                "rejected": [],
            }

    acked = keys_of(posts, Outcome.ACKED)
    ambiguous = keys_of(posts, Outcome.AMBIGUOUS)
    # Keys only ever sent in refused requests (a refused re-delivery of an acked event
    # does not count): none of them reached the server.
    refused = keys_of(posts, Outcome.REFUSED) - acked - ambiguous
    assert keys_of(probes, Outcome.REFUSED) <= refused
    # The run exercised what it claims to: batches, duplicates, settled before received.
    acked_posts = [p for p in posts if p.outcome is Outcome.ACKED]
    assert any(len(p.events) > 1 for p in acked_posts)
    assert sum(p.expected_duplicates for p in acked_posts) > 0
    assert settled_before_received(clients.logs)

    # Every acknowledged event is in the ledger; nothing that never arrived is.
    in_ledger = ledger_keys(data_dir / "ledger.sqlite3")
    assert acked - in_ledger == set(), "acknowledged events missing from the ledger"
    assert in_ledger & refused == set()
    assert in_ledger - (acked | ambiguous) == set(), "the ledger holds keys never sent"

    sent_by_key = {s.key: s for p in posts for s in p.events}
    committed = [sent_by_key[k] for k in in_ledger]
    pending = expected_pending(committed)
    assert sum(pending.values()) > 0

    exporter = start_exporter(data_dir, tmp_path / "exporter-2.log")
    try:
        exporter.wait_caught_up()
        check_pending_restored(exporter, pending)
        assert exporter.terminate() == 0, exporter.log()
    finally:
        exporter.kill()

    check_store(data_dir / "store.duckdb", committed, acked, sent_by_key)


def check_pending_restored(exporter: ExporterProcess, pending: dict[str, int]) -> None:
    """``facilitator_pending_payments`` after restart equals the test's own count."""
    gauge = exporter.metric("facilitator_pending_payments")
    nonzero = {label_set: value for label_set, value in gauge.items() if value != 0}
    assert nonzero == {labels(network=n): float(c) for n, c in pending.items()}


def check_store(
    path: Path, committed: list[Sent], acked: set[str], sent_by_key: dict[str, Sent]
) -> None:
    """Each committed event whose join completed is in the store once, under its ledger key."""
    rows = store_payment_rows(path)
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys)), "an event is in the store more than once"

    received_pids = {s.pid for s in committed if s.type == "payment:received"}
    joined = {s.key for s in committed if s.pid in received_pids}
    assert set(keys) == joined

    acked_received = {
        sent_by_key[k].pid for k in acked if sent_by_key[k].type == "payment:received"
    }
    acked_settled = {k for k in acked if sent_by_key[k].type == "payment:settled"}
    assert {k for k in acked_settled if sent_by_key[k].pid in acked_received} <= set(keys)
    # A settled event whose receipt never reached the ledger waits in it, not in the store.
    assert {k for k in acked_settled if sent_by_key[k].pid not in received_pids}.isdisjoint(keys)

    for key, network, status, payment_id in rows:
        sent = sent_by_key[key]
        assert (network, status, payment_id) == (
            sent.network,
            sent.type.removeprefix("payment:"),
            sent.pid,
        ), key
