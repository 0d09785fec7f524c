"""The InfluxDB store: points, every write fault, and at-least-once shipping through them.

Faults come from the fault-injection server (``influx_fault_server``) driven through
the real ``influxdb-client``; the forwarder tests run it over a real ledger, and one
test kills an exporter subprocess with SIGKILL in the middle of shipping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import clean_env, post_json, run_cli, start_exporter
from conftest import (
    BASE_MS,
    AppClient,
    async_wait_until,
    received,
    settled,
    wait_until,
)
from fluxcheck import assert_flux_valid
from hypothesis import given, settings
from hypothesis import strategies as st
from influx_fault_server import (
    InfluxFaultServer,
    PointKey,
    Reply,
    split_point,
    threaded_fault_server,
)
from influx_helpers import rows_query
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER, FORWARDER
from exporter.errors import (
    StoreAuthError,
    StoreClientError,
    StoreRetryAfterError,
    StoreServerError,
    StoreTimeoutError,
)
from exporter.ledger import GroupCommitter, Ledger, Submission
from exporter.metrics import Metrics
from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    StoreRejection,
    WebsocketRecord,
    unique_time_ns,
)
from exporter.store import Forwarder
from exporter.store.influx.store import (
    DEFAULT_RETRY_AFTER_SECONDS,
    InfluxStore,
    parse_retry_after,
    point_line,
    to_line,
)

ADDR_A = "0x" + "a" * 40
ADDR_B = "0x" + "b" * 40
TX = "0x" + "c" * 64


# --------------------------------------------------------------------------- points

GOLDEN: list[tuple[StoreRecord, str]] = [
    (
        PaymentRecord(
            "payment:settled:p1", BASE_MS + 2000, "eip155:8453", "settled", "p1",
            ADDR_A, ADDR_B, 1_500_000, 10_000, 1500.0, None, TX, None,
        ),
        'payment,network=eip155:8453,status=settled amount_micro=1500000i,fee_micro=10000i,'
        f'payee="{ADDR_B}",payer="{ADDR_A}",payment_id="p1",settlement_ms=1500,tx="{TX}" '
        "1767225602000326206",
    ),
    (
        PaymentRecord(
            "payment:received:p1", BASE_MS, "eip155:8453", "received", "p1",
            ADDR_A, ADDR_B, 1_500_000,
        ),
        'payment,network=eip155:8453,status=received amount_micro=1500000i,'
        f'payee="{ADDR_B}",payer="{ADDR_A}",payment_id="p1" 1767225600000460678',
    ),
    (
        PaymentRecord(
            "payment:verified:p1", BASE_MS + 100, "eip155:8453", "verified", "p1",
            verification_ms=120.25,
        ),
        'payment,network=eip155:8453,status=verified payment_id="p1",verification_ms=120.25 '
        "1767225600100162285",
    ),
    (
        # Escaping: spaces, commas and equals signs in tags; quotes and backslashes in
        # string fields (spaces, commas and equals stay as they are inside quotes).
        PaymentRecord(
            "payment:failed:p2", BASE_MS + 2000, "net work,a=b", "failed",
            'id "q" \\ x', error='said "no", then\\ quit = done',
        ),
        'payment,network=net\\ work\\,a\\=b,status=failed '
        'error="said \\"no\\", then\\\\ quit = done",payment_id="id \\"q\\" \\\\ x" '
        "1767225602000857725",
    ),
    (
        BatchRecord(
            "batch:settled:b1", BASE_MS + 5000, "eip155:8453", "settled", "b1",
            2, 3_000_000, 20_000, 84_000, "0x" + "d" * 64,
        ),
        'batch,network=eip155:8453,status=settled batch_id="b1",gas_used=84000i,'
        'payment_count=2i,total_amount_micro=3000000i,total_fees_micro=20000i,'
        f'tx="0x{"d" * 64}" 1767225605000151429',
    ),
    (
        RevenueRecord("revenue:x", BASE_MS + 10, "eip155:10", "premium", 250_000, "p1"),
        'revenue,kind=premium,network=eip155:10 amount_micro=250000i,payment_id="p1" '
        "1767225600010279650",
    ),
    (
        WebsocketRecord("websocket:y", BASE_MS + 20, 42),
        "websocket count=42i 1767225600020430321",
    ),
]


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
    key_one, key_two = _point_key(one), _point_key(two)
    assert key_one[0] == key_two[0]  # the same series
    assert key_one != key_two
    replay = PaymentRecord("payment:received:a", BASE_MS, "eip155:8453", "received", "a")
    assert to_line(replay) == to_line(one)


def test_integral_durations_stay_floats_and_money_stays_integer() -> None:
    """A whole-number duration is written without ``i`` (a float field), money with ``i``."""
    record = PaymentRecord(
        "payment:settled:p", BASE_MS, "eip155:8453", "settled", "p",
        amount_micro=2, fee_micro=0, settlement_ms=1500, verification_ms=float("nan"),
    )
    _, fields, _ = split_point(to_line(record))
    assert fields.split(",") == [
        "amount_micro=2i", "fee_micro=0i", 'payment_id="p"', "settlement_ms=1500",
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
        PaymentRecord, _text, _time, _text, _text, _text, _maybe_text, _maybe_text,
        _maybe_int, _maybe_int, _maybe_float, _maybe_float, _maybe_text, _maybe_text,
    ),
    st.builds(
        BatchRecord, _text, _time, _text, _text, _text, _ints, _ints,
        _maybe_int, _maybe_int, _maybe_text,
    ),
    st.builds(RevenueRecord, _text, _time, _text, _text, _ints, _maybe_text),
    st.builds(WebsocketRecord, _text, _time, _ints),
)


@settings(max_examples=400, deadline=None)
@given(_records)
def test_fast_renderer_writes_exactly_what_point_writes(record: StoreRecord) -> None:
    """For any record, the shipping renderer and influxdb_client's Point agree byte for byte."""
    assert to_line(record) == point_line(record)


# --------------------------------------------------------------------------- helpers


def _point_key(record: StoreRecord) -> PointKey:
    series, _, timestamp = split_point(to_line(record))
    return series, timestamp


def _payments(count: int, prefix: str = "p", ms: int = BASE_MS) -> list[StoreRecord]:
    return [
        PaymentRecord(
            f"payment:received:{prefix}{i}", ms + i, "eip155:8453", "received",
            f"{prefix}{i}", ADDR_A, ADDR_B, 1_000_000 + i,
        )
        for i in range(count)
    ]


@pytest.fixture
async def influx() -> AsyncIterator[InfluxFaultServer]:
    """A fault server on a free loopback port, accepting everything until told otherwise."""
    server = InfluxFaultServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def store(influx: InfluxFaultServer) -> AsyncIterator[InfluxStore]:
    """The store pointed at the fault server, with a short timeout."""
    influx_store = InfluxStore(
        influx.url, influx.token, influx.org, influx.bucket, timeout_seconds=0.5
    )
    yield influx_store
    await influx_store.close()


# --------------------------------------------------------------------------- store faults


async def test_write_sends_gzip_batches_of_at_most_5000_lines(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """12,000 records go as 5,000 + 5,000 + 2,000 lines, gzip'd, with org/bucket/ns."""
    records = _payments(12_000)
    assert await store.write(records) == []
    log = influx.request_log()
    assert [len(r.lines) for r in log] == [5_000, 5_000, 2_000]
    for request in log:
        assert request.content_encoding == "gzip"
        assert request.query == {"org": "test-org", "bucket": "payments", "precision": "ns"}
        assert request.authorization == "Token test-token"
        assert request.status == 204
    assert influx.point_keys() == {_point_key(r) for r in records}


async def test_golden_points_arrive_byte_for_byte(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Through gzip and the real client, InfluxDB receives exactly the golden lines."""
    assert await store.write([record for record, _ in GOLDEN]) == []
    assert sorted(influx.written_lines()) == sorted(line for _, line in GOLDEN)


async def test_server_error_raises_a_retryable_store_error(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """500: nothing is refused for good; the write raises and is retried later."""
    influx.push(Reply(500, "unexpected error writing points to database: timeout"))
    with pytest.raises(StoreServerError, match="500"):
        await store.write(_payments(3))
    assert influx.point_keys() == set()
    assert await store.write(_payments(3)) == []
    assert len(influx.point_keys()) == 3


@pytest.mark.parametrize(("status", "header", "seconds"), [(429, "7", 7.0), (503, "0.5", 0.5)])
async def test_throttling_raises_retry_after_with_the_servers_delay(
    influx: InfluxFaultServer, store: InfluxStore, status: int, header: str, seconds: float
) -> None:
    """429/503 carry the Retry-After the server named."""
    influx.push(Reply(status, "slow down", retry_after=header))
    with pytest.raises(StoreRetryAfterError) as caught:
        await store.write(_payments(2))
    assert caught.value.retry_after == seconds


def test_retry_after_accepts_http_dates_and_falls_back_when_absent() -> None:
    """Retry-After may be an HTTP date; absent or garbage means the documented default."""
    now = 1_767_225_600.0  # Thu, 01 Jan 2026 00:00:00 GMT
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now=now) == 0.0
    assert parse_retry_after(None) == DEFAULT_RETRY_AFTER_SECONDS
    assert parse_retry_after("soon") == DEFAULT_RETRY_AFTER_SECONDS
    assert parse_retry_after("86400000") == 3600.0


async def test_413_splits_the_batch_until_it_fits(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Above the server's limit, halves are written on their own; everything arrives."""
    influx.max_lines = 700
    records = _payments(2_000)
    assert await store.write(records) == []
    accepted = [r for r in influx.request_log() if r.status == 204]
    assert all(len(r.lines) <= 700 for r in accepted)
    assert sum(len(r.lines) for r in accepted) == 2_000
    assert influx.point_keys() == {_point_key(r) for r in records}


async def test_bad_lines_are_isolated_by_bisection_and_the_rest_is_written(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """400 naming a bad line: the poison records come back with InfluxDB's message."""
    records = _payments(1_000)
    poison = {records[17].key, records[640].key}
    influx.bad_markers = ('payment_id="p17"', 'payment_id="p640"')
    refused = await store.write(records)
    assert {r.record.key for r in refused} == poison
    for rejection in refused:
        assert rejection.reason.startswith("influxdb 400: unable to parse 'payment,")
        assert rejection.record.key.rsplit(":", 1)[1] in rejection.reason
    good = {_point_key(r) for r in records if r.key not in poison}
    assert influx.point_keys() == good
    # Bisection, not a line-by-line search: about two requests per halving per poison.
    assert store.requests <= 2 * 2 * math.ceil(math.log2(1_000)) + 1


async def test_partial_writes_are_bisected_and_the_conflicting_line_dead_lettered(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """422 partial write (type conflict): the other lines land, the conflicting one is refused."""
    records = _payments(50)
    influx.conflict_markers = ('payment_id="p9"',)
    refused = await store.write(records)
    assert [r.record.key for r in refused] == [records[9].key]
    assert "partial write: field type conflict" in refused[0].reason
    assert influx.point_keys() == {_point_key(r) for r in records if r is not records[9]}


async def test_a_request_level_400_is_retried_not_dead_lettered(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """A 400 about the request (body unreadable) must not turn good records into dead letters."""
    influx.push(Reply(400, "unable to read data: gzip: invalid header"))
    with pytest.raises(StoreClientError, match="unable to read data"):
        await store.write(_payments(10))
    assert store.requests == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "unauthorized access"), (403, "insufficient permissions for write")],
)
async def test_refused_credentials_raise_store_auth_error(
    influx: InfluxFaultServer, store: InfluxStore, status: int, message: str
) -> None:
    """401/403 become StoreAuthError, which the forwarder treats as 'not ready'."""
    influx.push(Reply(status, message))
    with pytest.raises(StoreAuthError, match=message):
        await store.write(_payments(1))


async def test_unknown_bucket_is_a_configuration_error(influx: InfluxFaultServer) -> None:
    """404 (bucket or org not found) names the settings to check."""
    wrong = InfluxStore(influx.url, influx.token, influx.org, "nope", timeout_seconds=1)
    try:
        with pytest.raises(StoreAuthError, match="EXPORTER_INFLUX_BUCKET"):
            await wrong.write(_payments(1))
    finally:
        await wrong.close()


async def test_slow_answers_time_out(influx: InfluxFaultServer, store: InfluxStore) -> None:
    """No answer within the timeout raises StoreTimeoutError (retried by the forwarder)."""
    influx.push(Reply(204, delay=5.0))
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="did not answer within 0.5s"):
        await store.write(_payments(1))
    assert time.monotonic() - started < 3.0


async def test_connection_refused_then_recovery(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """An outage raises StoreServerError; once InfluxDB is back the same store writes again."""
    await influx.outage()
    with pytest.raises(StoreServerError, match="unreachable"):
        await store.write(_payments(2))
    await influx.resume()
    assert await store.write(_payments(2)) == []
    assert len(influx.point_keys()) == 2


async def test_check_reports_reachability_and_credentials(influx: InfluxFaultServer) -> None:
    """check(): version from /ping, credentials by an empty write that stores nothing."""
    good = InfluxStore(influx.url, influx.token, influx.org, influx.bucket, timeout_seconds=1)
    bad = InfluxStore(influx.url, "wrong", influx.org, influx.bucket, timeout_seconds=1)
    try:
        ok = await good.check()
        assert (ok.reachable, ok.version, ok.credentials) == (True, "v2.7.11", "accepted")
        refused = await bad.check()
        assert (refused.reachable, refused.credentials) == (True, "refused")
        await influx.outage()
        down = await good.check()
        assert (down.reachable, down.credentials) == (False, "unknown")
    finally:
        await good.close()
        await bad.close()
    assert influx.point_keys() == set()


# --------------------------------------------------------------------------- forwarder


@pytest.fixture
async def committer(tmp_path: Path) -> AsyncIterator[GroupCommitter]:
    """A ledger on a fresh file behind its writer thread."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    group = GroupCommitter(ledger)
    yield group
    group.close()
    ledger.close()


async def _commit_payments(committer: GroupCommitter, count: int, prefix: str = "p") -> None:
    events = []
    for i in range(count):
        events.append(prepare(received(f"{prefix}{i}", BASE_MS + i)))
        if i % 3 == 0:
            events.append(prepare(settled(f"{prefix}{i}", BASE_MS + 2000 + i)))
    await committer.submit(Submission(events))


async def _until(condition: Callable[[], bool], what: str, within: float = 15.0) -> None:
    async def check() -> bool:
        return condition()

    await async_wait_until(check, within=within, what=what)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_everything_committed_arrives_once_per_point_through_faults(
    committer: GroupCommitter,
    influx: InfluxFaultServer,
    store: InfluxStore,
    registry: CollectorRegistry,
) -> None:
    """5xx, 429, 503, a timeout, 413 splits and a poison line: every other record lands."""
    await _commit_payments(committer, 1_500)
    await committer.submit(Submission([prepare(received("poison", BASE_MS))]))
    rows = committer.ledger.read_outbox(10**6)
    expected = {_point_key(row.record) for row in rows}
    poison = {_point_key(r.record) for r in rows if r.record.key == "payment:received:poison"}
    assert len(poison) == 1
    influx.max_lines = 700
    influx.bad_markers = ('payment_id="poison"',)
    influx.push(
        Reply(500, "internal error"),
        Reply(429, "slow down", retry_after="0.05"),
        Reply(204, delay=5.0),  # outlasts the 0.5 s timeout (and is applied anyway)
        Reply(503, "unavailable", retry_after="0"),
    )
    forwarder = Forwarder(committer, store, Metrics(registry), 1_000, max_backoff_seconds=0.05)
    forwarder.start()
    await _until(lambda: committer.ledger.backlog == 0, "outbox drained through faults")
    await forwarder.stop(drain_seconds=5)

    assert influx.point_keys() == expected - poison
    assert all(count >= 1 for count in influx.deliveries.values())
    letters = committer.ledger.dead_letters(reason="store")
    assert [letter.key for letter in letters] == ["payment:received:poison"]
    assert "unable to parse" in letters[0].error
    for kind in ("server", "retry_after", "timeout"):
        assert _sample(registry, "exporter_store_errors_total", **{"class": kind}) >= 1, kind
    assert _sample(registry, "exporter_store_records_rejected_total") == 1
    assert _sample(registry, "exporter_store_batch_size_records_count") == _sample(
        registry, "exporter_store_writes_total"
    )
    assert forwarder.lag_seconds() == 0.0


async def test_retry_after_is_honoured_before_the_next_attempt(
    committer: GroupCommitter, influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """A 429 asking for 1 s gets 1 s even though the backoff alone would be 10 ms."""
    await _commit_payments(committer, 3)
    influx.push(Reply(429, "slow down", retry_after="1"))
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()), max_backoff_seconds=0.01)
    forwarder.start()
    await _until(lambda: committer.ledger.backlog == 0, "delivery after the 429")
    await forwarder.stop(drain_seconds=5)
    first, second = influx.request_log()[:2]
    assert first.status == 429 and second.status == 204
    assert second.at - first.at >= 1.0


@dataclass
class _Spy:
    """Records what the forwarder hands the store and reads from the ledger."""

    inner: InfluxStore
    name: str = "influxdb"
    writes: list[tuple[list[str], bool]] = field(default_factory=list)

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Delegate, then remember the batch's keys and whether the write succeeded."""
        keys = [r.key for r in records]
        try:
            refused = await self.inner.write(records)
        except Exception:
            self.writes.append((keys, False))
            raise
        self.writes.append((keys, True))
        return refused

    async def close(self) -> None:
        """Nothing to release (the fixture closes the inner store)."""


async def test_forwarder_holds_one_batch_and_rereads_it_during_an_outage(
    committer: GroupCommitter,
    influx: InfluxFaultServer,
    store: InfluxStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """During an outage the same oldest batch is read again; nothing accumulates in memory."""
    await _commit_payments(committer, 600)  # 800 records
    ledger = committer.ledger
    reads: list[tuple[int, int]] = []
    read_outbox = ledger.read_outbox

    def spying_read(limit: int) -> Any:
        rows = read_outbox(limit)
        reads.append((limit, len(rows)))
        return rows

    monkeypatch.setattr(ledger, "read_outbox", spying_read)
    spy = _Spy(store)
    await influx.outage()
    forwarder = Forwarder(committer, spy, Metrics(CollectorRegistry()), 200, 0.02)
    forwarder.start()
    await _until(lambda: len(spy.writes) >= 4, "several attempts during the outage")
    assert forwarder.lag_seconds() > 0
    state = forwarder.state()
    assert (state.reachable, state.error_class, state.backlog) == (False, "server", 800)
    await influx.resume()
    await _until(lambda: ledger.backlog == 0, "delivery after the outage")
    await forwarder.stop(drain_seconds=5)

    assert all(limit == 200 and got <= 200 for limit, got in reads)
    assert all(len(keys) <= 200 for keys, _ in spy.writes)
    failed = [keys for keys, ok in spy.writes if not ok]
    assert len(failed) >= 4
    assert all(keys == failed[0] for keys in failed)  # the oldest batch, read again
    delivered = [key for keys, ok in spy.writes if ok for key in keys]
    assert delivered[: len(failed[0])] == failed[0]
    assert len(delivered) == len(set(delivered)) == 800


async def test_shutdown_during_a_long_retry_after_is_bounded(
    committer: GroupCommitter, influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """stop() does not sit out a 60 s Retry-After: it returns and keeps the rows."""
    await _commit_payments(committer, 5)
    influx.push(Reply(503, "unavailable", retry_after="60"))
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()))
    forwarder.start()
    await _until(lambda: forwarder.consecutive_failures == 1, "the 503")
    started = time.monotonic()
    await forwarder.stop(drain_seconds=2)
    assert time.monotonic() - started < 2.5
    assert committer.ledger.backlog == 7


# --------------------------------------------------------------------------- in the app


@pytest.fixture
async def influx_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
    influx: InfluxFaultServer,
) -> AppClient:
    """The exporter app with EXPORTER_STORE=influxdb aimed at the fault server."""
    app_settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        store="influxdb",
        influx_url=influx.url,
        influx_token=influx.token,
        influx_org=influx.org,
        influx_timeout_seconds=2.0,
    )
    return await aiohttp_client(create_app(app_settings, registry))


async def test_refused_token_pauses_shipping_marks_not_ready_and_logs_once(
    influx_client: AppClient,
    influx: InfluxFaultServer,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """401: ingest goes on, /readyz answers 503, one ERROR line; a fixed token resumes."""
    client = influx_client
    ledger = client.app[COMMITTER].ledger
    assert (await client.post("/v1/events", json=[received("a1")])).status == 202
    await _until(lambda: ledger.backlog == 0, "first delivery")

    influx.token = "rotated"  # the exporter's token is refused from now on
    assert (await client.post("/v1/events", json=[received("a2"), settled("a2")])).status == 202
    await _until(
        lambda: _sample(registry, "exporter_store_errors_total", **{"class": "auth"}) >= 2,
        "repeated auth failures",
    )
    answer = await client.get("/readyz")
    assert answer.status == 503
    body = await answer.json()
    assert body["store"]["authFailed"] is True
    assert body["store"]["reachable"] is True  # it answers; it refuses the token
    assert body["store"]["errorClass"] == "auth"
    assert body["store"]["backlog"] == 2
    assert body["store"]["lagSeconds"] > 0
    assert _sample(registry, "exporter_store_auth_failed") == 1
    assert (await client.post("/v1/events", json=[received("a3")])).status == 202
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "refused the credentials" in errors[0].getMessage()

    influx.token = "test-token"
    await _until(lambda: ledger.backlog == 0, "delivery with the fixed token")
    answer = await client.get("/readyz")
    assert answer.status == 200
    assert (await answer.json())["store"]["authFailed"] is False
    assert _sample(registry, "exporter_store_auth_failed") == 0
    assert client.app[FORWARDER].ready
    assert len(influx.point_keys()) == 4


async def test_readyz_reports_the_influx_store_state(
    influx_client: AppClient, influx: InfluxFaultServer
) -> None:
    """/readyz names the store, its reachability, backlog and last successful write."""
    client = influx_client
    before = await (await client.get("/readyz")).json()
    assert before["store"]["name"] == "influxdb"
    assert before["store"]["reachable"] is None  # nothing attempted yet
    await client.post("/v1/events", json=[received("r1")])
    await _until(lambda: client.app[COMMITTER].ledger.backlog == 0, "delivery")
    after = await (await client.get("/readyz")).json()
    assert after["store"]["reachable"] is True
    assert after["store"]["lastSuccessfulWrite"] is not None
    assert after["store"]["backlog"] == 0
    assert after["store"]["lagSeconds"] == 0
    assert len(influx.point_keys()) == 1


# --------------------------------------------------------------------------- configuration


def test_integration_suite_flux_type_checks() -> None:
    """The Flux the integration suite reads back with compiles (checked without a server)."""
    query = rows_query("payments", "payment", 'test:"quoted"', BASE_MS, BASE_MS + 10_000)
    assert_flux_valid({"rows_query": query}, preamble="")


def test_influxdb_without_url_token_or_org_is_a_config_error() -> None:
    """Selecting InfluxDB without its settings names every missing variable (exit 2)."""
    result = run_cli("check-config", EXPORTER_STORE="influxdb")
    assert result.returncode == 2
    for variable in ("EXPORTER_INFLUX_URL", "EXPORTER_INFLUX_TOKEN", "EXPORTER_INFLUX_ORG"):
        assert variable in result.stderr
    auto = run_cli("check-config", EXPORTER_INFLUX_URL="http://127.0.0.1:8086")
    assert auto.returncode == 2
    assert "EXPORTER_INFLUX_TOKEN" in auto.stderr and "EXPORTER_INFLUX_URL" not in auto.stderr


@pytest.fixture
def threaded_influx() -> Iterator[tuple[InfluxFaultServer, Callable[..., Any]]]:
    """A fault server on its own thread, for subprocess tests."""
    with threaded_fault_server() as (server, call):
        yield server, call


def _influx_env(server: InfluxFaultServer, **extra: str) -> dict[str, str]:
    return clean_env(
        EXPORTER_INFLUX_URL=server.url,
        EXPORTER_INFLUX_TOKEN=server.token,
        EXPORTER_INFLUX_ORG=server.org,
        EXPORTER_INFLUX_TIMEOUT_SECONDS="2",
        **extra,
    )


@pytest.mark.slow
def test_check_config_reports_and_pings_influxdb(
    threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]],
) -> None:
    """check-config says InfluxDB will be used; --ping reaches it and tests the token."""
    server, call = threaded_influx
    env = {k: v for k, v in _influx_env(server).items() if k.startswith("EXPORTER_")}
    plain = run_cli("check-config", **env)
    assert plain.returncode == 0, plain.stderr
    assert '"resolved_store": "influxdb"' in plain.stdout
    assert server.token not in plain.stdout
    pinged = run_cli("check-config", "--ping", **env)
    assert pinged.returncode == 0, pinged.stderr
    assert "reachable (InfluxDB v2.7.11); token accepted" in pinged.stdout
    refused = run_cli("check-config", "--ping", **{**env, "EXPORTER_INFLUX_TOKEN": "wrong"})
    assert refused.returncode == 1
    assert "credentials refused" in refused.stdout
    call(server.outage())
    down = run_cli("check-config", "--ping", **env)
    assert down.returncode == 1
    assert "unreachable" in down.stdout
    assert server.point_keys() == set()


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_during_shipping_then_restart_delivers_each_acknowledged_event_once(
    tmp_path: Path, threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]]
) -> None:
    """SIGKILL while batches are in flight: after a restart every acknowledged event is
    in InfluxDB, as exactly one point each, and delivered batches are not sent again."""
    server, _ = threaded_influx
    server.push(*[Reply(204, delay=0.25) for _ in range(40)])  # slow shipping
    batch = 300
    env = _influx_env(server, EXPORTER_STORE="influxdb", EXPORTER_STORE_BATCH_SIZE=str(batch))
    data_dir = tmp_path / "data"
    expected: set[PointKey] = set()
    process = start_exporter(data_dir, tmp_path / "first.log", env=env)
    try:
        for chunk in range(12):
            events = []
            for i in range(chunk * 100, chunk * 100 + 100):
                events.append(received(f"k{i}", BASE_MS + i))
                events.append(settled(f"k{i}", BASE_MS + 5_000 + i))
            status, answer = post_json(process.events_url, events)
            assert status == 202 and answer["accepted"] == 200, answer
            expected |= _expected_points(events)
        wait_until(lambda: len(server.request_log()) >= 3, 20, 0.01, "shipping under way")
        assert len(server.point_keys()) < len(expected)
    finally:
        process.kill()
    assert len(expected) == 2_400

    restarted = start_exporter(data_dir, tmp_path / "second.log", env=env)
    try:
        restarted.wait_caught_up(timeout=60)
    finally:
        restarted.terminate()
    assert server.point_keys() == expected
    sent = sum(len(r.lines) for r in server.request_log() if r.status == 204)
    # At most the batch in flight at the kill is sent twice.
    assert len(expected) <= sent <= len(expected) + batch


def _expected_points(events: list[dict[str, Any]]) -> set[PointKey]:
    points = set()
    for event in events:
        data = event["data"]
        key = f"{event['type']}:{data['paymentId']}"
        series = f"payment,network=eip155:8453,status={event['type'].split(':')[1]}"
        points.add((series, unique_time_ns(data["timestamp"], key)))
    return points


@pytest.mark.slow
def test_sigterm_drains_within_bounds_and_loses_nothing_either_way(
    tmp_path: Path, threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]]
) -> None:
    """InfluxDB down: SIGTERM exits promptly, the backlog waits on disk. InfluxDB up but
    slow: SIGTERM first ships what is pending, old backlog included."""
    server, call = threaded_influx
    env = _influx_env(server, EXPORTER_STORE="influxdb", EXPORTER_STORE_BATCH_SIZE="200")
    data_dir = tmp_path / "data"
    down = [received(f"d{i}", BASE_MS + i) for i in range(300)]
    up = [received(f"u{i}", BASE_MS + 10_000 + i) for i in range(300)]

    call(server.outage())
    process = start_exporter(data_dir, tmp_path / "down.log", env=env)
    try:
        assert post_json(process.events_url, down)[0] == 202
        started = time.monotonic()
        assert process.terminate() == 0
        assert time.monotonic() - started < 5.0, process.log()
    finally:
        process.kill()
    assert server.point_keys() == set()

    call(server.resume())
    server.push(*[Reply(204, delay=0.2) for _ in range(3)])
    process = start_exporter(data_dir, tmp_path / "up.log", env=env)
    try:
        assert post_json(process.events_url, up)[0] == 202
        assert process.terminate() == 0
    finally:
        process.kill()
    assert server.point_keys() == _expected_points(down + up)
