"""A full disk: ingest answers 503 with Retry-After, loses nothing, and recovers by itself.

The data directory lives on a size-limited tmpfs the test mounts (root only; CI runs as
root, so there a missing mount is a failure, not a skip). tmpfs refuses writes past its
size with ENOSPC exactly as a full disk does, and SQLite and DuckDB see the same errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
from _exporter_process import ExporterProcess, http_request, running_exporter
from conftest import BASE_MS, in_ci, received, settled, wait_until

from exporter.errors import StoreInvalidatedError
from exporter.records import PaymentRecord, StoreRecord
from exporter.store.duckdb import DuckDBStore

pytestmark = pytest.mark.slow


@dataclass
class SmallDisk:
    """A mounted tmpfs of a given size; :meth:`resize` changes it in place."""

    path: Path

    def resize(self, size: str) -> None:
        """Grow (or shrink) the filesystem, as freeing space on a real disk would."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill(self) -> Path:
        """Write a file until the filesystem refuses another byte; returns it."""
        filler = self.path / "filler"
        block = b"\0" * 65536
        with open(filler, "wb", buffering=0) as handle:
            while True:
                try:
                    handle.write(block)
                except OSError:
                    break
        with open(filler, "ab", buffering=0) as handle:  # the last partial block
            for _ in range(16):
                try:
                    handle.write(b"\0" * 4096)
                except OSError:
                    break
        return filler


def _mount(path: Path, size: str) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            reason = f"mount -t tmpfs failed: {result.stderr.strip()}"
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason}; CI runs as root and must run this test")
        pytest.skip(reason)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 32 MiB tmpfs, unmounted after the test."""
    path = tmp_path / "disk"
    path.mkdir()
    _mount(path, "32m")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _batch(start: int, count: int) -> tuple[bytes, list[str]]:
    """NDJSON of ``count`` received+settled lifecycles; returns it and the payment ids."""
    lines, ids = [], []
    for n in range(start, start + count):
        pid = f"disk-{n:06d}"
        ids.append(pid)
        lines.append(json.dumps(received(pid, BASE_MS + n)))
        lines.append(json.dumps(settled(pid, BASE_MS + n + 2000)))
    return ("\n".join(lines) + "\n").encode(), ids


def _post(exporter: ExporterProcess, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """POST NDJSON and return the status, headers and body (any status)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        exporter.events_url, data=body, headers={"Content-Type": "application/x-ndjson"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return int(response.status), dict(response.headers), bytes(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), dict(error.headers), bytes(error.read())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Sender:
    """Posts fresh payment lifecycles and remembers which were acknowledged or refused."""

    def __init__(self, exporter: ExporterProcess) -> None:
        self.exporter = exporter
        self.next_id = 0
        self.acked: list[str] = []
        self.refused: list[str] = []

    def post(self, lifecycles: int, invalid: bool = False) -> tuple[int, dict[str, str], bytes]:
        """POST ``lifecycles`` new lifecycles (and an invalid event when ``invalid``)."""
        body, ids = _batch(self.next_id, lifecycles)
        self.next_id += lifecycles
        if invalid:
            body += b'{"type": "payment:received", "data": {}}\n'
        status, headers, answer = _post(self.exporter, body)
        if status == 202:
            self.acked += ids
        else:
            self.refused += ids
        return status, headers, answer


def test_full_disk_refuses_ingest_then_recovers_without_a_restart(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """503 + Retry-After while full, /readyz not ready, idle CPU; then every ack once."""
    data_dir = small_disk.path / "data"
    with running_exporter(data_dir, tmp_path / "exporter.log") as exporter:
        sender = _Sender(exporter)
        assert sender.post(200)[0] == 202
        exporter.wait_caught_up()
        # Fill the disk but for a few MiB, which the next commits then use up: the
        # store receives records while there is no room left to write or checkpoint
        # them, nor to mark them delivered in the ledger.
        slack = small_disk.path / "slack"
        slack.write_bytes(b"\0" * 4 * 1024 * 1024)
        filler = small_disk.fill()
        slack.unlink()

        # Batches with an invalid event (a dead letter in the same commit) until one
        # is refused: a commit fails whole, its dead letter with it.
        answers = [sender.post(200, invalid=True) for _ in range(200)]
        refusals = [a for a in answers if a[0] != 202]
        assert refusals, "the disk never filled"
        for status, headers, answer in refusals:
            assert status == 503, answer
            assert headers.get("Retry-After", "").isdigit()
            assert "ledger" in json.loads(answer)["error"]

        # Space a failed transaction wrote into the WAL is reused by the next, so small
        # commits may still fit for a while; once they do not, /readyz says so.
        def exhausted() -> bool:
            if sender.post(1)[0] != 503:
                return False
            status, ready = http_request(exporter.url + "/readyz")
            error = json.loads(ready)["ledger"].get("error", "")
            return status == 503 and "LedgerUnavailableError" in error

        wait_until(exhausted, 60, 0.05, "single events and /readyz to find the disk full")
        # A body that is not JSON is still answered as such; its dead letter cannot be
        # written, and the exporter carries on.
        assert _post(exporter, b"{not json")[0] == 400
        backlog = exporter.metric("exporter_ledger_backlog_events")
        assert backlog[frozenset({("store", "duckdb")})] > 0
        wait_until(
            lambda: sum(exporter.metric("exporter_store_write_errors_total").values()) > 0,
            15,
            0.2,
            "the forwarder to fail against the full disk",
        )

        # Full, the exporter neither exits nor spins: under half a core over 3 s.
        before, started = _cpu_seconds(exporter.proc.pid), time.monotonic()
        time.sleep(3)
        used = _cpu_seconds(exporter.proc.pid) - before
        assert exporter.proc.poll() is None
        assert used / (time.monotonic() - started) < 0.5, f"{used:.2f} s of CPU in 3 s"

        # Space returns: ingest works again without a restart.
        filler.unlink()
        wait_until(lambda: sender.post(200)[0] == 202, 30, 0.2, "ingest to recover")
        wait_until(lambda: exporter.readyz()[0] == 200, 30, 0.2, "/readyz to recover")
        exporter.wait_caught_up(30)
        assert exporter.terminate() == 0, exporter.log()

    acked = sender.acked
    keys = {f"payment:received:{pid}" for pid in acked} | {
        f"payment:settled:{pid}" for pid in acked
    }
    ledger = sqlite3.connect(data_dir / "ledger.sqlite3")
    try:
        stored = {key for (key,) in ledger.execute("SELECT key FROM events")}
    finally:
        ledger.close()
    assert keys - stored == set(), "acknowledged events missing from the ledger"
    refused = {f"payment:received:{pid}" for pid in sender.refused}
    assert refused & stored == set(), "part of a refused request was stored"
    store = duckdb.connect(str(data_dir / "store.duckdb"), read_only=True)
    try:
        rows = store.execute(
            "SELECT payment_id, status, count(*) FROM payment GROUP BY ALL"
        ).fetchall()
    finally:
        store.close()
    counts = {(pid, status): n for pid, status, n in rows}
    assert {n for n in counts.values()} == {1}, "a record is in the store twice"
    expected = {(pid, status) for pid in acked for status in ("received", "settled")}
    assert expected - set(counts) == set(), "acknowledged events missing from the store"


def _records(start: int, count: int) -> list[StoreRecord]:
    return [
        PaymentRecord(
            f"payment:received:p{n}",
            BASE_MS + n,
            "eip155:8453",
            "received",
            f"p{n}",
            "0x" + "a" * 40,
            "0x" + "b" * 40,
            1_500_000,
        )
        for n in range(start, start + count)
    ]


async def test_store_invalidated_by_a_failed_checkpoint_reopens_itself(
    small_disk: SmallDisk,
) -> None:
    """DuckDB invalidates its database when a checkpoint finds the disk full; the store
    reopens the file on its next write, and once space returns the retried batch is
    stored once, with nothing written before it lost."""
    store = await asyncio.to_thread(DuckDBStore.open, small_disk.path / "store.duckdb")
    written = 0
    failure: StoreInvalidatedError | None = None
    try:
        # DuckDB checkpoints once its WAL passes 16 MiB: on a 32 MiB disk, once the file
        # has grown enough, a checkpoint's new blocks no longer fit next to the WAL
        # (after about a million of these records).
        for _ in range(2_000):
            try:
                await store.write(_records(written, 2000))
            except StoreInvalidatedError as error:
                failure = error
                break
            written += 2000
        assert failure is not None, "the checkpoint never failed"
        assert "checkpoint" in str(failure)
        small_disk.resize("256m")
        await store.write(_records(written, 2000))  # the batch that failed, again
        counts = await asyncio.to_thread(
            store.query, "SELECT count(*), count(DISTINCT key) FROM payment"
        )
        assert counts == [(written + 2000, written + 2000)]
    finally:
        await store.close()
