"""Store selection and the forwarder that drains the ledger outbox into the store.

Delivery is at-least-once: outbox rows are removed only after the store accepted them,
and stores write idempotently per event key, so a crash between the two repeats a
write without duplicating data. Store failures back off and retry; they never touch
ingest, whose only dependency is the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time

from .config import Settings, StoreKind
from .ledger import GroupCommitter
from .metrics import Metrics
from .records import Store

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    """Open the store the settings select (blocking; call before serving)."""
    kind = settings.resolved_store
    if kind is StoreKind.DUCKDB:
        from .store_duckdb import DuckDBStore

        return DuckDBStore.open(
            settings.duckdb_path, settings.duckdb_memory_limit, settings.duckdb_threads
        )
    raise ValueError(f"unsupported store {kind}")


class Forwarder:
    """Moves store records from the ledger outbox to the store, oldest first."""

    def __init__(
        self,
        committer: GroupCommitter,
        store: Store,
        metrics: Metrics,
        batch_size: int = 5_000,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self.committer = committer
        self.store = store
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_backoff = max_backoff_seconds
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self._wake = asyncio.Event()
        self._stop_when_idle = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start draining in the background."""
        self._task = asyncio.create_task(self._run(), name="store-forwarder")

    def wake(self) -> None:
        """Tell the forwarder new rows are committed; safe from any thread."""
        self._loop.call_soon_threadsafe(self._wake.set)

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
                extra={"backlog": self.committer.ledger.backlog},
            )
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        ledger = self.committer.ledger
        while True:
            self._wake.clear()
            rows = await asyncio.to_thread(ledger.read_outbox, self.batch_size)
            if not rows:
                if self._stop_when_idle:
                    return
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            started = time.perf_counter()
            try:
                refused = await self.store.write([row.record for row in rows])
            except Exception as error:
                await self._back_off(error, len(rows))
                if self._stop_when_idle:
                    return
                continue
            self.metrics.store_write_duration.observe(time.perf_counter() - started)
            last_seq = rows[-1].seq
            await self.committer.call(functools.partial(ledger.mark_delivered, last_seq, refused))
            if refused:
                log.warning(
                    "store refused records; kept as dead letters",
                    extra={
                        "store": self.store.name,
                        "records": len(refused),
                        "first_reason": refused[0].reason,
                    },
                )
            self.last_success = time.time()
            self.last_error = None
            self.consecutive_failures = 0
            self.metrics.store_writes.inc()
            self.metrics.store_records.inc(len(rows))
            self.metrics.store_last_success.set(self.last_success)

    async def _back_off(self, error: Exception, rows: int) -> None:
        self.consecutive_failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self.metrics.store_write_errors.inc()
        delay = min(self.max_backoff, 0.5 * 2 ** min(self.consecutive_failures - 1, 10))
        delay *= random.uniform(0.5, 1.0)
        log.warning(
            "store write failed; retrying",
            extra={
                "store": self.store.name,
                "records": rows,
                "error": self.last_error,
                "retry_in_s": round(delay, 2),
            },
        )
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
