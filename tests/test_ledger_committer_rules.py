"""The group committer's rules at their edges: which requests commit on the event loop,
how many events the writer thread folds into one commit, and how commits are counted."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import async_wait_until, received
from ledger_helpers import prepare

from exporter.errors import LedgerUnavailableError
from exporter.ledger import DeadLetter, GroupCommitter, Ledger, Outcome, Submission


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on a fresh file."""
    opened = Ledger(tmp_path / "ledger.sqlite3")
    yield opened
    opened.close()


def _committing_threads(committer: GroupCommitter) -> list[str]:
    names: list[str] = []
    committer.on_commit_hooks.append(lambda: names.append(threading.current_thread().name))
    return names


def _request(prefix: str, events: int, dead_letters: int = 0) -> Submission:
    return Submission(
        [prepare(received(f"{prefix}{i}")) for i in range(events)],
        [DeadLetter("invalid", f"bad {i}", b"{}") for i in range(dead_letters)],
    )


async def test_requests_of_up_to_64_items_commit_on_the_loop_counting_dead_letters(
    ledger: Ledger,
) -> None:
    committer = GroupCommitter(ledger)
    try:
        threads = _committing_threads(committer)
        await committer.submit(_request("a", 64))
        await committer.submit(_request("b", 65))
        await committer.submit(_request("c", 60, dead_letters=5))
        here = threading.current_thread().name
        assert threads == [here, "ledger-writer", "ledger-writer"]
        assert committer.commits == 3
    finally:
        committer.close()


async def _held_writer(committer: GroupCommitter) -> threading.Event:
    """Hold the writer thread with a job until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(10)

    async def held() -> bool:
        return started.is_set()

    asyncio.ensure_future(committer.call(hold))
    await async_wait_until(held, what="the writer to run the job")
    return release


async def _commits_of_one_wave(committer: GroupCommitter, sizes: tuple[int, ...]) -> int:
    """Queue requests of ``sizes`` events behind a held writer, release it; the commits made."""
    release = await _held_writer(committer)
    pending = [
        asyncio.ensure_future(committer.submit(_request(f"w{committer.commits}-{n}-", size)))
        for n, size in enumerate(sizes)
    ]
    await asyncio.sleep(0)  # each request is queued behind the job
    before = committer.commits
    release.set()
    results = await asyncio.gather(*pending)
    assert [r.outcomes for r in results] == [[Outcome.ACCEPTED] * size for size in sizes]
    return committer.commits - before


@pytest.mark.parametrize(
    ("max_events", "sizes", "commits"),
    [
        (150, (100, 100, 100), 2),  # the second request reaches the bound
        (100, (100, 100, 100), 3),  # each request reaches it alone
        (201, (100, 100, 100), 1),  # the third one passes it
        (100, (100, 50, 49, 1), 2),  # the count starts over after each commit
    ],
    ids=["reached-by-two", "reached-by-each", "passed-by-three", "counted-afresh"],
)
async def test_the_writer_commits_once_the_waiting_requests_reach_the_event_bound(
    ledger: Ledger, max_events: int, sizes: tuple[int, ...], commits: int
) -> None:
    committer = GroupCommitter(ledger, max_events_per_commit=max_events, commit_on_loop=False)
    try:
        assert await _commits_of_one_wave(committer, sizes) == commits
        assert ledger.stats().events == sum(sizes)
    finally:
        committer.close()


async def test_the_event_count_starts_over_after_the_writer_ran_out_of_requests(
    ledger: Ledger,
) -> None:
    committer = GroupCommitter(ledger, max_events_per_commit=100, commit_on_loop=False)
    try:
        assert await _commits_of_one_wave(committer, (1,)) == 1
        assert await _commits_of_one_wave(committer, (50, 49, 1)) == 1
    finally:
        committer.close()


async def test_only_the_first_event_loop_commits_on_itself(ledger: Ledger) -> None:
    # Requests gathered on the loop share one list: a second loop (another thread) hands
    # its requests to the writer thread instead of committing them on its own.
    committer = GroupCommitter(ledger)
    try:
        threads = _committing_threads(committer)
        await committer.submit(_request("first", 1))

        def other_loop() -> None:
            asyncio.run(committer.submit(_request("second", 1)))

        other = threading.Thread(target=other_loop, name="other-loop")
        other.start()
        await async_wait_until(_not_alive(other), what="the other loop's request")
        other.join()
        await committer.submit(_request("third", 1))
        here = threading.current_thread().name
        assert threads == [here, "ledger-writer", here]
        assert ledger.stats().events == 3
    finally:
        committer.close()


def _not_alive(thread: threading.Thread) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        return not thread.is_alive()

    return done


async def test_a_request_failing_alone_is_answered_with_its_cause_and_logged(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    # Shared with one good request, the failing one is retried alone: the good one is
    # committed, the other answered with a ledger error naming what went wrong.
    caplog.set_level(logging.ERROR, logger="exporter.ledger.committer")
    committer = GroupCommitter(ledger)
    try:
        poison = Submission(dead_letters=[DeadLetter("invalid", "lone surrogate \ud800", b"")])
        failure, good = await asyncio.gather(
            committer.submit(poison),
            committer.submit(_request("good", 1)),
            return_exceptions=True,
        )
        assert isinstance(failure, LedgerUnavailableError)
        assert str(failure).startswith("ledger commit failed: UnicodeEncodeError: ")
        assert not isinstance(good, BaseException) and good.outcomes == [Outcome.ACCEPTED]
        [record] = caplog.records
        assert record.getMessage() == "ledger commit failed"
        assert "surrogates not allowed" in record.__dict__["error"]
    finally:
        committer.close()


def _commit_sizes(committer: GroupCommitter) -> list[int]:
    """The events each commit from now on holds, in order (read by a commit hook)."""
    sizes: list[int] = []
    seen = [committer.ledger.stats().events]

    def record() -> None:
        now = committer.ledger.stats().events
        sizes.append(now - seen[0])
        seen[0] = now

    committer.on_commit_hooks.append(record)
    return sizes


async def _submit_after_passes(
    committer: GroupCommitter, passes: int, name: str, events: int = 1
) -> None:
    """Submit ``events`` events once the event loop has run ``passes`` more passes."""
    for _ in range(passes):
        await asyncio.sleep(0)
    await committer.submit(_request(name, events))


@pytest.mark.parametrize(
    ("arrivals", "sizes"),
    [
        ([(0, 1), (1, 1)], [2]),  # the next pass brings more: it waits for them
        ([(0, 1), (3, 1)], [1, 1]),  # a pass brings nothing: it commits
        ([(n, 1) for n in range(40)], [17, 17, 6]),  # at most 16 passes of waiting
        ([(0, 64)] * 8 + [(1, 1)], [512, 1]),  # 512 events: it commits at once
        ([(0, 64)] * 7 + [(0, 63), (1, 1)], [512]),  # 511 events: it waits a pass
    ],
    ids=["next-pass", "quiet-pass", "sixteen-passes", "512-events", "511-events"],
)
async def test_commits_on_the_loop_wait_for_more_requests_within_bounds(
    ledger: Ledger, arrivals: list[tuple[int, int]], sizes: list[int]
) -> None:
    # Small requests arriving while the loop gathers share one commit; the wait ends on
    # a pass that brings nothing, after 16 passes, or at 512 events.
    committer = GroupCommitter(ledger)
    try:
        await committer.submit(_request("first", 1))  # counts start over after a commit
        committed = _commit_sizes(committer)
        await asyncio.gather(
            *(
                _submit_after_passes(committer, passes, f"r{n}-", events)
                for n, (passes, events) in enumerate(arrivals)
            )
        )
        assert committed == sizes
    finally:
        committer.close()


async def test_a_job_that_raises_fails_its_caller_and_the_writer_goes_on(ledger: Ledger) -> None:
    committer = GroupCommitter(ledger)

    def refuse() -> None:
        raise ValueError("no such sink")

    try:
        async with asyncio.timeout(10):
            with pytest.raises(ValueError, match="no such sink"):
                await committer.call(refuse)
            assert await committer.call(lambda: ledger.expire_dead_letters(0)) == 0
    finally:
        committer.close()


async def test_a_request_gathered_while_the_ledger_closes_is_refused_as_closing(
    ledger: Ledger,
) -> None:
    committer = GroupCommitter(ledger)
    pending = asyncio.ensure_future(committer.submit(_request("late", 1)))
    await asyncio.sleep(0)  # the request is gathered; its commit is the next pass
    committer.close()
    async with asyncio.timeout(10):
        with pytest.raises(LedgerUnavailableError) as refused:
            await pending
    assert str(refused.value) == "the ledger is closing"
    assert ledger.stats().events == 0
