"""The group committer: the ledger's one writer, on the event loop or a thread of its own.

All writes go through :class:`GroupCommitter`, one at a time, which commits whatever
requests are waiting in a single transaction: concurrent single-event POSTs share one
commit (and, with ``durability=power``, one fsync) instead of paying one each.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config import Durability
from ..errors import (
    LedgerError,
    LedgerUnavailableError,
)
from .model import Submission, SubmissionResult
from .storage import Ledger

log = logging.getLogger(__name__)


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _CommitRequest:
    submission: Submission
    future: asyncio.Future[SubmissionResult]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True, slots=True)
class _JobRequest:
    fn: Callable[[], object]
    future: asyncio.Future[object]
    loop: asyncio.AbstractEventLoop


# Requests of at most this many events (and dead letters) may commit on the event loop
# that submitted them. The loop stops for the commit (some 20 us per event, 0.3 ms per
# commit), so larger ones go to the writer thread.
_LOOP_COMMIT_MAX_REQUEST = 64
# An event loop's gathered requests commit once they hold this many events, however
# many more are arriving: the loop stops for about 10 ms at most.
_LOOP_COMMIT_MAX_EVENTS = 512
# Passes of the event loop a commit waits at most while each pass brings more requests.
_LOOP_COMMIT_MAX_PASSES = 16


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """How the ledger's last write ended: when, and the error when it failed.

    Readiness reports it instead of writing to the ledger on every probe.
    """

    at: float
    """When it ended, in seconds since the epoch."""
    monotonic: float
    """When it ended, on :func:`time.monotonic` (for its age)."""
    error: str | None = None
    """``<error class>: <message>`` when the write failed; None when it was committed."""

    @classmethod
    def now(cls, error: BaseException | None = None) -> CommitOutcome:
        """The outcome of a write that ended just now (with ``error``, if it failed)."""
        text = None if error is None else f"{type(error).__name__}: {error}"
        return cls(time.time(), time.monotonic(), text)

    @property
    def ok(self) -> bool:
        """Whether the write was committed."""
        return self.error is None


class GroupCommitter:
    """Runs the ledger's writes one at a time, folding waiting submissions into one commit.

    ``submit`` resolves only after the transaction holding the submission committed,
    which is what lets the receiver answer 202.

    Small requests (single events) commit on the event loop that submitted them. The
    commit waits while each pass of the loop brings more of them (the requests that
    arrived meanwhile are parsed in those passes), then takes them all: a transaction's
    cost is mostly per commit, and handing every small request to another thread cost
    more in thread switches than the commit itself. Larger requests, deliveries and
    retention run on the writer thread. One lock lets only one of them write at a time;
    the event loop never waits for it, but hands its requests to the writer thread when
    the lock is taken. With ``durability=power`` every commit syncs the disk, so all of
    them run on the writer thread; so they do with ``commit_on_loop=False``, for a disk
    slow enough that even a small commit would hold the event loop too long.

    The lock also covers the ledger's own state (row numbers, the outbox handoff) and
    its write connection outside transactions, which the ledger's write methods use as
    if they were alone: every write goes through :meth:`submit` or :meth:`call`.
    """

    def __init__(
        self, ledger: Ledger, max_events_per_commit: int = 50_000, commit_on_loop: bool = True
    ) -> None:
        self.ledger = ledger
        self.on_commit_hooks: list[Callable[[], None]] = []
        """Called after each successful commit, before its requests are answered, on the
        thread that committed."""
        self.last_commit: CommitOutcome | None = None
        """How the last commit (or :meth:`last_outcome`'s write) ended; None before any."""
        self._probe: asyncio.Future[CommitOutcome] | None = None
        self._max_events = max_events_per_commit
        self._queue: queue.SimpleQueue[_CommitRequest | _JobRequest | None] = queue.SimpleQueue()
        # Held for each commit and job, with the ledger's state updates that follow it.
        self._lock = threading.Lock()
        self._commit_on_loop = commit_on_loop and ledger.durability is Durability.PROCESS
        self._loop: asyncio.AbstractEventLoop | None = None  # the one that commits inline
        self._gathered: list[_CommitRequest] = []
        self._gathered_events = 0
        self._gathered_at_last_pass = 0
        self._passes = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        self.commits = 0

    async def submit(self, submission: Submission) -> SubmissionResult:
        """Commit ``submission`` (with whatever else is waiting) and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SubmissionResult] = loop.create_future()
        request = _CommitRequest(submission, future, loop)
        size = len(submission.events) + len(submission.dead_letters)
        if (
            self._commit_on_loop
            and size <= _LOOP_COMMIT_MAX_REQUEST
            and self._loop in (None, loop)
            and not self._closed
        ):
            self._loop = loop
            self._gather(request, size)
        else:
            self._queue.put(request)
        return await future

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run another write (delivery marks, retention) on the writer thread, in order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_JobRequest(fn, future, loop))  # type: ignore[arg-type]
        return await future

    async def last_outcome(self, max_age_seconds: float) -> CommitOutcome:
        """How the last commit ended, when that was at most ``max_age_seconds`` ago.

        Otherwise (nothing committed for a while, or ever) one small write finds out, on
        the writer thread: callers that ask meanwhile share it.
        """
        last = self.last_commit
        if last is not None and time.monotonic() - last.monotonic <= max_age_seconds:
            return last
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self.call(self._probe_write))
        return await asyncio.shield(self._probe)

    def _probe_write(self) -> CommitOutcome:
        """Commit a one-row write and keep how it ended (on the writer, under the lock)."""
        try:
            self.ledger.check_writable()
        except LedgerError as error:
            self.last_commit = CommitOutcome.now(error)
        else:
            self.last_commit = CommitOutcome.now()
        return self.last_commit

    def close(self) -> None:
        """Finish queued work and stop the writer thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    # ------------------------------------------------------------ on the event loop

    def _gather(self, request: _CommitRequest, size: int) -> None:
        if not self._gathered:
            self._gathered_at_last_pass, self._passes = 0, 0
            request.loop.call_soon(self._commit_gathered)
        self._gathered.append(request)
        self._gathered_events += size

    def _commit_gathered(self) -> None:
        gathered = self._gathered
        if (
            len(gathered) > self._gathered_at_last_pass
            and self._passes < _LOOP_COMMIT_MAX_PASSES
            and self._gathered_events < _LOOP_COMMIT_MAX_EVENTS
        ):
            self._gathered_at_last_pass = len(gathered)
            self._passes += 1
            gathered[0].loop.call_soon(self._commit_gathered)
            return
        self._gathered, self._gathered_events = [], 0
        if self._closed:  # the writer thread may be gone
            closing = LedgerUnavailableError("the ledger is closing")
            _fail_all([(request.future, closing) for request in gathered])
            return
        if not self._lock.acquire(blocking=False):
            for request in gathered:  # the writer thread commits them, after its work
                self._queue.put(request)
            return
        try:
            self._commit(gathered, wait=False)
        finally:
            self._lock.release()

    # ------------------------------------------------------------ on the writer thread

    def _run(self) -> None:
        pending: list[_CommitRequest] = []
        events = 0
        while True:
            try:
                item = self._queue.get(block=not pending)
            except queue.Empty:  # nothing more waiting: commit what has gathered
                with self._lock:
                    self._commit(pending)
                pending, events = [], 0
                continue
            if isinstance(item, _CommitRequest):
                pending.append(item)
                events += len(item.submission.events)
                if events < self._max_events:
                    continue
            if pending:
                with self._lock:
                    self._commit(pending)
                pending, events = [], 0
            if isinstance(item, _JobRequest):
                with self._lock:
                    self._run_job(item)
            elif item is None:
                return

    def _run_job(self, job: _JobRequest) -> None:
        try:
            value = job.fn()
        except Exception as error:
            job.loop.call_soon_threadsafe(_set_exception, job.future, error)
            return
        job.loop.call_soon_threadsafe(_set_result, job.future, value)

    # ------------------------------------------------------------ on either

    def _commit(self, batch: list[_CommitRequest], wait: bool = True) -> None:
        """Commit ``batch`` (the caller holds the lock) and resolve its futures.

        Without ``wait``, the batch goes to the writer thread if a checkpoint holds the
        ledger's write lock.
        """
        try:
            submissions = [request.submission for request in batch]
            results = (
                self.ledger.commit(submissions) if wait else self.ledger.try_commit(submissions)
            )
        except Exception as error:
            if len(batch) > 1:
                # One request's failure must not fail the others that shared its commit.
                for request in batch:
                    self._commit([request], wait)
                return
            log.error("ledger commit failed", extra={"error": str(error)})
            if isinstance(error, LedgerError):  # the ledger failed, not this one request
                self.last_commit = CommitOutcome.now(error)
            request = batch[0]
            failure = (
                error
                if isinstance(error, LedgerError)
                else LedgerUnavailableError(
                    f"ledger commit failed: {type(error).__name__}: {error}"
                )
            )
            _resolve(request.loop, [(request.future, failure)], _fail_all)
            return
        if results is None:
            for request in batch:
                self._queue.put(request)
            return
        self.commits += 1
        self.last_commit = CommitOutcome.now()
        for hook in self.on_commit_hooks:  # before any answer goes out
            hook()
        # One wake-up of each event loop per commit, however many requests it resolves.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]] = {}
        for request, result in zip(batch, results, strict=True):
            by_loop.setdefault(request.loop, []).append((request.future, result))
        for loop, resolutions in by_loop.items():
            _resolve(loop, resolutions, _resolve_all)


def _resolve(
    loop: asyncio.AbstractEventLoop,
    resolutions: list[tuple[asyncio.Future[Any], object]],
    resolve: Callable[[list[tuple[asyncio.Future[Any], object]]], None],
) -> None:
    """Run ``resolve(resolutions)`` on ``loop``: at once when this thread runs it."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        resolve(resolutions)
    else:
        loop.call_soon_threadsafe(resolve, resolutions)


def _fail_all(failures: list[tuple[asyncio.Future[Any], object]]) -> None:
    for future, error in failures:
        assert isinstance(error, BaseException)
        _set_exception(future, error)


def _resolve_all(resolutions: list[tuple[asyncio.Future[Any], object]]) -> None:
    for future, value in resolutions:
        _set_result(future, value)


def _set_result(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
