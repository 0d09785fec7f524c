"""Ingest benchmark: the exporter's ``POST /v1/events`` against a no-op aiohttp handler.

Starts two servers as subprocesses on loopback: the exporter on its embedded default
(``python -m exporter serve``, SQLite ledger + DuckDB store in a temporary data dir) and
a minimal aiohttp app that reads each body and answers 202 with a fixed JSON body. Then,
against both, from this process:

(a) single-event ``application/json`` POSTs over 32 concurrent keep-alive connections;
(b) NDJSON batches of 1,000 events over 4 connections.

The bodies are unique simulated events generated up front (not timed). The table gives
requests/s, acknowledged events/s (events in 2xx answers), the exporter/no-op ratio,
p50/p99 request latency, the server's CPU time per event (all threads; steadier than
throughput on a shared machine) and each server's peak RSS (VmHWM). ``--events N`` instead
pushes N events (1,000,000 when no N is given) in batches to the exporter alone, for
the peak-RSS figure under sustained load.

The load generator, both servers and the exporter's background work share this
machine's cores, so the figures are a floor and the ratio is the useful number.

Both phases run ``--rounds`` times (3), each time against both servers back to back with
fresh events; the ratio and throughput are reported per round and as the median, since
one round on a shared machine can be off by a fifth.

``--token TOKEN`` starts the exporter with that ingest token (``EXPORTER_INGEST_TOKEN``)
and sends ``Authorization: Bearer TOKEN`` on every request, to both servers alike, so that
the bearer check is in the figures. ``--amount-format six`` writes every money field
(``amount``, ``fee``, ``totalAmount``, ``totalFees``) with exactly six decimals
(``"0.010000"``), as facilitators format USDC; the default, ``shortest``, keeps the
simulator's 2 to 6 decimals (``"0.01"``). The configuration the ingest target is stated
for (at least 30,000 acknowledged events/s for the batches):

    .venv/bin/python bench/ingest.py --token bench-token --amount-format six

Run: ``.venv/bin/python bench/ingest.py [--rounds N] [--requests N] [--batches N] [--events [N]]
[--token TOKEN] [--amount-format {shortest,six}]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exporter.cli.simulate import SimulationConfig, Simulator, encode_event  # noqa: E402

log = logging.getLogger("bench.ingest")

_NOOP_ANSWER = b'{"accepted":1,"duplicates":0,"rejected":[]}'
_MAX_ATTEMPTS = 20
_MONEY_FIELDS = ("amount", "fee", "totalAmount", "totalFees")


import _servers  # noqa: E402
from _servers import write  # noqa: E402

# ---------------------------------------------------------------------------------------
# servers


def _serve_noop(port: int) -> None:
    """Run the no-op ingest handler (the baseline) until terminated."""

    async def ingest(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202, body=_NOOP_ANSWER, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/events", ingest)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---------------------------------------------------------------------------------------
# bodies


def _six_decimals(value: str) -> str:
    """A simulator money string (at most six decimals) with exactly six: ``"0.010000"``."""
    whole, _, fraction = value.partition(".")
    if len(fraction) > 6:
        raise ValueError(f"{value!r} has more than six decimals")
    return f"{whole}.{fraction.ljust(6, '0')}"


def _events(count: int, namespace: str, seed: int, amount_format: str = "shortest") -> list[bytes]:
    """``count`` unique events (no re-deliveries) encoded as JSON, timestamps near now;
    with ``amount_format`` ``"six"``, every money field written with six decimals."""
    config = SimulationConfig(seed=seed, duplicate_fraction=0.0, id_namespace=namespace)
    start_ms = int(time.time() * 1000) - 3_600_000
    rate = max(50.0, count / 3_000)  # the events span about an hour of simulated time
    lines: list[bytes] = []
    for event in Simulator(config).events(start_ms, None, rate):
        data = event["data"]
        if amount_format == "six" and isinstance(data, dict):
            for name in _MONEY_FIELDS:
                if name in data:
                    data[name] = _six_decimals(data[name])
        lines.append(encode_event(event))
        if len(lines) == count:
            break
    return lines


def _batches(lines: Sequence[bytes], size: int) -> list[tuple[bytes, int]]:
    """NDJSON bodies of ``size`` events each (the last may be shorter)."""
    out = []
    for start in range(0, len(lines), size):
        chunk = lines[start : start + size]
        out.append((b"".join(line + b"\n" for line in chunk), len(chunk)))
    return out


# ---------------------------------------------------------------------------------------
# load


@dataclass
class _Result:
    """What one load phase measured."""

    target: str
    phase: str
    round: int = 1
    seconds: float = 0.0
    requests: int = 0
    events: int = 0
    acknowledged: int = 0
    accepted: int = 0
    duplicates: int = 0
    retries: int = 0
    failures: int = 0
    cpu_seconds: float | None = None
    drain_seconds: float | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Acknowledged events per second (0 before the phase ran)."""
        return self.acknowledged / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the request latencies, in ms."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = max(1, -(-int(p * len(ordered)) // 100))
        return ordered[min(rank, len(ordered)) - 1] * 1000


@dataclass
class _Phase:
    """One load phase: its bodies (with their event counts) and how they are sent."""

    label: str
    bodies: list[tuple[bytes, int]]
    content_type: str
    connections: int


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or "0.2"), 0.05), 10.0)
    except ValueError:
        return 0.5


async def _load(
    url: str,
    bodies: Sequence[tuple[bytes, int]],
    content_type: str,
    connections: int,
    result: _Result,
    token: str | None = None,
) -> _Result:
    """POST every body once (503 retried per Retry-After) over ``connections`` workers,
    with ``Authorization: Bearer token`` when a token is given."""
    endpoint = url + "/v1/events"
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < len(bodies):
            body, count = bodies[next_index]
            next_index += 1
            began = time.perf_counter()
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    async with session.post(endpoint, data=body, headers=headers) as response:
                        status = response.status
                        answer = await response.read()
                        retry_after = response.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError) as error:
                    log.warning("request failed: %r", error)
                    status, answer, retry_after = 0, b"", None
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 503 and attempt + 1 < _MAX_ATTEMPTS:
                    result.retries += 1
                    await asyncio.sleep(_retry_after(retry_after))
                    continue
                break
            result.latencies.append(time.perf_counter() - began)
            result.requests += 1
            result.events += count
            if 200 <= status < 300:
                result.acknowledged += count
                try:
                    doc = json.loads(answer)
                except ValueError:
                    doc = {}
                if isinstance(doc, dict):
                    result.accepted += int(doc.get("accepted", 0))
                    result.duplicates += int(doc.get("duplicates", 0))
            else:
                result.failures += 1

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def warm() -> None:
            async with session.get(url + "/healthz") as response:
                await response.read()

        # open the connections first so that connection setup is not in the timing
        await asyncio.gather(*(warm() for _ in range(connections)))
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        result.seconds = time.perf_counter() - began
    return result


# ---------------------------------------------------------------------------------------
# report


def _table(results: list[_Result]) -> None:
    wide = max([len(r.phase) for r in results] + [5])
    header = (
        f"{'round':>5} {'target':<9} {'phase':<{wide}} {'requests':>9} {'events':>9} "
        f"{'seconds':>8} {'req/s':>9} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} "
        f"{'retries':>7} {'cpu us/ev':>9}"
    )
    write(header)
    write("-" * len(header))
    for r in results:
        seconds = r.seconds or float("inf")
        write(
            f"{r.round:>5} {r.target:<9} {r.phase:<{wide}} {r.requests:>9,} {r.events:>9,} "
            f"{r.seconds:>8.2f} {r.requests / seconds:>9,.0f} {r.rate:>10,.0f} "
            f"{r.percentile(50):>8.2f} {r.percentile(99):>8.2f} {r.failures:>7,} "
            f"{r.retries:>7,} {_cpu_per_event(r):>9}"
        )


def _wait_for_store(url: str, within: float = 300.0) -> float:
    """Seconds until every store's backlog is empty (events acknowledged but not yet in
    the store), so that CPU figures include delivering what was acknowledged."""
    began = time.perf_counter()
    while time.perf_counter() - began < within:
        if _servers.store_backlog(_servers.get_json(url + "/readyz")) == 0:
            return time.perf_counter() - began
        time.sleep(0.05)
    raise RuntimeError(f"the store backlog did not drain within {within:.0f}s")


def _cpu_per_event(result: _Result) -> str:
    """The server's CPU time (all its threads) per acknowledged event, in microseconds."""
    if result.cpu_seconds is None or not result.acknowledged:
        return "-"
    return f"{result.cpu_seconds / result.acknowledged * 1e6:,.1f}"


def _ratios(results: list[_Result]) -> None:
    """Per phase, the exporter/no-op ratio of each round (both ran back to back) and the
    median over the rounds: on a shared machine one round can be off by a fifth."""
    by_key = {(r.round, r.target, r.phase): r for r in results}
    for phase in dict.fromkeys(r.phase for r in results):
        ratios = []
        for round_ in sorted({r.round for r in results}):
            exporter = by_key.get((round_, "exporter", phase))
            noop = by_key.get((round_, "no-op", phase))
            if exporter is None or noop is None or not exporter.seconds or not noop.seconds:
                continue
            ratios.append(exporter.rate / max(noop.rate, 1e-9))
        if ratios:
            rounds = ", ".join(f"{ratio:.3g}" for ratio in ratios)
            write(
                f"ratio exporter/no-op, {phase}: median {statistics.median(ratios):.3g} "
                f"(acknowledged events/s; rounds: {rounds})"
            )


def _throughputs(results: list[_Result]) -> None:
    """Per phase, the exporter's median acknowledged events/s over the rounds."""
    rounds = {r.round for r in results}
    if len(rounds) < 2:
        return
    for phase in dict.fromkeys(r.phase for r in results):
        rates = [
            r.rate for r in results if r.target == "exporter" and r.phase == phase and r.seconds
        ]
        if rates:
            write(
                f"exporter, {phase}: median {statistics.median(rates):,.0f} acknowledged "
                f"events/s over {len(rates)} rounds (min {min(rates):,.0f}, "
                f"max {max(rates):,.0f})"
            )


def _drains(results: list[_Result]) -> None:
    for r in results:
        if r.drain_seconds is not None and r.seconds:
            delivered = r.acknowledged / (r.seconds + r.drain_seconds)
            write(
                f"round {r.round}, {r.phase}: the exporter's store caught up "
                f"{r.drain_seconds:.2f}s after the last answer: {delivered:,.0f} events/s "
                "acknowledged and stored"
            )


def _check_exporter(results: list[_Result]) -> None:
    for r in results:
        if r.target == "exporter" and r.accepted + r.duplicates != r.acknowledged:
            write(
                f"note: {r.phase}: exporter answered accepted={r.accepted:,} "
                f"duplicates={r.duplicates:,} for {r.acknowledged:,} acknowledged events"
            )
        if r.statuses.keys() - {200, 202}:
            write(f"note: {r.target} {r.phase}: statuses {dict(sorted(r.statuses.items()))}")


# ---------------------------------------------------------------------------------------
# main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000, help="single-event POSTs")
    parser.add_argument("--connections", type=int, default=32, help="for single events")
    parser.add_argument("--batches", type=int, default=200, help="NDJSON batches")
    parser.add_argument("--batch-events", type=int, default=1_000, help="events per batch")
    parser.add_argument("--batch-connections", type=int, default=4, help="for batches")
    parser.add_argument(
        "--events",
        type=int,
        nargs="?",
        const=1_000_000,
        default=None,
        help="instead: push N events (default 1,000,000) in batches to the exporter only",
    )
    parser.add_argument(
        "--targets",
        choices=("both", "exporter", "no-op"),
        default="both",
        help="which servers to measure (default both)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeat both phases against both servers this often (fresh events each round)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--token",
        help="start the exporter with this ingest token and send it as a bearer token "
        "on every request (to both servers)",
    )
    parser.add_argument(
        "--amount-format",
        choices=("shortest", "six"),
        default="shortest",
        help='money fields as the simulator writes them (2 to 6 decimals, "0.01"; default) '
        'or with exactly six decimals ("0.010000"), as facilitators format USDC',
    )
    parser.add_argument("--noop-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run(args: argparse.Namespace, workdir: Path) -> None:
    targets = ["exporter", "no-op"] if args.targets == "both" else [args.targets]
    if args.events is not None:
        targets = ["exporter"]
    seed_ns = f"bench{int(time.time()):x}"

    def round_phases(round_: int) -> list[_Phase]:
        """The bodies of one round, fresh events each round (generated, not timed)."""
        began = time.perf_counter()
        phases: list[_Phase] = []
        if args.events is not None:
            lines = _events(args.events, f"{seed_ns}-n-", args.seed, args.amount_format)
            label = f"{args.events:,} ev, NDJSON x{args.batch_events}"
            bodies = _batches(lines, args.batch_events)
            del lines
            phases.append(_Phase(label, bodies, "application/x-ndjson", args.batch_connections))
        else:
            seed, namespace = args.seed + 2 * (round_ - 1), f"{seed_ns}-r{round_}"
            single = [
                (line, 1)
                for line in _events(args.requests, f"{namespace}-a-", seed, args.amount_format)
            ]
            phases.append(
                _Phase(
                    f"single x{args.connections} conn",
                    single,
                    "application/json",
                    args.connections,
                )
            )
            lines = _events(
                args.batches * args.batch_events, f"{namespace}-b-", seed + 1, args.amount_format
            )
            batched = _batches(lines, args.batch_events)
            del lines
            phases.append(
                _Phase(
                    f"NDJSON {args.batch_events} x{args.batch_connections} conn",
                    batched,
                    "application/x-ndjson",
                    args.batch_connections,
                )
            )
        generated = sum(count for phase in phases for _, count in phase.bodies)
        write(
            f"round {round_}: generated {generated:,} events in "
            f"{time.perf_counter() - began:.1f}s (not timed); cpus: {os.cpu_count()}, "
            "client and servers share them"
        )
        return phases

    servers: dict[str, _servers.Server] = {}
    results: list[_Result] = []
    try:
        if "exporter" in targets:
            port = _servers.free_port()
            argv = _servers.exporter_serve(port, "--data-dir", str(workdir / "data"))
            env = _servers.clean_env()
            if args.token is not None:
                env["EXPORTER_INGEST_TOKEN"] = args.token
            servers["exporter"] = _servers.start("exporter", argv, port, workdir, env)
        if "no-op" in targets:
            port = _servers.free_port()
            argv = [sys.executable, str(Path(__file__).resolve()), "--noop-server", str(port)]
            servers["no-op"] = _servers.start("no-op", argv, port, workdir)
        rounds = 1 if args.events is not None else max(1, args.rounds)
        for round_ in range(1, rounds + 1):
            phases = round_phases(round_)
            gc.collect()  # the generator's garbage, before anything is timed
            for phase in phases:
                for name in targets:
                    server = servers[name]
                    write(f"round {round_}, running {name}: {phase.label} ...")
                    result = _Result(target=name, phase=phase.label, round=round_)
                    cpu_before = server.cpu_seconds()
                    asyncio.run(
                        _load(
                            server.url,
                            phase.bodies,
                            phase.content_type,
                            phase.connections,
                            result,
                            args.token,
                        )
                    )
                    if name == "exporter":
                        result.drain_seconds = _wait_for_store(server.url)
                    cpu_after = server.cpu_seconds()
                    if cpu_before is not None and cpu_after is not None:
                        result.cpu_seconds = cpu_after - cpu_before
                    results.append(result)
            del phases
        write("")
        _table(results)
        _ratios(results)
        _throughputs(results)
        _drains(results)
        _check_exporter(results)
        for name, server in servers.items():
            rss = server.peak_rss_mib()
            # The target is in MB (10**6 bytes); 250 MB is 238.4 MiB.
            shown = (
                f"{rss:,.1f} MiB ({rss * 2**20 / 1e6:,.1f} MB)"
                if rss is not None
                else "unavailable"
            )
            write(f"peak RSS (VmHWM) {name}: {shown}")
    finally:
        for server in servers.values():
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, internally, the no-op server) and print the table."""
    args = _parse(argv)
    if args.noop_server is not None:
        _serve_noop(args.noop_server)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        try:
            _run(args, Path(tmp))
        except RuntimeError as error:
            sys.stderr.write(f"bench: {error}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
