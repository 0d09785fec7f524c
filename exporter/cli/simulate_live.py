"""``simulate``: simulated traffic (:mod:`exporter.cli.simulate`) POSTed live to a
running exporter at a steady rate, with retries, progress and a summary."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp

from ..config import check_secret
from ..errors import OperatorError
from ..ingest.signing import SIGNATURE_HEADER, signature_header
from ..retry import backoff_seconds, parse_retry_after
from .common import (
    http_base_url,
    listen_from_environment,
    local_url,
    non_negative_float,
    positive_float,
    positive_int,
)
from .progress import Progress
from .simulate import SimulationConfig, Simulator, encode_event

if TYPE_CHECKING:
    from .common import Commands

SIGNING_SECRET_VARIABLE = "EXPORTER_INGEST_SIGNING_SECRET"
"""Where ``simulate`` finds its signing secret when ``--signing-secret`` is not given."""

CONNECT_TIMEOUT_SECONDS = 3.0
"""How long ``simulate`` waits for the exporter to accept a connection before it gives up."""


@dataclass(frozen=True)
class SimulationProgress:
    """A snapshot of a running :func:`run_simulation`, for progress display."""

    elapsed_s: float
    payments: int
    """Payment attempts generated so far."""
    events: int
    """Events in completed requests, whatever the outcome."""
    requests: int
    accepted: int
    duplicates: int
    rejected: int
    errors: int
    """Requests that failed without the server accounting for all their events."""
    unacknowledged: int
    """Events in failed requests that the server neither accepted nor rejected."""
    retries: int
    events_per_s: float


@dataclass(frozen=True)
class SimulationSummary(SimulationProgress):
    """The final counters of :func:`run_simulation`, with per-status request counts."""

    status_counts: dict[int, int] = field(default_factory=dict)
    last_error: str | None = None


@dataclass
class _Counters:
    payments: int = 0
    events: int = 0
    requests: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: int = 0
    unacknowledged: int = 0
    retries: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    last_error: str | None = None

    def snapshot(self, elapsed: float) -> SimulationProgress:
        return SimulationProgress(
            elapsed_s=elapsed,
            payments=self.payments,
            events=self.events,
            requests=self.requests,
            accepted=self.accepted,
            duplicates=self.duplicates,
            rejected=self.rejected,
            errors=self.errors,
            unacknowledged=self.unacknowledged,
            retries=self.retries,
            events_per_s=self.events / elapsed if elapsed > 0 else 0.0,
        )

    def summary(self, elapsed: float) -> SimulationSummary:
        snap = self.snapshot(elapsed)
        return SimulationSummary(
            **{f: getattr(snap, f) for f in snap.__dataclass_fields__},
            status_counts=dict(sorted(self.status_counts.items())),
            last_error=self.last_error,
        )

    def account(self, status: int, body: bytes, n: int) -> None:
        """Count one finished request from its status and JSON ingest answer."""
        self.requests += 1
        self.events += n
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        doc: object
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        accounted = 0
        message: object = None
        if isinstance(doc, dict):
            accepted = doc.get("accepted", 0)
            duplicates = doc.get("duplicates", 0)
            rejected = doc.get("rejected", [])
            if isinstance(accepted, int) and isinstance(duplicates, int):
                self.accepted += accepted
                self.duplicates += duplicates
                accounted += accepted + duplicates
            if isinstance(rejected, list):
                self.rejected += len(rejected)
                accounted += len(rejected)
            message = doc.get("error")
        if (status >= 300 or not isinstance(doc, dict)) and accounted < n:
            self.errors += 1
            self.unacknowledged += n - accounted
            detail = message if message else body[:200].decode("utf-8", "replace")
            self.last_error = f"HTTP {status}: {detail}"


def _backoff(attempt: int) -> float:
    """Jittered exponential backoff for retry ``attempt`` (0-based): from 0.25 s, at most 5 s."""
    return backoff_seconds(attempt, 0.25, 5.0)


def _retry_after_seconds(value: str | None, attempt: int) -> float:
    """Seconds to wait before retrying a 503/429: its Retry-After, else a backoff."""
    return parse_retry_after(value, time.time(), default=_backoff(attempt))


_LINGER_S = 0.2  # longest a partial NDJSON batch waits for more events


async def run_simulation(
    url: str,
    *,
    rate: float,
    duration: float | None,
    seed: int = 42,
    token: str | None = None,
    signing_secret: str | None = None,
    batch_size: int = 1,
    concurrency: int = 8,
    progress: Callable[[SimulationProgress], None] | None = None,
    stop: asyncio.Event | None = None,
    config: SimulationConfig | None = None,
    max_retries: int = 5,
    progress_interval: float = 0.5,
    request_timeout: float = 30.0,
) -> SimulationSummary:
    """POST live simulated traffic to ``{url}/v1/events`` at ``rate`` payments/s.

    Runs for ``duration`` seconds (0 or None: until ``stop`` is set, or until cancelled
    when there is no ``stop``), timestamps taken from the wall clock as it runs; when
    time is up or ``stop`` is set, the payments still in flight are completed at once, so
    every payment ends settled or failed, and the summary is returned. ``batch_size`` 1 sends
    one ``application/json`` event per request, more sends ``application/x-ndjson``
    batches (a partial batch waits at most 0.2 s). 503 and 429 are retried honouring
    Retry-After, transport errors with a backoff, up to ``max_retries`` times; a request
    that still fails is counted, never raised. With ``signing_secret`` every attempt carries
    a fresh ``X-Exporter-Signature`` (see :mod:`exporter.ingest.signing`). ``config`` (its seed wins
    over ``seed``) tunes the traffic; its daily cycle and trend do not apply to live
    traffic, and an empty ``id_namespace`` is replaced by one derived from the start time so
    repeated runs against one exporter do not collide.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if batch_size < 1 or concurrency < 1 or max_retries < 0:
        raise ValueError("batch_size and concurrency must be >= 1, max_retries >= 0")
    if signing_secret is not None:
        try:
            check_secret(signing_secret)
        except ValueError as error:
            raise ValueError(f"signing_secret {error}") from None
    cfg = config if config is not None else SimulationConfig(seed=seed)
    start_ms = int(time.time() * 1000)
    if not cfg.id_namespace:
        cfg = replace(cfg, id_namespace=f"r{start_ms:x}-")
    sim = Simulator(cfg)
    end_ms = start_ms + int(duration * 1000) if duration else None
    endpoint = url.rstrip("/") + "/v1/events"
    headers = {"Content-Type": "application/json" if batch_size == 1 else "application/x-ndjson"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    counters = _Counters()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    closing = False

    def arrivals() -> Iterator[float]:
        expo = sim._rng.expovariate
        scale = 1000.0 / rate
        t = float(start_ms)
        while not closing:
            t += expo(1.0) * scale
            if end_ms is not None and t > end_ms:
                return
            counters.payments += 1
            yield t

    queue: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue(maxsize=2 * concurrency)
    stop_task: asyncio.Future[Any] | None = (
        asyncio.ensure_future(stop.wait()) if stop is not None else None
    )

    async def post(session: aiohttp.ClientSession, body: bytes, n: int) -> None:
        for attempt in range(max_retries + 1):
            # once stopping, each request gets one try so that the run ends promptly
            last = attempt == max_retries or (stop is not None and stop.is_set())
            sent_headers = headers
            if signing_secret is not None:  # signed per attempt: a retry may come much later
                content_type = headers["Content-Type"]
                signed = signature_header(signing_secret, body, content_type=content_type)
                sent_headers = {**headers, SIGNATURE_HEADER: signed}
            try:
                async with session.post(endpoint, data=body, headers=sent_headers) as resp:
                    status = resp.status
                    answer = await resp.read()
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                counters.last_error = f"{type(exc).__name__}: {exc}"
                if last:
                    counters.requests += 1
                    counters.events += n
                    counters.errors += 1
                    counters.unacknowledged += n
                    return
                counters.retries += 1
                await asyncio.sleep(_backoff(attempt))
                continue
            if status in (429, 503) and not last:
                counters.retries += 1
                counters.status_counts[status] = counters.status_counts.get(status, 0) + 1
                await asyncio.sleep(_retry_after_seconds(retry_after, attempt))
                continue
            counters.account(status, answer, n)
            return

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            try:
                await post(session, item[0], item[1])
            except Exception as exc:  # a bad request never ends the run: count it
                counters.requests += 1
                counters.events += item[1]
                counters.errors += 1
                counters.unacknowledged += item[1]
                counters.last_error = f"{type(exc).__name__}: {exc}"

    async def report() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(progress_interval)
            progress(counters.snapshot(loop.time() - t0))

    async def produce() -> None:
        nonlocal closing
        draining = False
        pending: list[bytes] = []
        pending_since = 0.0

        async def flush() -> None:
            body = b"".join(line + b"\n" for line in pending)
            await queue.put((body, len(pending)))
            pending.clear()

        for due_ms, event in sim._timeline(arrivals(), start_ms):
            if stop_task is not None and stop_task.done():
                draining = closing = True
            while not draining and (end_ms is None or due_ms <= end_ms):
                now = loop.time()
                delay = t0 + (due_ms - start_ms) / 1000 - now
                if delay <= 0:
                    break
                if pending:
                    linger_left = pending_since + _LINGER_S - now
                    if linger_left <= 0:
                        await flush()
                        continue
                    delay = min(delay, linger_left)
                if stop_task is None:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.wait({stop_task}, timeout=delay)
                    if stop_task.done():
                        draining = closing = True
            line = encode_event(event)
            if batch_size == 1:
                await queue.put((line, 1))
                continue
            if not pending:
                pending_since = loop.time()
            pending.append(line)
            if len(pending) >= batch_size:
                await flush()
        if pending:
            await flush()

    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    reporter = asyncio.ensure_future(report()) if progress is not None else None
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            workers = [asyncio.ensure_future(worker(session)) for _ in range(concurrency)]
            try:
                await produce()
                for _ in workers:
                    await queue.put(None)
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        for helper in (reporter, stop_task):
            if helper is not None:
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
    elapsed = loop.time() - t0
    if progress is not None:
        progress(counters.snapshot(elapsed))
    return counters.summary(elapsed)



def _signing_secret(args: argparse.Namespace) -> str | None:
    """The simulator's signing secret: ``--signing-secret``, else the exporter's variable."""
    if args.signing_secret is not None:
        name, value = "--signing-secret", args.signing_secret
    elif SIGNING_SECRET_VARIABLE in os.environ:
        name, value = SIGNING_SECRET_VARIABLE, os.environ[SIGNING_SECRET_VARIABLE]
    else:
        return None
    try:
        return check_secret(value)
    except ValueError as error:
        raise OperatorError(f"{name} {error}", exit_code=2) from None


async def _probe(url: str) -> None:
    """Fail fast, naming ``url``, when nothing accepts a connection there."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "timed out"
        raise OperatorError(
            f"simulate: no exporter answers at {url} ({reason}); start one with "
            "`facilitator-exporter serve` or point --url (or EXPORTER_LISTEN) at it"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _simulate(args: argparse.Namespace) -> int:
    signing_secret = _signing_secret(args)
    url = http_base_url(args.url or local_url(listen_from_environment()), "simulate")
    logging.basicConfig(level=logging.WARNING)
    display = Progress(sys.stderr, "events", args.duration or None)

    def progress(p: SimulationProgress) -> None:
        display.update(
            p.events,
            p.elapsed_s,
            detail=f"payments {p.payments:,}  accepted {p.accepted:,}  dup {p.duplicates:,}  "
            f"rejected {p.rejected:,}  errors {p.errors:,}",
        )

    async def simulate() -> SimulationSummary:
        await _probe(url)
        # Ctrl-C or SIGTERM ends the run cleanly, still printing the summary.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await run_simulation(
            url,
            rate=args.rate,
            duration=args.duration,
            seed=args.seed,
            token=args.token or os.environ.get("EXPORTER_INGEST_TOKEN") or None,
            signing_secret=signing_secret,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            progress=progress,
            stop=stop,
        )

    summary = asyncio.run(simulate())
    display.finish()
    sys.stdout.write(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    if summary.errors:
        sys.stderr.write(
            f"simulate: {summary.errors} requests to {url} failed; last: {summary.last_error}\n"
        )
    return 0 if summary.errors == 0 else 1


def add_parser(commands: Commands) -> None:
    """Add ``simulate`` to the command line."""
    simulate = commands.add_parser(
        "simulate",
        help="send realistic simulated x402 traffic to a running exporter",
        description="POST simulated facilitator events to a running exporter's "
        "/v1/events at a steady rate; progress on stderr, the summary as JSON on stdout. "
        f"Exit 1 when nothing answers at the URL (within {CONNECT_TIMEOUT_SECONDS:g} s) "
        "or a request failed.",
    )
    simulate.add_argument(
        "--url",
        help="exporter base URL (default http://EXPORTER_LISTEN, http://127.0.0.1:9402 "
        "when unset; an any-address listen is reached on loopback)",
    )
    simulate.add_argument(
        "--rate", type=positive_float, default=50.0, help="payments per second (default 50)"
    )
    simulate.add_argument(
        "--duration",
        type=non_negative_float,
        default=60.0,
        help="seconds to run; 0 runs until interrupted (default 60)",
    )
    simulate.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    simulate.add_argument(
        "--token",
        help="bearer token (default EXPORTER_INGEST_TOKEN when set; prefer the variable, a "
        "command line is visible to other local users)",
    )
    simulate.add_argument(
        "--signing-secret",
        metavar="SECRET",
        help=f"sign every request with X-Exporter-Signature (default {SIGNING_SECRET_VARIABLE} "
        "when set; prefer the variable, a command line is visible to other local users)",
    )
    simulate.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="events per request; above 1 sends NDJSON (default 1)",
    )
    simulate.add_argument(
        "--concurrency", type=positive_int, default=8, help="concurrent requests (default 8)"
    )
    simulate.set_defaults(run=_simulate)
