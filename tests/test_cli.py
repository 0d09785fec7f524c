"""The ``facilitator-exporter`` command line, run as a subprocess like an operator would.

Every subprocess gets the environment without any ``EXPORTER_*`` variable, plus what
the test sets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
from _exporter_process import (
    clean_env,
    post_json,
    run_cli,
    running_exporter,
    sample_values,
)
from conftest import free_port, received, wait_until

LOCKED_STORE_FAILS_WITHIN = 10.0
"""A second exporter on a held data directory must give up at least this fast."""


def check_config_output(stdout: str) -> dict[str, Any]:
    """The settings JSON printed by ``check-config``, after checking the closing line."""
    body, _, last = stdout.rstrip("\n").rpartition("\n")
    assert last == "configuration is valid"
    settings: dict[str, Any] = json.loads(body)
    return settings


def test_check_config_defaults() -> None:
    """Without settings, check-config shows the documented defaults and exits 0."""
    result = run_cli("check-config")
    assert result.returncode == 0, result.stderr
    settings = check_config_output(result.stdout)
    assert settings["listen"] == "127.0.0.1:9402"
    assert settings["data_dir"] == "data"
    assert settings["ingest_token"] is None
    assert settings["durability"] == "process"
    assert settings["resolved_store"] == "duckdb"
    assert settings["ledger_path"] == str(Path("data") / "ledger.sqlite3")
    assert settings["duckdb_path"] == str(Path("data") / "store.duckdb")


def test_check_config_resolves_environment_and_flags(tmp_path: Path) -> None:
    """Variables are read, flags override them, and the token itself is never printed."""
    data_dir = tmp_path / "data"
    result = run_cli(
        "check-config",
        "--listen",
        "127.0.0.1:9999",
        "--data-dir",
        str(data_dir),
        EXPORTER_LISTEN="0.0.0.0:1111",
        EXPORTER_DURABILITY="power",
        EXPORTER_INGEST_TOKEN="s3cret-token-0123456789",
        EXPORTER_MAX_BATCH_EVENTS="500",
    )
    assert result.returncode == 0, result.stderr
    settings = check_config_output(result.stdout)
    assert settings["listen"] == "127.0.0.1:9999"
    assert settings["data_dir"] == str(data_dir)
    assert settings["durability"] == "power"
    assert settings["max_batch_events"] == 500
    assert settings["ingest_token"] == "(set)"
    assert settings["ledger_path"] == str(data_dir / "ledger.sqlite3")
    assert settings["duckdb_path"] == str(data_dir / "store.duckdb")
    assert "s3cret-token-0123456789" not in result.stdout + result.stderr


def test_check_config_accepts_any_address_with_a_token() -> None:
    """A non-loopback listen address is fine once an ingest token is set."""
    result = run_cli(
        "check-config",
        EXPORTER_LISTEN="0.0.0.0:9402",
        EXPORTER_INGEST_TOKEN="s3cret-token-0123456789",
    )
    assert result.returncode == 0, result.stderr
    assert check_config_output(result.stdout)["listen"] == "0.0.0.0:9402"


def test_check_config_refuses_public_listen_without_token() -> None:
    """Listening beyond loopback without a token is a configuration error naming the token."""
    result = run_cli("check-config", EXPORTER_LISTEN="0.0.0.0:9402")
    assert result.returncode == 2
    assert "EXPORTER_INGEST_TOKEN" in result.stderr
    assert "0.0.0.0:9402" in result.stderr
    assert "configuration is valid" not in result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXPORTER_DURABILITY", "sometimes"),
        ("EXPORTER_MAX_BODY_BYTES", "0"),
        ("EXPORTER_LOG_LEVEL", "loud"),
        ("EXPORTER_LISTEN", "no-port"),
    ],
)
def test_check_config_names_the_bad_variable(variable: str, value: str) -> None:
    """A bad value exits 2 with a message naming the variable."""
    result = run_cli("check-config", **{variable: value})
    assert result.returncode == 2
    assert variable in result.stderr
    assert "configuration is valid" not in result.stdout


def test_serve_refuses_bad_configuration_before_starting(tmp_path: Path) -> None:
    """``serve`` validates like check-config: exit 2, nothing created."""
    data_dir = tmp_path / "data"
    result = run_cli("serve", "--data-dir", str(data_dir), EXPORTER_DURABILITY="sometimes")
    assert result.returncode == 2
    assert "EXPORTER_DURABILITY" in result.stderr
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("serve", ("--listen", "--data-dir", "--demo", "--demo-rate")),
        ("check-config", ("--listen", "--data-dir")),
        (
            "simulate",
            ("--url", "--rate", "--duration", "--seed", "--token", "--batch-size", "--concurrency"),
        ),
    ],
)
def test_help_mentions_every_option(command: str, options: tuple[str, ...]) -> None:
    """``COMMAND --help`` exits 0 and lists each of the command's options."""
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    missing = [option for option in options if option not in result.stdout]
    assert missing == []


def test_top_level_help_lists_commands() -> None:
    """``--help`` lists the three commands."""
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check-config", "simulate"):
        assert command in result.stdout


def payments_total(text: str) -> float:
    """Sum of ``facilitator_payments_total`` over all its series."""
    return sum(sample_values(text, "facilitator_payments_total").values())


@pytest.mark.slow
def test_serve_demo_generates_payments(tmp_path: Path) -> None:
    """``serve --demo`` feeds itself traffic: payments are counted within 10 s."""
    with running_exporter(tmp_path / "data", tmp_path / "exporter.log", ["--demo"]) as exporter:
        wait_until(
            lambda: payments_total(exporter.metrics_text()) > 0,
            10.0,
            0.1,
            "demo traffic to be counted in facilitator_payments_total",
        )
        assert exporter.terminate() == 0, exporter.log()


@pytest.mark.slow
def test_second_serve_on_same_data_dir_fails_fast(tmp_path: Path) -> None:
    """A second exporter on a held data directory exits non-zero naming the lock, untouched."""
    data_dir = tmp_path / "data"
    with running_exporter(data_dir, tmp_path / "first.log") as first:
        started = time.monotonic()
        second = run_cli(
            "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir)
        )
        elapsed = time.monotonic() - started
        assert second.returncode != 0
        assert f"data directory {data_dir} is in use by another exporter process" in (second.stderr)
        assert str(data_dir / ".lock") in second.stderr
        assert elapsed < LOCKED_STORE_FAILS_WITHIN
        # The first exporter is unharmed and still ingests.
        status, answer = post_json(first.events_url, received("after-second"))
        assert (status, answer["accepted"]) == (202, 1)
        assert first.terminate() == 0, first.log()


@pytest.mark.slow
def test_sigterm_exits_zero_after_draining(tmp_path: Path) -> None:
    """SIGTERM stops ``serve`` with exit code 0, committed events delivered to the store."""
    data_dir = tmp_path / "data"
    with running_exporter(data_dir, tmp_path / "exporter.log") as exporter:
        status, answer = post_json(exporter.events_url, received("p-term"))
        assert (status, answer["accepted"]) == (202, 1)
        assert exporter.terminate() == 0, exporter.log()
    conn = duckdb.connect(str(data_dir / "store.duckdb"), read_only=True)
    try:
        rows = conn.execute("SELECT key, status FROM payment").fetchall()
    finally:
        conn.close()
    assert rows == [("payment:received:p-term", "received")]


# Starts the app as ``serve`` does and lists the InfluxDB client's modules it loaded.
_LOADED_INFLUX_MODULES = """
import asyncio, sys
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from exporter import Settings, create_app

async def main() -> None:
    server = TestServer(create_app(Settings(data_dir=sys.argv[1]), CollectorRegistry()))
    await server.start_server()
    print([m for m in sys.modules if m.split(".")[0] in ("influxdb_client", "reactivex")])
    await server.close()

asyncio.run(main())
"""


def test_the_embedded_store_leaves_the_influxdb_client_unloaded(tmp_path: Path) -> None:
    """The InfluxDB client and its dependencies (about 13 MiB of RSS) load only for InfluxDB."""
    result = subprocess.run(
        [sys.executable, "-c", _LOADED_INFLUX_MODULES, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stdout
