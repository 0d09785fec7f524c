"""The event loop stays responsive: /readyz reads the last commit, commits can leave the
loop, and the loop's lag is measured."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import AppClient, async_wait_until, received
from ledger_faults import refusing_inserts
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER, create_app
from exporter.config import Settings


def count_writability_checks(client: AppClient, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times of each one-row write the committer makes to check the ledger."""
    ledger = client.app[COMMITTER].ledger
    check = ledger.check_writable
    calls: list[float] = []

    def counted() -> None:
        calls.append(time.monotonic())
        check()

    monkeypatch.setattr(ledger, "check_writable", counted)
    return calls


async def test_readyz_reports_the_last_commit_without_writing_per_probe(
    client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_writability_checks(client, monkeypatch)
    assert (await client.post("/v1/events", json=[received("p1")])).status == 202
    committed = client.app[COMMITTER].last_commit
    assert committed is not None
    for _ in range(20):
        answer = await client.get("/readyz")
        assert answer.status == 200
        body = await answer.json()
        assert body["ledger"]["lastCommit"] == {"at": committed.at, "ok": True, "error": None}
    assert checks == []


async def test_readyz_with_nothing_committed_writes_once_for_many_probes(
    client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_writability_checks(client, monkeypatch)
    for _ in range(20):
        assert (await client.get("/readyz")).status == 200
    assert len(checks) == 1


async def test_readyz_answers_503_after_a_failed_commit_and_recovers_with_the_next(
    client: AppClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_writability_checks(client, monkeypatch)
    with refusing_inserts(settings.ledger_path, "events"):
        assert (await client.post("/v1/events", json=[received("p1")])).status == 503
        answer = await client.get("/readyz")
        body = await answer.json()
        assert answer.status == 503 and body["status"] == "not ready"
        assert body["ledger"]["error"].startswith("LedgerUnavailableError: ")
        assert "database or disk is full" in body["ledger"]["error"]
        assert body["ledger"]["lastCommit"]["ok"] is False
    assert checks == []  # the failed commit was the answer: nothing written to find out
    assert (await client.post("/v1/events", json=[received("p1")])).status == 202
    assert (await client.get("/readyz")).status == 200


async def test_with_commits_off_the_loop_no_commit_runs_on_the_loop_thread(
    aiohttp_client: Callable[..., Awaitable[AppClient]], data_dir: Path
) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", ledger_commit_on_loop=False)
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    threads: list[str] = []
    committer = client.app[COMMITTER]
    committer.on_commit_hooks.append(lambda: threads.append(threading.current_thread().name))
    for n in range(10):
        assert (await client.post("/v1/events", json=received(f"p{n}"))).status == 202
    assert len(threads) >= 1
    assert threading.current_thread().name not in threads
    assert set(threads) == {"ledger-writer"}


def hold_this_thread(seconds: float) -> None:
    """Block the calling thread (in an async test: its event loop) for ``seconds``."""
    threading.Event().wait(seconds)


async def test_a_blocked_event_loop_is_seen_in_the_lag_metric(
    client: AppClient, registry: CollectorRegistry
) -> None:
    def late_samples() -> float:
        total = registry.get_sample_value("exporter_event_loop_lag_seconds_count") or 0.0
        prompt = registry.get_sample_value("exporter_event_loop_lag_seconds_bucket", {"le": "0.25"})
        return total - (prompt or 0.0)

    async def sampled() -> bool:
        return bool(registry.get_sample_value("exporter_event_loop_lag_seconds_count"))

    await async_wait_until(sampled, what="a first lag sample")
    before = late_samples()
    hold_this_thread(0.6)  # the event loop's thread: as a slow commit on it would
    # The sampler's timer was due at most 0.25 s into the block: it wakes 0.35 s late.

    async def seen() -> bool:
        return late_samples() > before

    await async_wait_until(seen, what="the lag above 0.25 s to be recorded")
