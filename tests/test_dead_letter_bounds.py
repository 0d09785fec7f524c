"""Refusals grow the ledger by a bounded amount: each dead letter keeps the head of its
body (the size as received recorded, the rest counted), refusals may store only a budget
of bytes per minute (past it they are answered and counted, not stored), and dead letters
expire under their own retention."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import AppClient, async_wait_until
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER, REGISTRY
from exporter.ingest.dead_letters import (
    LETTER_OVERHEAD_BYTES,
    DeadLetterGate,
    DeadLetterLimits,
)
from exporter.ledger import DeadLetter, Ledger, Submission
from exporter.metrics import Metrics

JSON = {"Content-Type": "application/json"}
MB = 1_000_000
ClientFactory = Callable[..., Awaitable[AppClient]]


def _ledger_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("ledger.sqlite3*"))


def _sample(client: AppClient, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app[REGISTRY].get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_five_8_mb_malformed_bodies_grow_the_ledger_by_their_heads_only(
    client: AppClient, data_dir: Path
) -> None:
    # The finding: five 8 MB malformed bodies grew the ledger by 42 MB.
    body = b"[" + b"x" * (8 * MB - 1)
    before = _ledger_bytes(data_dir)
    for _ in range(5):
        response = await client.post("/v1/events", data=io.BytesIO(body), headers=JSON)
        assert response.status == 400
        assert (await response.json())["error"].startswith("body is not valid JSON")
    grown = _ledger_bytes(data_dir) - before
    assert grown < 2 * MB, f"the ledger grew {grown} bytes"
    letters = client.app[COMMITTER].ledger.dead_letters()
    assert [(len(d.raw), d.raw_size) for d in letters] == [(64 * 1024, 8 * MB)] * 5
    assert letters[0].raw == body[: 64 * 1024]
    assert _sample(client, "exporter_dead_letter_truncated_bytes_total") == 5 * (8 * MB - 65536)
    assert _sample(client, "exporter_events_rejected_total", {"reason": "malformed"}) == 5


async def test_a_small_refused_body_is_kept_whole(client: AppClient) -> None:
    response = await client.post("/v1/events", data=b"{nope", headers=JSON)
    assert response.status == 400
    (letter,) = client.app[COMMITTER].ledger.dead_letters()
    assert (letter.raw, letter.raw_size) == (b"{nope", None)
    assert _sample(client, "exporter_dead_letter_truncated_bytes_total") == 0


async def test_refusals_past_the_budget_are_answered_and_counted_but_not_stored(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        dead_letter_max_bytes=4096,
        dead_letter_max_bytes_per_minute=10_000,
    )
    client = await aiohttp_client(create_app(settings))
    body = b"[" + b"y" * 20_000
    for _ in range(10):
        response = await client.post("/v1/events", data=body, headers=JSON)
        assert response.status == 400
    letters = client.app[COMMITTER].ledger.dead_letters()
    # 4096 bytes of body plus the error and a row's overhead each: two fit in 10,000.
    assert len(letters) == 2
    stored = sum(len(d.raw) + len(d.error) + LETTER_OVERHEAD_BYTES for d in letters)
    assert stored <= 10_000
    assert _sample(client, "exporter_dead_letters_unstored_total", {"reason": "malformed"}) == 8
    assert _sample(client, "exporter_events_rejected_total", {"reason": "malformed"}) == 10


async def test_invalid_events_share_the_budget(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        dead_letter_max_bytes=1024,
        dead_letter_max_bytes_per_minute=2048,
    )
    client = await aiohttp_client(create_app(settings))
    lines = b"\n".join(json.dumps({"type": "nope", "n": n}).encode() for n in range(500))
    response = await client.post(
        "/v1/events", data=lines, headers={"Content-Type": "application/x-ndjson"}
    )
    answer = await response.json()
    assert response.status == 422 and len(answer["rejected"]) == 500
    stored = len(client.app[COMMITTER].ledger.dead_letters())
    assert 0 < stored < 20
    unstored = _sample(client, "exporter_dead_letters_unstored_total", {"reason": "invalid"})
    assert stored + unstored == 500


def test_the_budget_refills_over_a_minute() -> None:
    now = [1000.0]
    registry = CollectorRegistry()
    gate = DeadLetterGate(DeadLetterLimits(2048, 6000), Metrics(registry), lambda: now[0])
    letter = DeadLetter("malformed", "e" * 72, b"z" * 1800)  # costs 2000 bytes
    assert len(gate.admit([letter] * 5)) == 3
    assert len(gate.admit([letter])) == 0
    now[0] += 20.0  # a third of a minute: 2000 bytes
    assert len(gate.admit([letter] * 2)) == 1
    now[0] += 3600.0  # a long pause refills one minute's worth, no more
    assert len(gate.admit([letter] * 5)) == 3
    assert registry.get_sample_value(
        "exporter_dead_letters_unstored_total", {"reason": "malformed"}
    ) == 2 + 1 + 1 + 2


def test_expire_dead_letters_deletes_only_older_ones(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        ledger.commit(
            [
                Submission(
                    dead_letters=[
                        DeadLetter("invalid", "old", b"a", received_at=1_000),
                        DeadLetter("invalid", "old", b"b", received_at=2_000),
                        DeadLetter("invalid", "new", b"c", received_at=5_000),
                    ]
                )
            ]
        )
        assert ledger.expire_dead_letters(3_000, limit=1) == 1
        assert ledger.expire_dead_letters(3_000) == 1
        assert ledger.expire_dead_letters(3_000) == 0
        assert [d.raw for d in ledger.dead_letters()] == [b"c"]
    finally:
        ledger.close()


async def test_the_maintenance_job_expires_dead_letters_past_their_retention(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    old_ms = int((time.time() - 15 * 86400) * 1000)
    ledger = Ledger(data_dir / "ledger.sqlite3")
    ledger.commit(
        [
            Submission(
                dead_letters=[
                    DeadLetter("invalid", "a fortnight old", b"old", received_at=old_ms),
                    DeadLetter("invalid", "today", b"new"),
                ]
            )
        ]
    )
    ledger.close()
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", dead_letter_retention_days=14)
    client = await aiohttp_client(create_app(settings))
    ledger = client.app[COMMITTER].ledger

    async def only_the_new_one() -> bool:
        return [d.raw for d in ledger.dead_letters()] == [b"new"]

    await async_wait_until(only_the_new_one)


def test_a_budget_below_one_letter_is_refused_in_one_line(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="EXPORTER_DEAD_LETTER_MAX_BYTES_PER_MINUTE"):
        Settings(
            data_dir=data_dir,
            dead_letter_max_bytes=65536,
            dead_letter_max_bytes_per_minute=4096,
        )


def test_dead_letters_cli_shows_the_truncation(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ledger = Ledger(data_dir / "ledger.sqlite3")
    ledger.commit(
        [
            Submission(
                dead_letters=[
                    DeadLetter("malformed", "not JSON", b"[" * 100, raw_size=8 * MB),
                    DeadLetter("invalid", "bad", b"{}"),
                ]
            )
        ]
    )
    ledger.close()

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "dead-letters", "--data-dir", str(data_dir), *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    listed = json.loads(run("--format", "json"))
    assert [(d["rawSize"], d["rawBytes"], d["truncated"]) for d in listed] == [
        (2, 2, False),
        (8 * MB, 100, True),
    ]
    table = run().splitlines()
    assert "8000000 (head 100 kept)" in table[3]


def test_dead_letters_cli_reads_a_ledger_without_raw_size(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    Ledger(data_dir / "ledger.sqlite3").close()
    with sqlite3.connect(data_dir / "ledger.sqlite3") as conn:
        conn.execute("ALTER TABLE dead_letters DROP COLUMN raw_size")
        conn.execute(
            "INSERT INTO dead_letters (received_at, reason, error, raw) "
            "VALUES (1, 'invalid', 'bad', x'7b7d')"
        )
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "dead-letters", "--format", "json",
         "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    (letter,) = json.loads(result.stdout)
    assert (letter["rawSize"], letter["truncated"]) == (2, False)
    # The exporter adds the column when it next opens the file.
    Ledger(data_dir / "ledger.sqlite3").close()
    with sqlite3.connect(data_dir / "ledger.sqlite3") as conn:
        assert "raw_size" in {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
