"""The forwarder that drains the ledger outbox into the store.

Delivery is at-least-once: outbox records are removed only after the store accepted them,
and stores write idempotently per event key, so a crash between the two repeats a
write without duplicating data. Store failures back off (exponentially, with jitter)
and retry; a store that names its own pause (``Retry-After``) gets exactly that pause;
a store that refuses the credentials stops nothing but readiness: the forwarder keeps
probing at the longest backoff while events keep buffering in the ledger. None of this
touches ingest, whose only dependency is the ledger.

The forwarder holds at most two outbox batches in memory: the one being written and,
behind a full one, the next, read and prepared (rendered, compressed) in a worker thread
while the store writes, so the store never waits for that work. Writes and the cursor
stay strictly in order: a batch is written only after the one before it was written and
marked delivered. After a failure the batch read ahead is dropped and the failed one read
again, so an outage of hours grows the backlog on disk only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import sqlite3
import time
import weakref
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import LedgerError, StoreAuthError, StoreRetryAfterError
from ..ledger import GroupCommitter
from ..metrics import Metrics
from ..records import OutboxRow, Store, StoreRecord, StoreRejection
from ..retry import backoff_seconds
from .base import ANSWERED_CLASSES, ERROR_CLASSES, PreparingStore, error_class

log = logging.getLogger(__name__)


BATCH_SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10000)

# A store answering "Retry-After: 0" again and again must not make the forwarder spin.
_MIN_RETRY_AFTER_SECONDS = 0.05


class StoreMetrics:
    """The forwarder's metrics beyond :class:`Metrics`: errors by class, batches, lag.

    Registered once per registry (:meth:`on`), so several forwarders over one app's
    registry (tests, restarts within a process) share them.
    """

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, StoreMetrics] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the metric families on ``registry``."""
        self.errors = Counter(
            "exporter_store_errors",
            "Failed store writes by class: retry_after (429/503), auth (credentials, "
            "org or bucket refused), timeout, server (5xx or unreachable), client (other "
            "4xx), other.",
            ["store", "class"],
            registry=registry,
        )
        self.rejected = Counter(
            "exporter_store_records_rejected",
            "Records the store refused for good, kept in the ledger as dead letters.",
            ["store"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "exporter_store_batch_size_records",
            "Records per delivered store write.",
            ["store"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "exporter_store_lag_seconds",
            "Age of the oldest record not yet delivered to the store, by its event "
            "timestamp (0 when the outbox is empty).",
            ["store"],
            registry=registry,
        )
        self.auth_failed = Gauge(
            "exporter_store_auth_failed",
            "1 while the store refuses the exporter's credentials (shipping paused).",
            ["store"],
            registry=registry,
        )

    @classmethod
    def on(cls, registry: CollectorRegistry) -> StoreMetrics:
        """The store metrics of ``registry``, registering them on first use."""
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics


@dataclass(frozen=True, slots=True)
class _Batch:
    """Outbox rows read for one store write, with the store's prepared payload if any."""

    rows: list[OutboxRow]
    records: list[StoreRecord]
    prepared: object


@dataclass(frozen=True, slots=True)
class StoreState:
    """What ``/readyz`` says about the store."""

    name: str
    reachable: bool | None
    """Whether the last write got an answer (2xx, or a refusal such as 401 or 429) rather
    than a 5xx, a timeout or no connection; None until the first write was attempted."""
    auth_failed: bool
    backlog: int
    last_success: float | None
    last_error: str | None
    error_class: str | None
    consecutive_failures: int
    lag_seconds: float


class Forwarder:
    """Moves store records from the ledger outbox to one store, oldest first.

    Each store the ledger feeds has a forwarder of its own, reading and moving its own
    cursor: a store that is down holds back no other.
    """

    def __init__(
        self,
        committer: GroupCommitter,
        store: Store,
        metrics: Metrics,
        batch_size: int = 5_000,
        max_backoff_seconds: float = 30.0,
        flush_interval_seconds: float = 0.0,
        backoff_base_seconds: float = 0.5,
        rng: random.Random | None = None,
        sink: str | None = None,
    ) -> None:
        """Prepare to forward; nothing runs before :meth:`start`.

        ``sink`` is the ledger cursor this forwarder moves (None: the ledger's only one);
        the metrics carry the store's name as their ``store`` label.

        After a failure the forwarder pauses :func:`~exporter.retry.backoff_seconds`:
        ``backoff_base_seconds`` doubling per consecutive failure up to
        ``max_backoff_seconds``, jittered by ``rng`` (seeded in tests).
        """
        self.committer = committer
        self.store = store
        self.metrics = metrics
        self.store_metrics = StoreMetrics.on(metrics.registry)
        self.sink = sink
        self.label = store.name
        self.batch_size = batch_size
        self.max_backoff = max_backoff_seconds
        self.backoff_base = backoff_base_seconds
        self._rng = rng
        self.flush_interval = flush_interval_seconds
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_class: str | None = None
        self.consecutive_failures = 0
        self._ledger_failures = 0
        self.attempted = False
        self.auth_failed = False
        self._oldest_pending_ms: int | None = None
        self._wake = asyncio.Event()
        # What the forwarder waits for now: new rows at all (idle), or a full batch
        # (lingering). A commit wakes it only then.
        self._idle = False
        self._lingering = False
        self._stop_when_idle = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self.store_metrics.lag.labels(self.label).set_function(self.lag_seconds)
        self.store_metrics.auth_failed.labels(self.label).set(0)
        self.store_metrics.rejected.labels(self.label)
        for name in ERROR_CLASSES:
            self.store_metrics.errors.labels(self.label, name)
        for counter in (metrics.store_writes, metrics.store_records, metrics.store_write_errors):
            counter.labels(self.label)

    def start(self) -> None:
        """Start draining in the background."""
        self._task = asyncio.create_task(self._run(), name=f"store-forwarder-{self.label}")

    def wake(self) -> None:
        """Tell the forwarder new rows are committed; safe from any thread.

        Only a forwarder that waits for them is woken (a lingering one once a full batch
        is there): otherwise every commit would cost the event loop a wake-up for nothing.
        """
        if self._idle or (self._lingering and self.backlog >= self.batch_size):
            self._loop.call_soon_threadsafe(self._wake.set)

    @property
    def backlog(self) -> int:
        """Records committed to the ledger and not yet delivered to this store."""
        return self.committer.ledger.backlog_of(self.sink)

    @property
    def ready(self) -> bool:
        """False while the store refuses the credentials (ingest still works)."""
        return not self.auth_failed

    def lag_seconds(self) -> float:
        """Seconds since the event time of the oldest undelivered record; 0 when none."""
        oldest = self._oldest_pending_ms
        if oldest is None or self.backlog == 0:
            return 0.0
        return max(0.0, time.time() - oldest / 1000)

    def state(self) -> StoreState:
        """The store's delivery state, for ``/readyz``."""
        return StoreState(
            name=self.store.name,
            reachable=self._reachable(),
            auth_failed=self.auth_failed,
            backlog=self.backlog,
            last_success=self.last_success,
            last_error=self.last_error,
            error_class=self.last_error_class,
            consecutive_failures=self.consecutive_failures,
            lag_seconds=round(self.lag_seconds(), 3),
        )

    def _reachable(self) -> bool | None:
        if not self.attempted:
            return None
        return self.consecutive_failures == 0 or self.last_error_class in ANSWERED_CLASSES

    async def stop(self, drain_seconds: float) -> None:
        """Deliver what can be delivered within ``drain_seconds``, then stop.

        Whatever is not delivered stays in the ledger for the next start.
        """
        if self._task is None:
            return
        self._stop_when_idle = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_seconds)
        except TimeoutError:
            log.warning(
                "store drain timed out; the rest stays in the ledger",
                extra={"store": self.label, "backlog": self.backlog},
            )
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _read_batch(self, after: int | None) -> _Batch:
        """The next batch from the outbox (after seq ``after``), prepared for the store.

        Runs in a worker thread. A preparation that fails is left to the write, which
        prepares again and fails there, as a store error with its backoff.
        """
        rows = self.committer.ledger.read_outbox(self.batch_size, self.sink, after)
        records = [row.record for row in rows]
        prepared: object = None
        if rows and isinstance(self.store, PreparingStore):
            try:
                prepared = self.store.prepare(records)
            except Exception:  # repeated by the write, which reports it
                prepared = None
        return _Batch(rows, records, prepared)

    async def _write(self, batch: _Batch) -> list[StoreRejection]:
        if batch.prepared is not None and isinstance(self.store, PreparingStore):
            return await self.store.write_prepared(batch.records, batch.prepared)
        return await self.store.write(batch.records)

    async def _run(self) -> None:
        ahead: asyncio.Task[_Batch] | None = None
        try:
            while True:
                self._wake.clear()
                self._idle = True  # before the read: a commit during it must wake the wait below
                read_ahead = ahead is not None
                try:
                    if ahead is not None:
                        task, ahead = ahead, None
                        batch = await task
                    else:
                        batch = await asyncio.to_thread(self._read_batch, None)
                except sqlite3.Error as error:
                    await self._ledger_back_off("read the outbox", error)
                    if self._stop_when_idle:
                        return
                    continue
                rows = batch.rows
                if not rows and read_ahead:
                    continue  # read again: a commit during that read woke nothing
                if not rows:
                    self._oldest_pending_ms = None
                    if self._stop_when_idle:
                        if self.backlog == 0:
                            return
                        continue  # committed while this read ran (stop came meanwhile)
                    try:
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    except TimeoutError:
                        pass
                    continue
                self._idle = False
                self._oldest_pending_ms = rows[0].record.time_ms
                last_seq, delivered = rows[-1].seq, len(rows)
                if delivered == self.batch_size:
                    # More is likely waiting: read and prepare it while this batch is
                    # written. Only the reading runs ahead; writes and the cursor stay
                    # in order, one batch at a time.
                    ahead = asyncio.create_task(asyncio.to_thread(self._read_batch, last_seq))
                started = time.perf_counter()
                self.attempted = True
                write_started = time.monotonic()
                try:
                    refused = await self._write(batch)
                except Exception as error:
                    await self._drop(ahead)  # the next read starts at this batch again
                    ahead = None
                    await self._back_off(error, delivered)
                    if self._stop_when_idle:
                        return
                    continue
                self.metrics.store_write_duration.labels(self.label).observe(
                    time.perf_counter() - started
                )
                del rows, batch  # at most this batch and the one read ahead in memory
                try:
                    mark = self.committer.ledger.mark_delivered
                    await self.committer.call(
                        functools.partial(mark, last_seq, refused, self.sink)
                    )
                except (LedgerError, sqlite3.Error) as error:
                    # The store has the records; the next attempt writes them again, which
                    # the store skips, and marks them then.
                    await self._drop(ahead)
                    ahead = None
                    await self._ledger_back_off("mark records delivered", error)
                    if self._stop_when_idle:
                        return
                    continue
                self._ledger_failures = 0
                if refused:
                    self.store_metrics.rejected.labels(self.label).inc(len(refused))
                    log.warning(
                        "store refused records; kept as dead letters",
                        extra={
                            "store": self.store.name,
                            "records": len(refused),
                            "first_reason": refused[0].reason,
                        },
                    )
                self._succeeded(delivered)
                if delivered < self.batch_size:
                    await self._linger(write_started + self.flush_interval)
        finally:
            await self._drop(ahead)

    @staticmethod
    async def _drop(ahead: asyncio.Task[_Batch] | None) -> None:
        """Discard a batch read ahead, once its worker thread is done with the ledger."""
        if ahead is not None:
            await asyncio.gather(ahead, return_exceptions=True)

    async def _linger(self, deadline: float) -> None:
        """Let a partial batch grow until it is full or ``deadline`` passes.

        Every store write has a fixed cost (a DuckDB transaction, an HTTP round trip);
        at a trickle of events, writing each commit's few records alone would spend
        more on that cost than on the records.
        """
        self._lingering = True
        try:
            while not self._stop_when_idle:
                self._wake.clear()  # before the check: a commit after it must wake the wait
                remaining = deadline - time.monotonic()
                if self.backlog >= self.batch_size or remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            self._lingering = False

    def _succeeded(self, delivered: int) -> None:
        if self.auth_failed:
            log.warning(
                "store accepts the credentials again; shipping resumed",
                extra={"store": self.store.name, "backlog": self.backlog},
            )
            self.auth_failed = False
            self.store_metrics.auth_failed.labels(self.label).set(0)
        elif self.consecutive_failures:
            log.info(
                "store writes succeed again",
                extra={"store": self.store.name, "failures": self.consecutive_failures},
            )
        self.last_success = time.time()
        self.last_error = None
        self.last_error_class = None
        self.consecutive_failures = 0
        self.metrics.store_writes.labels(self.label).inc()
        self.metrics.store_records.labels(self.label).inc(delivered)
        self.store_metrics.batch_size.labels(self.label).observe(delivered)
        self.metrics.store_last_success.labels(self.label).set(self.last_success)

    async def _back_off(self, error: Exception, rows: int) -> None:
        self.consecutive_failures += 1
        kind = error_class(error)
        self.last_error = f"{type(error).__name__}: {error}"
        self.last_error_class = kind
        self.metrics.store_write_errors.labels(self.label).inc()
        self.store_metrics.errors.labels(self.label, kind).inc()
        if isinstance(error, StoreRetryAfterError):
            delay = max(_MIN_RETRY_AFTER_SECONDS, error.retry_after)
        else:
            delay = self._backoff(self.consecutive_failures)
        fields = {
            "store": self.store.name,
            "records": rows,
            "error": self.last_error,
            "error_class": kind,
            "retry_in_s": round(delay, 2),
        }
        if isinstance(error, StoreAuthError):
            if not self.auth_failed:
                self.auth_failed = True
                self.store_metrics.auth_failed.labels(self.label).set(1)
                log.error(
                    "store refused the credentials: shipping paused, events keep "
                    "buffering in the ledger and /readyz answers 503 until this is fixed",
                    extra={**fields, "backlog": self.backlog},
                )
            else:
                log.debug("store still refuses the credentials", extra=fields)
        else:
            log.warning("store write failed; retrying", extra=fields)
        await self._pause(delay)

    async def _ledger_back_off(self, action: str, error: Exception) -> None:
        """Wait before retrying after the ledger failed (a full disk, an I/O error)."""
        self._ledger_failures += 1
        delay = self._backoff(self._ledger_failures)
        log.warning(
            f"ledger cannot {action}; retrying",
            extra={
                "store": self.label,
                "error": f"{type(error).__name__}: {error}",
                "retry_in_s": round(delay, 2),
            },
        )
        await self._pause(delay)

    def _backoff(self, failures: int) -> float:
        """The jittered pause after ``failures`` consecutive failures (1 or more)."""
        return backoff_seconds(failures - 1, self.backoff_base, self.max_backoff, self._rng)

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry, or less when the forwarder is stopping."""
        if self._stop_when_idle:
            return
        try:
            await asyncio.wait_for(self._wait_for_stop(), delay)
        except TimeoutError:
            pass

    async def _wait_for_stop(self) -> None:
        while not self._stop_when_idle:
            self._wake.clear()
            await self._wake.wait()
