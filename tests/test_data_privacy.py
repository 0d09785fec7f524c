"""The data directory is its user's alone: 0700, its files 0600, also when it existed."""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from _exporter_process import post_json, start_exporter
from conftest import AppClient, async_wait_until, received
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER


def mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


async def test_an_existing_open_data_dir_and_its_files_are_made_private(
    aiohttp_client: Callable[..., Awaitable[AppClient]], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    left_behind = data_dir / "notes.txt"
    left_behind.write_text("an operator's file")
    left_behind.chmod(0o644)
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0")
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    assert (await client.post("/v1/events", json=received("p1"))).status == 202
    ledger = client.app[COMMITTER].ledger

    async def delivered() -> bool:
        return bool(ledger.backlog == 0)

    await async_wait_until(delivered, what="store caught up")
    assert mode(data_dir) == 0o700
    assert mode(left_behind) == 0o600
    assert mode(settings.ledger_path) == 0o600
    assert mode(settings.duckdb_path) == 0o600
    wal = settings.ledger_path.with_name(settings.ledger_path.name + "-wal")
    assert not wal.exists() or mode(wal) == 0o600


def test_every_file_serve_creates_is_its_users_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    exporter = start_exporter(data_dir, tmp_path / "exporter.log")
    try:
        assert post_json(exporter.url + "/v1/events", [received("p1")])[0] == 202
    finally:
        exporter.terminate()
    assert mode(data_dir) == 0o700
    files = [entry for entry in data_dir.rglob("*") if entry.is_file()]
    assert files, "serve wrote nothing"
    assert {entry.name: mode(entry) for entry in files} == {entry.name: 0o600 for entry in files}
