"""Scheduled refresh of computed results into a cache, with APScheduler 3.11.

Each job runs once at start and then on its own cadence, just after the multiples of its
interval since the Unix epoch (:class:`AlignedInterval`); it never overlaps itself, is cut
off after its timeout, and a failing job neither stops the others nor loses its
last good result, which is kept and marked stale. Readers (the metrics collector, the
JSON API) only ever read the cache.

Logs stay readable at the default level: one line when the scheduler starts and stops,
one when a job starts failing and one when it recovers, nothing per successful run.
APScheduler's own per-run lines are kept below the default level (see
:func:`quiet_apscheduler`).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Job(Generic[T]):
    """A computation refreshed on a cadence; ``key`` names its cache entry."""

    key: str
    query: str
    window: str
    interval_seconds: float
    timeout_seconds: float
    run: Callable[[], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class Cached(Generic[T]):
    """The last good result of a job, and whether later runs have failed since."""

    value: T
    computed_at: float
    stale: bool = False
    error: str | None = None


APSCHEDULER_LOGGER = "apscheduler"

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


class AlignedInterval(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Fires at once, then ``phase`` after every multiple of ``seconds`` since the Unix
    epoch (UTC).

    A refresh is computed as of an instant aligned to its cadence; running it just after
    that instant keeps its result as fresh as the cadence allows, and makes jobs whose
    cadences divide one another fall due together (each minute: the 15 s, 30 s and 60 s
    ones), so that they can share one computation. The phase, shorter than the shortest
    cadence and drawn once per exporter, keeps a fleet from querying a shared InfluxDB
    all at the same instant.
    """

    def __init__(self, seconds: float, phase: float = 0.0) -> None:
        """Fire every ``seconds``, ``phase`` seconds after each multiple (both rounded to
        the microsecond; the step is at least one)."""
        self.step_us = max(1, round(seconds * 1_000_000))
        self.phase_us = round(phase * 1_000_000) % self.step_us

    def get_next_fire_time(
        self, previous_fire_time: datetime.datetime | None, now: datetime.datetime
    ) -> datetime.datetime:
        """``now`` for the first run, then the first fire time after the previous run."""
        if previous_fire_time is None:
            return now
        # Whole microseconds, so that the next time is always strictly later.
        previous_us = (previous_fire_time - _EPOCH) // _MICROSECOND - self.phase_us
        next_us = (previous_us // self.step_us + 1) * self.step_us + self.phase_us
        return _EPOCH + next_us * _MICROSECOND

    def __repr__(self) -> str:
        return (
            f"AlignedInterval(seconds={self.step_us / 1e6:g}, phase={self.phase_us / 1e6:g})"
        )


class _SkippedOverlap(logging.Filter):
    """Drops APScheduler's warning that a run was skipped because the previous one still
    runs: jobs never overlapping is the design, and a refresh slower than its cadence would
    otherwise log it at every tick. Kept when the exporter logs at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the skipped-run warning unless debug logging is on."""
        if "maximum number of running instances" not in str(record.msg):
            return True
        return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


_SKIPPED_OVERLAP = _SkippedOverlap()


def quiet_apscheduler() -> None:
    """Keep APScheduler's per-run info lines ("Running job", "executed successfully") and
    its skipped-overlap warning out of the log unless the exporter logs at debug level;
    its other warnings (a run missed because the event loop stalled) still show."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger(APSCHEDULER_LOGGER).setLevel(logging.WARNING)
    scheduler_logger = logging.getLogger(f"{APSCHEDULER_LOGGER}.scheduler")
    if _SKIPPED_OVERLAP not in scheduler_logger.filters:
        scheduler_logger.addFilter(_SKIPPED_OVERLAP)


class FailureStreak:
    """Logs the first failure of a run of failures and the success that ends it, once each.

    A dependency that stays down fails every refresh; one line says it went down (with
    the cause), one that it is back (with how many attempts failed), none between.
    """

    def __init__(self, logger: logging.Logger, what: str, **context: object) -> None:
        """Report failures of ``what`` on ``logger``, each line with ``context``."""
        self.logger = logger
        self.what = what
        self.context = context
        self.failures = 0
        self._since = 0.0

    def failed(self, error: str) -> None:
        """One more failure; logged when it is the first since the last success."""
        self.failures += 1
        extra = {**self.context, "error": error}
        if self.failures == 1:
            self._since = time.monotonic()
            self.logger.warning(f"{self.what} failed", extra=extra)
        else:
            self.logger.debug(f"{self.what} still failing", extra=extra)

    def succeeded(self) -> None:
        """A success; logged when it ends a run of failures."""
        if self.failures:
            self.logger.info(
                f"{self.what} recovered",
                extra={
                    **self.context,
                    "failures": self.failures,
                    "down_seconds": round(time.monotonic() - self._since, 3),
                },
            )
        self.failures = 0


class Scheduler:
    """Runs :class:`Job` s on an ``AsyncIOScheduler`` and keeps their results."""

    def __init__(
        self, registry: CollectorRegistry, jobs: list[Job[object]], phase: float | None = None
    ) -> None:
        """Run ``jobs``, each ``phase`` seconds after the multiples of its cadence (default:
        drawn once, below the shortest cadence); metrics go to ``registry``."""
        self.jobs = {job.key: job for job in jobs}
        shortest = min((job.interval_seconds for job in jobs), default=1.0)
        self.phase = random.uniform(0, shortest) if phase is None else phase
        self._streaks = {
            job.key: FailureStreak(log, "analytics refresh", job=job.key) for job in jobs
        }
        self._cache: dict[str, Cached[object]] = {}
        self._scheduler: AsyncIOScheduler | None = None
        self._running: set[asyncio.Task[object]] = set()
        self._stopping = False
        labels = ("query", "window")

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, labels, registry=registry)

        self.duration = Histogram(
            "exporter_analytics_query_duration_seconds",
            "Duration of scheduled analytics queries.",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.last_success = gauge(
            "exporter_analytics_last_success_timestamp_seconds",
            "Unix time of the last successful refresh of each analytic.",
        )
        self.failures = Counter(
            "exporter_analytics_failures",
            "Failed or timed-out refreshes; the last good result is kept and marked stale.",
            labels,
            registry=registry,
        )
        self.stale = gauge(
            "exporter_analytics_stale",
            "1 while an analytic's cached result is older than its latest failed refresh.",
        )

    def start(self) -> None:
        """Schedule every job, each running once right away."""
        quiet_apscheduler()
        scheduler = AsyncIOScheduler(timezone=datetime.UTC)
        for job in self.jobs.values():
            scheduler.add_job(
                self.refresh,
                AlignedInterval(job.interval_seconds, self.phase),
                args=[job.key],
                id=job.key,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(job.interval_seconds)),
            )
        scheduler.start()
        self._scheduler = scheduler
        log.info("analytics scheduler started", extra={"jobs": len(self.jobs)})

    async def stop(self) -> None:
        """Stop scheduling and cancel refreshes in flight; the cache stays readable."""
        self._stopping = True
        started = self._scheduler is not None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if started:
            log.info("analytics scheduler stopped")

    def get(self, key: str) -> Cached[object] | None:
        """The cached result for ``key``, if any refresh has succeeded yet."""
        return self._cache.get(key)

    async def refresh(self, key: str) -> bool:
        """Run one job now, updating the cache; returns whether it succeeded."""
        job = self.jobs[key]
        labels = (job.query, job.window)
        started = time.perf_counter()
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            value = await asyncio.wait_for(job.run(), job.timeout_seconds)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Ended by stop(): not a failure, and APScheduler would log any exception
            # that left the job as an error with its traceback.
            log.debug("analytics refresh cancelled at shutdown", extra={"job": key})
            return False
        except Exception as error:  # one failing query never stops the others
            message = (
                f"timed out after {job.timeout_seconds:g}s"
                if isinstance(error, TimeoutError)
                else f"{type(error).__name__}: {error}"
            )
            self.failures.labels(*labels).inc()
            previous = self._cache.get(key)
            if previous is not None:
                self._cache[key] = Cached(previous.value, previous.computed_at, True, message)
                self.stale.labels(*labels).set(1)
            self._streaks[key].failed(message)
            return False
        finally:
            if task is not None:
                self._running.discard(task)
        finished = time.time()
        self.duration.labels(*labels).observe(time.perf_counter() - started)
        self.last_success.labels(*labels).set(finished)
        self.stale.labels(*labels).set(0)
        self._cache[key] = Cached(value, finished)
        self._streaks[key].succeeded()
        return True
