"""Soak benchmark: a steady stream of events through an InfluxDB outage and a ``kill -9``.

The exporter runs as a subprocess (``python -m exporter serve``, SQLite ledger in a
temporary data dir) shipping to the InfluxDB stand-in of ``tests/influx_fault_server.py``,
which runs in a child process of its own (so that parsing the points it receives does
not stall the load generator) and keys every point as InfluxDB does. This process
POSTs realistic simulated events (:mod:`exporter.cli.simulate`: payments with their
verifications, settlements and failures, batches, revenue, WebSocket counts, re-deliveries
and out-of-order settlements), one event per request, at ``--rate`` events/s for
``--duration`` seconds, in phases (fractions of the duration):

- warm-up (0-15 %), then steady (15-40 %): the stand-in also answers a few writes with
  500, 429 and 503 (``Retry-After: 1``) and one write slowly, past the exporter's
  InfluxDB timeout (2 s here), after which it stores the points anyway, so that the
  exporter writes them again;
- outage (40-73 %, a third of the run): the stand-in stops listening (connection refused);
  half-way through, with the ledger's outbox holding the outage's backlog, the exporter
  is killed with SIGKILL and started again on the same data dir ("restart" below is the
  rest of the outage);
- recovery (73-100 %): the stand-in listens again and the backlog drains while events
  keep coming;
- flush: events of payments still in flight at the end (settlements, batches), sent at
  once so that every payment ends.

The client honours the exporter's ``503`` + ``Retry-After`` (its backlog limit,
``--max-backlog``) and retries a request that got no answer (connection refused or reset
while the exporter is down) until it is answered, as a producer with at-least-once
delivery does; neither is a loss. A request whose answer was lost to the kill is "in
flight at the kill": its retry is answered ``duplicates: 1`` if the exporter had
committed it before dying.

After the run it waits for the store backlog to drain, then checks:

1. every acknowledged event (202 with ``accepted`` or ``duplicates`` 1) is a point in the
   stand-in. An event's point is computed as the exporter renders it: measurement and
   tags (the network comes from the payment's or batch's first event) and the timestamp
   derived from the event's dedup key. The stand-in, like InfluxDB, keeps one row per
   (series, timestamp): a write repeated after a timeout, an outage or the kill
   overwrites that row instead of adding one, so a repeated delivery is not a duplicate
   row and is reported separately (points written more than once);
2. no duplicate rows: every stored point (except the exporter's own ``analytics``
   points) is the point of an event this process sent. A second row for one event could
   only differ in series or timestamp, so it would be a point that no sent event maps to;
3. every event sent was acknowledged (nothing rejected, nothing left unanswered);
4. the store backlog drained within ``--drain-timeout``;
5. the exporter's resident memory (VmRSS, sampled every second) stayed within 20 % above
   its level at the end of its warm-up. The restarted process gets its own baseline,
   taken the same warm-up length after it started: a new process starts from a fresh heap,
   so the first process's level says nothing about it. Only growth fails the check.

It prints per phase: events due, acknowledged (accepted, duplicates), 503 answers,
requests retried after no answer, p50/p99/max latency of the acknowledging request, the
longest wait from an event's due time to its acknowledgement, and how late the client
sent (its own lag on this shared machine); then the kill, the store's view, memory and
one PASS/FAIL line per check. Exit status 1 when a check fails.

The client, the exporter and the stand-in share this machine's cores, so latency is
noisy, and a loaded machine shows up as client lag and a long drain.

Run: ``.venv/bin/python bench/soak.py [--rate N] [--duration S] [--max-backlog N]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _servers  # noqa: E402
from _servers import write  # noqa: E402
from influx_fault_server import (  # noqa: E402
    InfluxFaultServer,
    PointKey,
    Reply,
    ThreadedInfluxFaultServer,
    split_point,
)

from exporter.cli.simulate import EventDict, SimulationConfig, Simulator, encode_event  # noqa: E402
from exporter.events import canonical_json, dedup_key, join_ref, parse_event  # noqa: E402
from exporter.records import (  # noqa: E402
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
)
from exporter.store.influx.store import to_line  # noqa: E402

TOKEN, ORG, BUCKET = "soak-token", "soak-org", "payments"
INFLUX_TIMEOUT_S = 2.0
"""The exporter's InfluxDB timeout here; the stand-in's slow answer outlasts it."""
RSS_TOLERANCE = 0.20
SAMPLE_INTERVAL_S = 1.0
WARMUP_END, STEADY_END, OUTAGE_END = 0.15, 0.40, 0.40 + 1 / 3
_ANALYTICS_MEASUREMENT = "analytics"
_RETRY_AFTER_CAP_S = 60.0
_REQUEST_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------
# the InfluxDB stand-in, in a child process


def _fault_server_child(conn: Connection) -> None:
    """Run the stand-in and obey commands from the pipe until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    runner = ThreadedInfluxFaultServer(InfluxFaultServer(token=TOKEN, org=ORG, bucket=BUCKET))
    server = runner.__enter__()
    conn.send(server.url)
    try:
        while True:
            command, *args = conn.recv()
            if command == "outage":
                runner.call(server.outage())
                conn.send(None)
            elif command == "resume":
                runner.call(server.resume())
                conn.send(None)
            elif command == "push":
                server.push(*args)
                conn.send(None)
            elif command == "points":
                # asked for once the exporter is stopped: nothing writes any more
                conn.send(dict(server.deliveries))
            elif command == "requests":
                statuses = Counter(request.status for request in server.request_log())
                conn.send(dict(statuses))
            elif command == "stop":
                conn.send(None)
                return
    finally:
        runner.__exit__(None, None, None)


class _FaultServer:
    """The parent's handle on the stand-in's child process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_fault_server_child, args=(child_conn,), name="influx-stand-in", daemon=True
        )
        self._process.start()
        if not self._conn.poll(_servers.START_DEADLINE_S):
            self._process.kill()
            raise RuntimeError("the InfluxDB stand-in did not start")
        self.url: str = self._conn.recv()
        self._lock = asyncio.Lock()

    def call(self, *command: Any) -> Any:
        """Send a command and wait for its answer (blocking)."""
        self._conn.send(command)
        if not self._conn.poll(120.0):
            raise RuntimeError(f"the InfluxDB stand-in did not answer {command[0]!r}")
        return self._conn.recv()

    async def acall(self, *command: Any) -> Any:
        """:meth:`call` off the event loop, one command at a time."""
        async with self._lock:
            return await asyncio.to_thread(self.call, *command)

    def stop(self) -> None:
        """Stop the child (kill it if it does not stop in time)."""
        if self._process.is_alive():
            with contextlib.suppress(OSError, RuntimeError, EOFError):
                self.call("stop")
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(10)


# ---------------------------------------------------------------------------------------
# events and their points


class _Identity(NamedTuple):
    """What the check needs of a sent event to compute its point."""

    key: str
    type: str
    time_ms: int
    ref: str | None
    network: str | None
    """The event's own network (or None), joined networks are resolved at the end."""
    kind: str | None


def _identity(event: EventDict) -> _Identity:
    """The dedup key (as the exporter derives it) and the point-relevant fields."""
    parsed = parse_event(event)
    data: dict[str, Any] = event["data"]  # type: ignore[assignment]
    network = data.get("network")
    return _Identity(
        dedup_key(parsed, canonical_json(parsed)),
        str(event["type"]),
        int(data["timestamp"]),
        join_ref(parsed),
        network if isinstance(network, str) else None,
        data.get("kind"),
    )


def _record(ident: _Identity, networks: dict[str, str]) -> StoreRecord | None:
    """A record with the tags and key the exporter gives this event; None while its join
    base (``payment:received`` or ``batch:created``) was never acknowledged."""
    kind, status = ident.type.split(":")
    if kind == "payment":
        if ident.ref is None:  # failed before it had a payment id: its own network
            network = ident.network or "unknown"
        elif (joined := networks.get(ident.ref)) is None:
            return None
        else:
            network = joined
        return PaymentRecord(ident.key, ident.time_ms, network, status, ident.ref or "unknown")
    if kind == "batch":
        assert ident.ref is not None
        if (joined := networks.get(ident.ref)) is None:
            return None
        return BatchRecord(ident.key, ident.time_ms, joined, status, ident.ref, 0, 0)
    if kind == "revenue":
        assert ident.network is not None and ident.kind is not None
        return RevenueRecord(ident.key, ident.time_ms, ident.network, ident.kind, 0)
    return WebsocketRecord(ident.key, ident.time_ms, 0)


def _point_key(record: StoreRecord) -> PointKey:
    """(series, timestamp) of the record's line, as InfluxDB keys the point."""
    series, _, timestamp = split_point(to_line(record))
    return series, timestamp


def _events_per_payment(config: SimulationConfig) -> float:
    """Events the simulator produces per payment attempt, measured on a sample."""
    sample = 20_000
    events = sum(1 for _ in Simulator(config).events(0, sample, 100.0))
    return events / sample


# ---------------------------------------------------------------------------------------
# accounting


@dataclass
class _PhaseStats:
    """What the client saw of the events due in one phase."""

    name: str
    start: float
    end: float
    due: int = 0
    acknowledged: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused_503: int = 0
    no_answer: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    max_wait: float = 0.0


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class _Sample:
    """One periodic observation of the exporter."""

    at: float
    generation: int
    rss_mib: float | None
    store_backlog: int | None


@dataclass
class _Kill:
    """The kill -9 and what it left behind."""

    at: float = 0.0
    backlog_before: int | None = None
    down_seconds: float = 0.0
    in_flight_requests: int = 0
    retried_accepted: int = 0
    retried_duplicates: int = 0


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value) if value else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.05), _RETRY_AFTER_CAP_S)


# ---------------------------------------------------------------------------------------
# the run


class _Soak:
    """One soak run: load, scenario, sampling and the final check."""

    def __init__(self, args: argparse.Namespace, workdir: Path, fault: _FaultServer) -> None:
        self.args = args
        self.workdir = workdir
        self.fault = fault
        self.duration: float = args.duration
        self.warmup_end = WARMUP_END * self.duration
        self.steady_end = STEADY_END * self.duration
        self.outage_end = OUTAGE_END * self.duration
        self.kill_at = (self.steady_end + self.outage_end) / 2
        bounds = [
            ("warm-up", 0.0, self.warmup_end),
            ("steady", self.warmup_end, self.steady_end),
            ("outage", self.steady_end, self.kill_at),
            ("restart", self.kill_at, self.outage_end),
            ("recovery", self.outage_end, self.duration),
            ("flush", self.duration, math.inf),
        ]
        self.phases = {name: _PhaseStats(name, start, end) for name, start, end in bounds}
        self.port = _servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = _servers.clean_env()
        env.update(
            EXPORTER_STORE="influxdb",
            EXPORTER_INFLUX_URL=fault.url,
            EXPORTER_INFLUX_TOKEN=TOKEN,
            EXPORTER_INFLUX_ORG=ORG,
            EXPORTER_INFLUX_BUCKET=BUCKET,
            EXPORTER_INFLUX_TIMEOUT_SECONDS=str(INFLUX_TIMEOUT_S),
        )
        if args.max_backlog is not None:
            env["EXPORTER_MAX_BACKLOG_EVENTS"] = str(args.max_backlog)
        self.env = env
        self.argv = _servers.exporter_serve(self.port, "--data-dir", str(workdir / "data"))
        self.exporters: list[_servers.Server] = []
        self.cpu_seconds: list[float | None] = []
        self.started_at: list[float] = []
        self.samples: list[_Sample] = []
        self.kill = _Kill()
        self.killed = False
        self.acknowledged: list[_Identity] = []
        self.unanswered: list[_Identity] = []
        self.rejections: list[str] = []
        self.load_end = 0.0
        self.drain_seconds: float | None = None
        self.final_ready: dict[str, Any] = {}
        self.t0 = 0.0
        self.give_up_at = math.inf

    # ----------------------------------------------------------------- helpers

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    def phase_at(self, t: float) -> _PhaseStats:
        """The phase an event due at ``t`` belongs to."""
        for stats in self.phases.values():
            if stats.start <= t < stats.end:
                return stats
        return self.phases["flush"]

    async def sleep_until(self, t: float) -> None:
        """Sleep until ``t`` seconds after the start of the load."""
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def start_exporter(self) -> _servers.Server:
        """Start (or restart) the exporter on the same port and data dir (blocking)."""
        name = f"exporter-{len(self.exporters) + 1}"
        return _servers.start(name, self.argv, self.port, self.workdir, self.env)

    async def readyz(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The exporter's /readyz document, None when it does not answer."""
        try:
            async with session.get(self.url + "/readyz") as response:
                doc = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    # ----------------------------------------------------------------- load

    async def post(
        self, session: aiohttp.ClientSession, body: bytes, ident: _Identity, due: float
    ) -> None:
        """POST one event until it is answered; 503 waits its Retry-After."""
        stats = self.phase_at(due)
        stats.due += 1
        began = self.now()
        stats.lags.append(max(began - due, 0.0))
        in_flight_at_kill = False
        attempt = 0
        headers = {"Content-Type": "application/json"}
        while True:
            sent = self.now()
            try:
                async with session.post(
                    self.url + "/v1/events", data=body, headers=headers
                ) as response:
                    status = response.status
                    answer = await response.read()
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError):
                if self.killed and sent <= self.kill.at and not in_flight_at_kill:
                    in_flight_at_kill = True
                    self.kill.in_flight_requests += 1
                stats.no_answer += 1
                if self.now() > self.give_up_at:
                    self.unanswered.append(ident)
                    return
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
                attempt += 1
                continue
            if status in (429, 503):
                stats.refused_503 += 1
                await asyncio.sleep(_retry_after(retry_after))
                continue
            done = self.now()
            try:
                doc = json.loads(answer)
            except ValueError:
                doc = None
            if 200 <= status < 300 and isinstance(doc, dict) and not doc.get("rejected"):
                accepted, duplicates = int(doc.get("accepted", 0)), int(doc.get("duplicates", 0))
                if accepted + duplicates == 1:
                    stats.acknowledged += 1
                    stats.accepted += accepted
                    stats.duplicates += duplicates
                    stats.latencies.append(done - sent)
                    stats.max_wait = max(stats.max_wait, done - due)
                    self.acknowledged.append(ident)
                    if in_flight_at_kill:
                        self.kill.retried_accepted += accepted
                        self.kill.retried_duplicates += duplicates
                    return
            stats.rejected += 1
            if len(self.rejections) < 5:
                self.rejections.append(f"HTTP {status}: {answer[:300].decode(errors='replace')}")
            return

    async def load(self, session: aiohttp.ClientSession) -> None:
        """Send the simulated events at their due times, each in its own task."""
        config = SimulationConfig(seed=self.args.seed, id_namespace=f"soak{int(time.time()):x}-")
        per_payment = _events_per_payment(config)
        payments_per_s = self.args.rate / per_payment
        write(
            f"simulator: {per_payment:.3f} events per payment -> {payments_per_s:,.1f} "
            f"payments/s for {self.args.rate:,.0f} events/s"
        )
        start_ms = int(time.time() * 1000)
        payments = max(1, round(payments_per_s * self.duration))
        timeline = Simulator(config).timeline(start_ms, payments, payments_per_s)
        tasks: set[asyncio.Task[None]] = set()
        self.t0 = time.monotonic()
        scenario = asyncio.create_task(self.scenario(session))
        try:
            for due_ms, event in timeline:
                if scenario.done():
                    scenario.result()  # a failed restart ends the run here
                due = (due_ms - start_ms) / 1000
                if due < self.duration:
                    await self.sleep_until(due)
                else:
                    due = max(due, self.duration)
                    await self.sleep_until(self.duration)
                task = asyncio.create_task(
                    self.post(session, encode_event(event), _identity(event), due)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await scenario
            self.give_up_at = self.now() + self.args.drain_timeout
            await asyncio.gather(*tasks)
            self.load_end = self.now()
        finally:
            scenario.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(scenario, *tasks, return_exceptions=True)

    # ----------------------------------------------------------------- scenario

    async def scenario(self, session: aiohttp.ClientSession) -> None:
        """Faults at the steady phase, the outage, the kill and restart, the recovery."""
        await self.sleep_until(self.warmup_end)
        await self.fault.acall(
            "push",
            Reply(500, "soak: internal error"),
            Reply(429, "soak: slow down", retry_after="1"),
            Reply(503, "soak: unavailable", retry_after="1"),
            Reply(204, delay=INFLUX_TIMEOUT_S + 1.0),
        )
        await self.sleep_until(self.steady_end)
        await self.fault.acall("outage")
        write(f"{self.now():7.1f}s InfluxDB stand-in down (connection refused)")
        await self.sleep_until(self.kill_at)
        ready = await self.readyz(session)
        self.kill.backlog_before = _servers.store_backlog(ready) if ready else None
        victim = self.exporters[-1]
        self.cpu_seconds.append(victim.cpu_seconds())
        self.kill.at = self.now()
        self.killed = True
        victim.process.kill()
        await asyncio.to_thread(victim.process.wait)
        victim.stop()
        write(
            f"{self.now():7.1f}s exporter killed (SIGKILL) with a store backlog of "
            f"{self.kill.backlog_before} events; restarting it"
        )
        restarted = await asyncio.to_thread(self.start_exporter)
        self.kill.down_seconds = self.now() - self.kill.at
        self.exporters.append(restarted)
        self.started_at.append(self.now())
        write(
            f"{self.now():7.1f}s exporter answers again, "
            f"{self.kill.down_seconds:.1f}s after the kill"
        )
        await self.sleep_until(self.outage_end)
        await self.fault.acall("resume")
        write(f"{self.now():7.1f}s InfluxDB stand-in back")

    # ----------------------------------------------------------------- sampling

    async def sample(self, session: aiohttp.ClientSession) -> None:
        """Every second: the exporter's VmRSS and store backlog; a progress line now and then."""
        next_progress = self.args.progress
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            generation = len(self.exporters) - 1
            rss = self.exporters[-1].rss_mib()
            ready = await self.readyz(session)
            backlog = _servers.store_backlog(ready) if ready else None
            t = self.now()
            self.samples.append(_Sample(t, generation, rss, backlog))
            if t >= next_progress:
                next_progress += self.args.progress
                acked = sum(s.acknowledged for s in self.phases.values())
                shown = f"{rss:.1f} MiB" if rss is not None else "-"
                write(
                    f"{t:7.1f}s {self.phase_at(t).name:<8} acknowledged {acked:>9,} "
                    f"store backlog {backlog if backlog is not None else '-':>8} RSS {shown}"
                )

    async def drain(self, session: aiohttp.ClientSession) -> None:
        """Wait (bounded) until the store backlog is empty; keep the final /readyz."""
        began = self.now()
        while self.now() - began < self.args.drain_timeout:
            ready = await self.readyz(session)
            if ready is not None and _servers.store_backlog(ready) == 0:
                self.drain_seconds = self.now() - began
                self.final_ready = ready
                return
            await asyncio.sleep(0.2)
        self.final_ready = await self.readyz(session) or {}

    async def run(self) -> None:
        """Start the exporter, run load and scenario, drain, stop the exporter."""
        self.exporters.append(await asyncio.to_thread(self.start_exporter))
        self.started_at.append(0.0)
        timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=256)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as probe,
        ):
            sampler = asyncio.create_task(self.sample(probe))
            try:
                await self.load(session)
                write(f"{self.now():7.1f}s load done; waiting for the store backlog to drain")
                await self.drain(probe)
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
        self.cpu_seconds.append(self.exporters[-1].cpu_seconds())

    def stop(self) -> None:
        """Stop every exporter still running."""
        for server in self.exporters:
            server.stop()


# ---------------------------------------------------------------------------------------
# report


@dataclass
class _Check:
    name: str
    passed: bool
    detail: str


def _phase_table(soak: _Soak) -> None:
    header = (
        f"{'phase':<9} {'from s':>7} {'to s':>7} {'due':>8} {'acked':>8} {'accepted':>8} "
        f"{'dup':>6} {'503':>6} {'no ans':>6} {'rej':>4} {'p50 ms':>7} {'p99 ms':>8} "
        f"{'max ms':>8} {'max wait s':>10} {'lag p99 ms':>10}"
    )
    write(header)
    write("-" * len(header))
    for s in soak.phases.values():
        end = s.end if math.isfinite(s.end) else soak.load_end
        write(
            f"{s.name:<9} {s.start:>7.1f} {end:>7.1f} {s.due:>8,} {s.acknowledged:>8,} "
            f"{s.accepted:>8,} {s.duplicates:>6,} {s.refused_503:>6,} {s.no_answer:>6,} "
            f"{s.rejected:>4,} {_percentile(s.latencies, 50) * 1000:>7.2f} "
            f"{_percentile(s.latencies, 99) * 1000:>8.2f} "
            f"{max(s.latencies, default=0.0) * 1000:>8.2f} {s.max_wait:>10.2f} "
            f"{_percentile(s.lags, 99) * 1000:>10.2f}"
        )


def _memory_checks(soak: _Soak) -> list[_Check]:
    checks = []
    warmup = soak.warmup_end
    for generation, started in enumerate(soak.started_at):
        samples = [s for s in soak.samples if s.generation == generation and s.rss_mib is not None]
        after = [s for s in samples if s.at >= started + warmup]
        name = f"RSS of exporter process {generation + 1}"
        if not after:
            checks.append(_Check(name, False, "no sample after its warm-up"))
            continue
        baseline = after[0]
        assert baseline.rss_mib is not None
        rss = [s.rss_mib for s in after if s.rss_mib is not None]
        peak, low = max(rss), min(rss)
        limit = baseline.rss_mib * (1 + RSS_TOLERANCE)
        checks.append(
            _Check(
                name,
                peak <= limit,
                f"baseline {baseline.rss_mib:.1f} MiB at {baseline.at:.0f}s, then "
                f"{low:.1f}..{peak:.1f} MiB over {len(rss)} samples to {after[-1].at:.0f}s "
                f"(peak {peak / baseline.rss_mib - 1:+.1%}, limit +{RSS_TOLERANCE:.0%} = "
                f"{limit:.1f} MiB)",
            )
        )
    return checks


def _store_checks(soak: _Soak, deliveries: dict[PointKey, int]) -> list[_Check]:
    networks: dict[str, str] = {}
    for ident in soak.acknowledged:
        if ident.type in ("payment:received", "batch:created") and ident.ref is not None:
            assert ident.network is not None
            networks[ident.ref] = ident.network
    expected: set[PointKey] = set()
    waiting = 0
    for ident in soak.acknowledged:
        record = _record(ident, networks)
        if record is None:
            waiting += 1
        else:
            expected.add(_point_key(record))
    for ident in soak.unanswered:  # not acknowledged: may or may not be stored
        if ident.type in ("payment:received", "batch:created") and ident.ref is not None:
            assert ident.network is not None
            networks.setdefault(ident.ref, ident.network)
    maybe = {
        _point_key(record)
        for ident in soak.unanswered
        if (record := _record(ident, networks)) is not None
    }
    rows = {
        key: n for key, n in deliveries.items() if key[0].split(",", 1)[0] != _ANALYTICS_MEASUREMENT
    }
    missing = expected - rows.keys()
    unexpected = rows.keys() - expected - maybe
    rewritten = sum(1 for n in rows.values() if n > 1)
    analytics = len(deliveries) - len(rows)
    distinct_events = len({ident.key for ident in soak.acknowledged})
    write(
        f"store: {len(rows):,} event rows ({analytics:,} analytics points aside); "
        f"{len(soak.acknowledged):,} acknowledgements for {distinct_events:,} distinct events "
        f"-> {len(expected):,} expected points; {rewritten:,} rows written more than once "
        f"(overwrites, as InfluxDB merges a point with equal series and timestamp); "
        f"{sum(rows.values()):,} lines accepted in all"
    )
    dead = soak.final_ready.get("ledger", {}).get("deadLetters")
    joins = soak.final_ready.get("ledger", {}).get("waitingForJoin")
    write(f"exporter ledger at the end: dead letters {dead}, events waiting for a join {joins}")
    for key in sorted(missing)[:5]:
        write(f"  missing: {key[0]} {key[1]}")
    for key in sorted(unexpected)[:5]:
        write(f"  unexpected: {key[0]} {key[1]}")
    return [
        _Check(
            "every acknowledged event stored",
            not missing and waiting == 0,
            f"{len(expected) - len(missing):,} of {len(expected):,} expected points present, "
            f"{len(missing):,} missing; {waiting:,} acknowledged events whose join base was "
            "never acknowledged",
        ),
        _Check(
            "no duplicate rows",
            not unexpected,
            f"{len(unexpected):,} stored points that no sent event maps to "
            f"({len(maybe):,} points of unanswered events allowed)",
        ),
    ]


def _report(soak: _Soak, deliveries: dict[PointKey, int], requests: dict[int, int]) -> bool:
    write("")
    _phase_table(soak)
    write(
        "latency: POST of the acknowledging attempt (from the client starting it to the "
        "answer); max wait: from the event's due time to its acknowledgement, retries "
        "included; lag: how late the client started the POST"
    )
    kill = soak.kill
    write(
        f"kill -9 at {kill.at:.1f}s with a store backlog of {kill.backlog_before} events; "
        f"the exporter answered /healthz again after {kill.down_seconds:.2f}s; "
        f"{kill.in_flight_requests:,} requests in flight at the kill (no answer), retried: "
        f"{kill.retried_accepted:,} accepted (not committed before the kill), "
        f"{kill.retried_duplicates:,} duplicates (committed, answer lost)"
    )
    backlog = [s.store_backlog for s in soak.samples if s.store_backlog is not None]
    peak_at = max(
        (s for s in soak.samples if s.store_backlog is not None),
        key=lambda s: s.store_backlog or 0,
        default=None,
    )
    write(
        f"store backlog peak {max(backlog, default=0):,} events"
        + (f" at {peak_at.at:.0f}s" if peak_at else "")
        + (
            f"; drained {soak.drain_seconds:.1f}s after the load ended"
            if soak.drain_seconds is not None
            else "; did not drain"
        )
    )
    write(f"InfluxDB stand-in write answers: {dict(sorted(requests.items()))}")
    for i, cpu in enumerate(soak.cpu_seconds):
        if cpu is not None:
            write(f"exporter process {i + 1}: {cpu:.1f} CPU seconds")
    if soak.rejections:
        write("rejections: " + "; ".join(soak.rejections))
    rejected = sum(s.rejected for s in soak.phases.values())
    acked = sum(s.acknowledged for s in soak.phases.values())
    due = sum(s.due for s in soak.phases.values())
    checks = _store_checks(soak, deliveries)
    checks.append(
        _Check(
            "every event sent acknowledged",
            rejected == 0 and not soak.unanswered and acked == due,
            f"{acked:,} of {due:,} acknowledged, {rejected:,} rejected, "
            f"{len(soak.unanswered):,} never answered; "
            f"{sum(s.refused_503 for s in soak.phases.values()):,} 503 answers honoured",
        )
    )
    checks.append(
        _Check(
            "store backlog drained",
            soak.drain_seconds is not None,
            f"within {soak.args.drain_timeout:.0f}s after the load"
            if soak.drain_seconds is not None
            else f"still {_servers.store_backlog(soak.final_ready) if soak.final_ready else '?'} "
            f"after {soak.args.drain_timeout:.0f}s",
        )
    )
    checks.extend(_memory_checks(soak))
    write("")
    for check in checks:
        write(f"{'PASS' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    return all(check.passed for check in checks)


# ---------------------------------------------------------------------------------------
# main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=500.0, help="events/s (default 500)")
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds of load (default 600)"
    )
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=None,
        help="EXPORTER_MAX_BACKLOG_EVENTS for the exporter (default: its own default)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the store backlog after the load (default 300)",
    )
    parser.add_argument(
        "--progress", type=float, default=30.0, help="seconds between progress lines"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration < 20:
        parser.error("--rate must be > 0 and --duration at least 20 seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak and print the report; 1 when a check fails."""
    args = _parse(argv)
    write(
        f"soak: {args.rate:,.0f} events/s for {args.duration:,.0f}s; cpus: {os.cpu_count()}, "
        "shared by the client, the exporter and the InfluxDB stand-in"
    )
    fault = _FaultServer()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
            soak = _Soak(args, Path(tmp), fault)
            write(
                f"phases: warm-up 0-{soak.warmup_end:.0f}s, steady -{soak.steady_end:.0f}s, "
                f"outage -{soak.outage_end:.0f}s (kill -9 at {soak.kill_at:.0f}s), "
                f"recovery -{args.duration:.0f}s, then flush and drain"
            )
            try:
                asyncio.run(soak.run())
            except RuntimeError as error:
                sys.stderr.write(f"bench: {error}\n")
                return 1
            finally:
                soak.stop()
            deliveries = fault.call("points")
            requests = fault.call("requests")
            passed = _report(soak, deliveries, requests)
    finally:
        fault.stop()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
