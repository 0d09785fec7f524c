"""Tests of the traffic simulator: realism, determinism, contract validity, HTTP replay."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.cli.progress import Progress
from exporter.cli.simulate import (
    DAY_MS,
    EventDict,
    SimulationConfig,
    Simulator,
    encode_event,
    encode_ndjson,
)
from exporter.cli.simulate_live import SimulationProgress, run_simulation
from exporter.events import EVENT_TYPES, parse_event, to_micro

START_MS = 1_750_000_000_000  # 2025-06-15, comfortably inside parse_event's range
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def _data(event: EventDict) -> dict[str, object]:
    data = event["data"]
    assert isinstance(data, dict)
    return data


def _int(data: dict[str, object], key: str) -> int:
    value = data[key]
    assert isinstance(value, int)
    return value


def _unique(events: list[EventDict]) -> list[EventDict]:
    """Drop re-deliveries (byte-identical repeats), keeping first deliveries in order."""
    seen: set[bytes] = set()
    kept = []
    for event in events:
        body = encode_event(event)
        if body not in seen:
            seen.add(body)
            kept.append(event)
    return kept


@pytest.fixture(scope="module")
def traffic() -> list[EventDict]:
    """20,000 payment attempts with the default (realistic) configuration."""
    return list(Simulator(SimulationConfig(seed=42)).events(START_MS, 20_000, 50.0))


def test_same_seed_gives_identical_events_and_another_seed_differs() -> None:
    def run(seed: int) -> bytes:
        events = Simulator(SimulationConfig(seed=seed)).events(START_MS, 2_000, 20.0)
        return encode_ndjson(list(events))

    assert run(7) == run(7)
    assert run(7) != run(8)
    history_a = list(Simulator(SimulationConfig(seed=3)).history(500, 2, START_MS))
    history_b = list(Simulator(SimulationConfig(seed=3)).history(500, 2, START_MS))
    assert history_a == history_b


def test_every_event_validates(traffic: list[EventDict]) -> None:
    for event in traffic:
        parse_event(event)
    config = SimulationConfig(seed=5, event_ids=True, out_of_order_fraction=0.2)
    for event in Simulator(config).history(2_000, 3, START_MS):
        parsed = parse_event(event)
        assert parsed.get("id") is not None
    assert {str(e["type"]) for e in traffic} == set(EVENT_TYPES)


def test_failure_fraction_and_unknown_share(traffic: list[EventDict]) -> None:
    unique = _unique(traffic)
    settled = [e for e in unique if e["type"] == "payment:settled"]
    failed = [e for e in unique if e["type"] == "payment:failed"]
    assert len(settled) + len(failed) == 20_000  # every attempt ends exactly once
    assert 0.025 <= len(failed) / 20_000 <= 0.035
    unknown = [e for e in failed if _data(e)["paymentId"] == "unknown"]
    assert 0.14 <= len(unknown) / len(failed) <= 0.26
    with_network = sum(1 for e in unknown if "network" in _data(e))
    assert 0 < with_network < len(unknown)
    received = [e for e in unique if e["type"] == "payment:received"]
    assert len(received) + len(unknown) == 20_000


def test_lifecycle_order_and_timestamps(traffic: list[EventDict]) -> None:
    unique = _unique(traffic)
    by_payment: dict[str, dict[str, tuple[int, dict[str, object]]]] = {}
    for position, event in enumerate(unique):
        data = _data(event)
        payment_id = data.get("paymentId")
        if not str(event["type"]).startswith("payment:") or payment_id == "unknown":
            continue
        assert isinstance(payment_id, str)
        slot = by_payment.setdefault(payment_id, {})
        assert event["type"] not in slot, "one event of each type per payment"
        slot[str(event["type"])] = (position, data)
    swapped = 0
    for slot in by_payment.values():
        pos_received, received = slot["payment:received"]
        assert ("payment:settled" in slot) != ("payment:failed" in slot)
        if "payment:verified" in slot:
            _, verified = slot["payment:verified"]
            assert _int(verified, "timestamp") == _int(received, "timestamp") + _int(
                verified, "verificationTime"
            )
            assert 5 <= _int(verified, "verificationTime") <= 5_000
        if "payment:settled" in slot:
            pos_settled, settled = slot["payment:settled"]
            _, verified = slot["payment:verified"]
            assert _int(settled, "timestamp") == _int(verified, "timestamp") + _int(
                settled, "settlementTime"
            )
            assert 50 <= _int(settled, "settlementTime") <= 60_000
            swapped += pos_settled < pos_received
        else:
            _, failed = slot["payment:failed"]
            assert _int(failed, "timestamp") >= _int(received, "timestamp")
    assert swapped > 0

    # delivery times never go back, and equal event timestamps except for re-deliveries
    sim = Simulator(SimulationConfig(seed=1, out_of_order_fraction=0.0, duplicate_fraction=0.0))
    previous = 0
    for due, event in sim.timeline(START_MS, 3_000, 100.0):
        assert due >= previous
        previous = due
        assert abs(_int(_data(event), "timestamp") - due) <= 1_000


def test_latency_distributions_are_realistic(traffic: list[EventDict]) -> None:
    unique = _unique(traffic)
    verification = [
        _int(_data(e), "verificationTime") for e in unique if e["type"] == "payment:verified"
    ]
    settlement = sorted(
        _int(_data(e), "settlementTime") for e in unique if e["type"] == "payment:settled"
    )
    assert 120 <= statistics.median(verification) <= 180
    assert 1_500 <= statistics.median(settlement) <= 3_000
    assert settlement[int(0.99 * len(settlement))] >= 8_000  # heavy tail
    assert max(settlement) <= 60_000


def _fractions(events: list[EventDict]) -> tuple[float, float]:
    """(settled delivered before their received / settled, re-deliveries / first deliveries)."""
    seen: set[bytes] = set()
    received: set[object] = set()
    settled = early = repeats = 0
    for event in events:
        body = encode_event(event)
        if body in seen:
            repeats += 1
            continue
        seen.add(body)
        data = _data(event)
        if event["type"] == "payment:received":
            received.add(data["paymentId"])
        elif event["type"] == "payment:settled":
            settled += 1
            early += data["paymentId"] not in received
    return early / settled, repeats / len(seen)


def test_out_of_order_and_duplicate_fractions(traffic: list[EventDict]) -> None:
    early, repeats = _fractions(traffic)
    assert 0.015 <= early <= 0.025
    assert 0.007 <= repeats <= 0.013

    config = SimulationConfig(seed=9, out_of_order_fraction=0.2, duplicate_fraction=0.1)
    early, repeats = _fractions(list(Simulator(config).events(START_MS, 5_000, 50.0)))
    assert 0.17 <= early <= 0.23
    assert 0.085 <= repeats <= 0.115

    config = SimulationConfig(seed=9, out_of_order_fraction=0.0, duplicate_fraction=0.0)
    assert _fractions(list(Simulator(config).events(START_MS, 5_000, 50.0))) == (0.0, 0.0)


def test_batches_account_for_every_settled_payment(traffic: list[EventDict]) -> None:
    unique = _unique(traffic)
    created = {_data(e)["batchId"]: _data(e) for e in unique if e["type"] == "batch:created"}
    settled_batches = [_data(e) for e in unique if e["type"] == "batch:settled"]
    assert len(created) == len(settled_batches) > 0
    payments = [_data(e) for e in unique if e["type"] == "payment:settled"]
    amounts = {
        _data(e)["paymentId"]: to_micro(str(_data(e)["amount"]))
        for e in unique
        if e["type"] == "payment:received"
    }
    assert sum(_int(b, "paymentCount") for b in created.values()) == len(payments)
    assert sum(to_micro(str(b["totalAmount"])) for b in created.values()) == sum(
        amounts[p["paymentId"]] for p in payments
    )
    assert sum(to_micro(str(b["totalFees"])) for b in settled_batches) == sum(
        to_micro(str(p["fee"])) for p in payments
    )
    for batch in settled_batches:
        origin = created[batch["batchId"]]
        count = _int(origin, "paymentCount")
        assert 1 <= count <= 25
        gas = int(str(batch["gasUsed"]))
        assert gas <= 1_000_000
        assert abs(gas - min(21_000 + 30_000 * count, 1_000_000)) <= 0.1 * (21_000 + 30_000 * count)
        assert _int(batch, "timestamp") > _int(origin, "timestamp")
        assert str(batch["transaction"]).startswith("0x") and len(str(batch["transaction"])) == 66


def test_fees_amounts_and_addresses(traffic: list[EventDict]) -> None:
    unique = _unique(traffic)
    amounts = {
        _data(e)["paymentId"]: Decimal(str(_data(e)["amount"]))
        for e in unique
        if e["type"] == "payment:received"
    }
    for event in unique:
        data = _data(event)
        if event["type"] == "payment:received":
            amount = str(data["amount"])
            assert len(amount.partition(".")[2]) <= 6
            assert Decimal("0.001") <= Decimal(amount) <= Decimal("100")
            for key in ("payer", "payee"):
                address = str(data[key])
                assert len(address) == 42 and address.startswith("0x")
                int(address, 16)
        elif event["type"] == "payment:settled":
            fee = Decimal(str(data["fee"]))
            expected = (amounts[data["paymentId"]] * Decimal("0.005")).quantize(Decimal("0.000001"))
            assert abs(fee - expected) <= Decimal("0.000001")


def test_zipf_skew_of_payers_and_payees(traffic: list[EventDict]) -> None:
    received = [_data(e) for e in _unique(traffic) if e["type"] == "payment:received"]
    payers = Counter(str(d["payer"]) for d in received)
    payees = Counter(str(d["payee"]) for d in received)
    top_payer = payers.most_common(1)[0][1]
    assert top_payer >= 20 * statistics.median(payers.values())
    assert top_payer >= 0.05 * len(received)
    assert payees.most_common(1)[0][1] >= 20 * statistics.median(payees.values())
    assert len(payers) > 1_000


def test_history_spans_the_window_with_exact_payment_count() -> None:
    end = START_MS
    events = list(Simulator(SimulationConfig(seed=11)).history(3_000, 7, end))
    stamps = [_int(_data(e), "timestamp") for e in events]
    assert end - 7 * DAY_MS <= min(stamps) and max(stamps) <= end
    unique = _unique(events)
    attempts = sum(
        1
        for e in unique
        if e["type"] == "payment:received"
        or (e["type"] == "payment:failed" and _data(e)["paymentId"] == "unknown")
    )
    assert attempts == 3_000
    days = Counter(
        (_int(_data(e), "timestamp") - (end - 7 * DAY_MS)) // DAY_MS
        for e in unique
        if e["type"] == "payment:received"
    )
    assert len(days) == 7


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="failure_fraction"):
        SimulationConfig(failure_fraction=1.5)
    with pytest.raises(ValueError, match="networks"):
        SimulationConfig(networks={})
    with pytest.raises(ValueError, match="rate_per_s"):
        next(Simulator().events(START_MS, 10, 0.0))
    config = SimulationConfig(networks={"eip155:43114": 1.0})
    networks = {_data(e).get("network") for e in Simulator(config).events(START_MS, 200, 10.0)}
    assert networks <= {"eip155:43114", None}


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_of_a_timed_run() -> None:
    """The simulate command's progress: bar, ETA, rate and the counters it adds."""
    clock = _Clock()
    stream = io.StringIO()
    display = Progress(stream, "events", total=60.0, clock=clock)
    clock.now += 15.0
    display.update(4_321, 15.0, detail="accepted 4,300  dup 20  rejected 1  errors 2")
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1  # not a terminal: one line each
    for text in (
        "25.0%",
        "ETA 0:45",
        "4,321 events",
        "288 events/s",
        "accepted 4,300",
        "dup 20",
        "rejected 1",
        "errors 2",
    ):
        assert text in line, text
    clock.now += 1.0
    display.update(4_400, 16.0)  # within 5 s of the last line: not drawn
    assert stream.getvalue() == line
    display.finish()  # the final state is drawn once
    assert stream.getvalue().count("\n") == 2 and "4,400 events" in stream.getvalue()


def test_progress_line_of_an_endless_run() -> None:
    """Without a total (simulate --duration 0) there is no bar and no ETA."""
    clock = _Clock()
    stream = io.StringIO()
    display = Progress(stream, "events", clock=clock)
    clock.now += 2.0
    display.update(1_000, 2.0)
    assert "ETA" not in stream.getvalue() and "[" not in stream.getvalue()
    assert "1,000 events  500 events/s" in stream.getvalue()


# ---------------------------------------------------------------------------------------
# run_simulation against a recording server


@dataclass
class _Recorder:
    """What the fake ingest endpoint received, and how it should answer."""

    content_types: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    events: list[EventDict] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    answers: list[tuple[int, dict[str, object], dict[str, str]]] = field(default_factory=list)
    requests: int = 0


async def _start(aiohttp_server: ServerFactory, recorder: _Recorder) -> str:
    async def ingest(request: web.Request) -> web.Response:
        recorder.requests += 1
        raw = await request.read()
        if recorder.answers:
            status, body, headers = recorder.answers.pop(0)
            return web.json_response(body, status=status, headers=headers)
        recorder.content_types.append(request.content_type)
        recorder.authorizations.append(request.headers.get("Authorization"))
        if request.content_type == "application/x-ndjson":
            batch = [json.loads(line) for line in raw.splitlines() if line]
        else:
            batch = [json.loads(raw)]
        for event in batch:
            parse_event(event)
        recorder.events.extend(batch)
        recorder.batch_sizes.append(len(batch))
        answer = {"accepted": len(batch), "duplicates": 0, "rejected": []}
        return web.json_response(answer, status=202)

    app = web.Application()
    app.router.add_post("/v1/events", ingest)
    server = await aiohttp_server(app)
    return str(server.make_url(""))


def _complete(events: list[EventDict]) -> None:
    """Every payment the server saw was received and ended settled or failed."""
    states: dict[object, set[str]] = {}
    for event in events:
        data = _data(event)
        if str(event["type"]).startswith("payment:") and data["paymentId"] != "unknown":
            states.setdefault(data["paymentId"], set()).add(str(event["type"]))
    assert states
    for seen in states.values():
        assert "payment:received" in seen
        assert ("payment:settled" in seen) != ("payment:failed" in seen)


async def test_run_simulation_single_events_with_token(aiohttp_server: ServerFactory) -> None:
    recorder = _Recorder()
    url = await _start(aiohttp_server, recorder)
    snapshots: list[SimulationProgress] = []
    summary = await run_simulation(
        url,
        rate=150.0,
        duration=0.6,
        seed=3,
        token="s3cret",
        concurrency=4,
        progress=snapshots.append,
        progress_interval=0.1,
    )
    assert set(recorder.content_types) == {"application/json"}
    assert set(recorder.authorizations) == {"Bearer s3cret"}
    assert summary.accepted == len(recorder.events) == summary.events == summary.requests
    assert summary.duplicates == summary.rejected == summary.errors == 0
    assert summary.status_counts == {202: summary.requests}
    assert 30 <= summary.payments <= 200
    assert summary.elapsed_s < 1.5
    assert snapshots and snapshots[-1].accepted == summary.accepted
    _complete(recorder.events)
    now_ms = time.time() * 1000
    stamps = [_int(_data(e), "timestamp") for e in recorder.events]
    assert now_ms - 5_000 <= min(stamps) and max(stamps) <= now_ms + 100_000


async def test_run_simulation_ndjson_batches(aiohttp_server: ServerFactory) -> None:
    recorder = _Recorder()
    url = await _start(aiohttp_server, recorder)
    summary = await run_simulation(url, rate=300.0, duration=0.5, batch_size=40, concurrency=2)
    assert set(recorder.content_types) == {"application/x-ndjson"}
    assert set(recorder.authorizations) == {None}
    assert max(recorder.batch_sizes) <= 40
    assert max(recorder.batch_sizes) == 40  # full batches at this rate
    assert summary.accepted == len(recorder.events) == summary.events
    assert summary.requests == len(recorder.batch_sizes) < summary.events
    _complete(recorder.events)


async def test_run_simulation_counts_server_answers(aiohttp_server: ServerFactory) -> None:
    recorder = _Recorder()
    recorder.answers = [
        (202, {"accepted": 0, "duplicates": 1, "rejected": []}, {}),
        (422, {"accepted": 0, "duplicates": 0, "rejected": [{"index": 0, "error": "x"}]}, {}),
        (401, {"accepted": 0, "duplicates": 0, "rejected": [], "error": "bad token"}, {}),
        (409, {"accepted": 0, "duplicates": 0, "rejected": [{"index": 0, "error": "c"}]}, {}),
    ]
    url = await _start(aiohttp_server, recorder)
    summary = await run_simulation(url, rate=100.0, duration=0.3, concurrency=1)
    assert summary.duplicates == 1
    assert summary.rejected == 2
    assert summary.errors == 1 and summary.unacknowledged == 1
    assert summary.last_error is not None and "401" in summary.last_error
    assert summary.accepted == len(recorder.events) == summary.events - 4
    assert summary.status_counts[401] == 1 and summary.status_counts[409] == 1


async def test_run_simulation_retries_503_after_retry_after(
    aiohttp_server: ServerFactory,
) -> None:
    recorder = _Recorder()
    recorder.answers = [
        (503, {"accepted": 0, "duplicates": 0, "rejected": []}, {"Retry-After": "1"})
    ]
    url = await _start(aiohttp_server, recorder)
    started = time.monotonic()
    summary = await run_simulation(url, rate=50.0, duration=0.2, batch_size=1000)
    assert time.monotonic() - started >= 1.0
    assert summary.retries == 1
    assert summary.status_counts[503] == 1
    assert summary.errors == 0
    assert summary.accepted == len(recorder.events) == summary.events > 0
    assert recorder.requests == summary.requests + 1


async def test_run_simulation_until_stopped(aiohttp_server: ServerFactory) -> None:
    recorder = _Recorder()
    url = await _start(aiohttp_server, recorder)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.4, stop.set)
    summary = await run_simulation(url, rate=100.0, duration=None, stop=stop)
    assert 0.35 <= summary.elapsed_s < 1.5
    assert summary.payments > 10
    assert summary.accepted == len(recorder.events)
    _complete(recorder.events)


async def test_run_simulation_never_raises_on_refused_connections() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    summary = await run_simulation(
        f"http://127.0.0.1:{port}", rate=50.0, duration=0.2, max_retries=0
    )
    assert summary.errors == summary.requests > 0
    assert summary.unacknowledged == summary.events
    assert summary.accepted == 0
    assert summary.last_error is not None
