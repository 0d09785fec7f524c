"""The operator commands: replay, export, dead-letters, query, flux, backfill.

Most run the command line as a subprocess, as an operator would; the resumable backfill
is also driven in-process with a store that fails part-way.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import http.server
import io
import json
import subprocess
import threading
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import pytest
from _exporter_process import run_cli, running_exporter
from conftest import (
    BASE_MS,
    batch_created,
    batch_settled,
    failed,
    received,
    settled,
    verified,
)

from exporter import Settings
from exporter.analytics.models import ANALYTIC_NAMES
from exporter.cli.backfill import backfill
from exporter.cli.render import render_table
from exporter.config import StoreKind
from exporter.records import Store, StoreRecord, StoreRejection
from exporter.store import open_store

AT = str(BASE_MS + 3_600_000)
"""The instant analytics are computed as of: an hour after the test events."""


def history() -> list[dict[str, Any]]:
    """A small mixed history: payments on two networks, a failure, a batch, out of order."""
    payer2, payee2 = "0x" + "1" * 40, "0x" + "2" * 40
    events: list[dict[str, Any]] = [
        settled("p2", BASE_MS + 3000, fee="0.02", settlement_ms=900),  # before its receipt
        received("p1", BASE_MS, amount="1.50"),
        verified("p1"),
        settled("p1", BASE_MS + 2000, fee="0.01", settlement_ms=1500),
        received("p2", BASE_MS + 10, amount="2.25", network="eip155:137"),
        received("p3", BASE_MS + 20, amount="10", payer=payer2, payee=payee2),
        failed("p3", BASE_MS + 4000),
        received("p4", BASE_MS + 30, amount="0.333333"),
        batch_created("b1"),
        batch_settled("b1"),
    ]
    return events


def write_ndjson(path: Path, lines: list[bytes]) -> Path:
    """Write ``lines`` as NDJSON (gzip when the name ends in .gz)."""
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def event_lines(events: list[dict[str, Any]]) -> list[bytes]:
    """Each event as one JSON line."""
    return [json.dumps(e).encode() for e in events]


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON summary a replay prints on stdout."""
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def store_keys(data_dir: Path) -> list[tuple[str, str]]:
    """(key, status) of every payment row in the embedded store."""
    conn = duckdb.connect(str(data_dir / "store.duckdb"), read_only=True)
    try:
        rows = conn.execute("SELECT key, status FROM payment ORDER BY key").fetchall()
    finally:
        conn.close()
    return [(str(k), str(s)) for k, s in rows]


def all_analytics(data_dir: Path) -> dict[str, Any]:
    """Every analytic over 24h as of :data:`AT`, as JSON, from the data dir's store."""
    answers: dict[str, Any] = {}
    for name in ANALYTIC_NAMES:
        window = () if name == "realtime" else ("--window", "24h")  # realtime has none
        result = run_cli(
            "query",
            name,
            *window,
            "--at",
            AT,
            "--format",
            "json",
            "--data-dir",
            str(data_dir),
        )
        assert result.returncode == 0, result.stderr
        answers[name] = json.loads(result.stdout)
    return answers


def test_replay_reports_bad_lines_and_is_idempotent(tmp_path: Path) -> None:
    """Bad lines are named by file and line and skipped; a second replay changes nothing."""
    data_dir = tmp_path / "data"
    lines = event_lines(history())
    lines.insert(2, b"{not json")
    lines.insert(5, json.dumps(received("bad", 12345)).encode())  # seconds, not ms
    path = write_ndjson(tmp_path / "events.ndjson.gz", lines)

    first = run_cli("replay", str(path), "--data-dir", str(data_dir))
    assert first.returncode == 1, first.stderr
    summary = summary_of(first)
    assert summary["accepted"] == len(history())
    assert summary["duplicates"] == 0
    assert summary["rejected"] == {"invalid": 1, "malformed": 1}
    assert summary["store"] == "duckdb" and summary["leftInLedger"] == 0
    assert f"{path}:3: malformed: not valid JSON" in first.stderr
    assert f"{path}:6: invalid: data.timestamp" in first.stderr
    assert "events/s" in first.stderr
    keys = store_keys(data_dir)
    assert ("payment:settled:p2", "settled") in keys
    before = all_analytics(data_dir)

    second = run_cli("replay", str(path), "--data-dir", str(data_dir))
    assert second.returncode == 1
    again = summary_of(second)
    assert (again["accepted"], again["duplicates"]) == (0, len(history()))
    assert store_keys(data_dir) == keys
    assert all_analytics(data_dir) == before


def test_replay_of_clean_file_exits_zero_and_missing_file_exits_two(tmp_path: Path) -> None:
    """A file of valid events replays with exit 0; a missing file is a usage error."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    result = run_cli("replay", str(path), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["rejected"] == {}
    missing = run_cli("replay", str(tmp_path / "nope.ndjson"), "--data-dir", str(data_dir))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_replay_no_deliver_leaves_records_for_the_next_start(tmp_path: Path) -> None:
    """``--no-deliver`` commits to the ledger only and says so; the store stays empty."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    result = run_cli("replay", str(path), "--no-deliver", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert "committed to the ledger only" in result.stderr
    assert summary_of(result)["store"] is None
    assert not (data_dir / "store.duckdb").exists()


def test_export_round_trip_reproduces_analytics(tmp_path: Path) -> None:
    """export -> fresh data dir -> replay gives identical analytics and the same events."""
    source, copy = tmp_path / "a", tmp_path / "b"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(source)).returncode == 0
    exported = tmp_path / "export.ndjson.gz"
    result = run_cli("export", "--output", str(exported), "--data-dir", str(source))
    assert result.returncode == 0, result.stderr
    assert f"{len(history())} events written" in result.stderr
    assert len(gzip.decompress(exported.read_bytes()).splitlines()) == len(history())

    replayed = run_cli("replay", str(exported), "--data-dir", str(copy))
    assert replayed.returncode == 0, replayed.stderr
    assert summary_of(replayed)["accepted"] == len(history())
    assert store_keys(copy) == store_keys(source)
    assert all_analytics(copy) == all_analytics(source)
    # The copy exports the same lines in the same order.
    plain = run_cli("export", "--data-dir", str(copy))
    assert plain.stdout.encode() == gzip.decompress(exported.read_bytes())


def test_export_since_until_selects_by_event_time(tmp_path: Path) -> None:
    """--since is inclusive, --until exclusive, both on the event's own timestamp."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    result = run_cli(
        "export",
        "--since",
        str(BASE_MS + 10),
        "--until",
        "2026-01-01T00:00:03Z",
        "--data-dir",
        str(data_dir),
    )
    assert result.returncode == 0, result.stderr
    stamps = sorted(json.loads(line)["data"]["timestamp"] for line in result.stdout.splitlines())
    assert stamps == [BASE_MS + 10, BASE_MS + 20, BASE_MS + 30, BASE_MS + 100, BASE_MS + 2000]
    for since in ("yesterday", "²", "9" * 5000):
        bad = run_cli("export", "--since", since, "--data-dir", str(data_dir))
        assert bad.returncode == 2 and bad.stderr.startswith("facilitator-exporter: --since: ")
        assert len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr


def test_export_without_ledger_fails(tmp_path: Path) -> None:
    """Exporting a data directory without a ledger exits 2 naming the file; nothing is
    created."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("export", "--data-dir", str(empty))
    assert result.returncode == 2
    assert f"no ledger at {empty / 'ledger.sqlite3'}" in result.stderr
    assert list(empty.iterdir()) == []


def test_dead_letters_lists_conflicts_and_rejects(tmp_path: Path) -> None:
    """A conflicting event is a dead letter; --reason filters; json and table formats."""
    data_dir = tmp_path / "data"
    first = write_ndjson(tmp_path / "a.ndjson", event_lines(history()))
    assert run_cli("replay", str(first), "--data-dir", str(data_dir)).returncode == 0
    other = received("p1", BASE_MS, amount="9.99")  # same key, different body
    second = write_ndjson(tmp_path / "b.ndjson", event_lines([other]))
    result = run_cli("replay", str(second), "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert summary_of(result)["rejected"] == {"conflict": 1}
    assert f"{second}:1: conflict" in result.stderr

    listed = run_cli("dead-letters", "--format", "json", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [(d["reason"], d["key"]) for d in letters] == [("conflict", "payment:received:p1")]
    assert json.loads(letters[0]["raw"])["data"]["amount"] == "9.99"

    table = run_cli("dead-letters", "--data-dir", str(data_dir))
    header, rule, row = table.stdout.splitlines()
    assert header.split() == ["id", "received_at", "reason", "key", "size", "error", "raw"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "conflict" in row and "payment:received:p1" in row

    none = run_cli(
        "dead-letters", "--reason", "invalid", "--format", "json", "--data-dir", str(data_dir)
    )
    assert none.returncode == 0 and json.loads(none.stdout) == []


def test_query_formats(tmp_path: Path) -> None:
    """Tables align with money right-aligned at 6 decimals; csv and json agree."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    common = ("--at", AT, "--data-dir", str(data_dir))

    table = run_cli("query", "top/payers", *common)
    assert table.returncode == 0, table.stderr
    assert "computed from the duckdb store" in table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["address", "totalPaid", "paymentCount", "lastPayment"]
    assert "3.750000" in lines[2]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned: equal widths
    paid_end = lines[0].index("totalPaid") + len("totalPaid")
    assert lines[2][:paid_end].endswith("3.750000")  # right-aligned under its header

    payments = run_cli("query", "payments", *common)
    rows = dict(line.split(None, 1) for line in payments.stdout.splitlines()[2:])
    assert rows["totalVolume"].strip() == "3.750000"
    assert rows["totalPayments"].strip() == "4"

    as_json = json.loads(run_cli("query", "payments", "--format", "json", *common).stdout)
    as_csv = run_cli("query", "payments", "--format", "csv", *common)
    parsed = dict(csv.reader(io.StringIO(as_csv.stdout)))
    assert parsed.pop("field") == "value"
    assert parsed == {
        k: str(v) if not isinstance(v, float) or v % 1 else f"{v:.0f}" for k, v in as_json.items()
    }

    series = run_cli(
        "query", "timeseries", "--metric", "fees", "--window", "1h", "--format", "csv", *common
    )
    points = list(csv.DictReader(io.StringIO(series.stdout)))
    assert [p["timestamp"] for p in points] == [str(BASE_MS), str(BASE_MS + 3_600_000)]

    limited = run_cli("query", "top/routes", "--limit", "1", "--format", "json", *common)
    assert len(json.loads(limited.stdout)) == 1


def test_query_refuses_unknown_window_and_analytic(tmp_path: Path) -> None:
    """Unknown windows and analytics are usage errors (exit 2)."""
    assert run_cli("query", "payments", "--window", "2d").returncode == 2
    assert run_cli("query", "nonsense").returncode == 2


def test_render_table_right_aligns_numbers() -> None:
    """Numeric columns are right-aligned, text columns left-aligned."""
    text = render_table(["name", "amount"], [["a", "1.500000"], ["bbb", "12.000000"]])
    assert text.splitlines() == [
        "name     amount",
        "----  ---------",
        "a      1.500000",
        "bbb   12.000000",
    ]


def test_flux_needs_influxdb(tmp_path: Path) -> None:
    """flux on the embedded store exits 2 and says what to configure."""
    result = run_cli(
        "flux",
        'from(bucket: "payments") |> range(start: -1h)',
        EXPORTER_DATA_DIR=str(tmp_path / "data"),
    )
    assert result.returncode == 2
    assert "not InfluxDB" in result.stderr and "EXPORTER_INFLUX_URL" in result.stderr
    assert run_cli("flux").returncode == 2


def test_backfill_rebuilds_a_lost_store(tmp_path: Path) -> None:
    """backfill --to duckdb re-derives every record: analytics equal the original."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    before, keys = all_analytics(data_dir), store_keys(data_dir)
    for name in ("store.duckdb", "store.duckdb.wal"):
        (data_dir / name).unlink(missing_ok=True)
    result = run_cli("backfill", "--to", "duckdb", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] is True and summary["events"] == len(history())
    assert "events/s" in result.stderr
    assert store_keys(data_dir) == keys
    assert all_analytics(data_dir) == before
    assert not list(data_dir.glob("backfill-*"))


def test_backfill_to_influxdb_needs_its_settings(tmp_path: Path) -> None:
    """--to influxdb without EXPORTER_INFLUX_* exits 2 naming them."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    result = run_cli("backfill", "--to", "influxdb", "--data-dir", str(data_dir))
    assert result.returncode == 2
    assert "EXPORTER_INFLUX_URL" in result.stderr


class _FailingStore:
    """Delivers to ``inner`` until ``budget`` records were written, then fails."""

    def __init__(self, inner: Store, budget: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.budget = budget

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        if self.budget <= 0:
            raise ConnectionError("store went away")
        self.budget -= len(records)
        return await self.inner.write(records)

    async def close(self) -> None:
        await self.inner.close()


def test_backfill_resumes_after_an_interruption(tmp_path: Path) -> None:
    """A run that could not deliver everything exits incomplete; the next one finishes."""
    data_dir = tmp_path / "data"
    events = [received(f"r{i}", BASE_MS + i) for i in range(30)]
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(events))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    keys = store_keys(data_dir)
    (data_dir / "store.duckdb").unlink()
    settings = Settings(data_dir=data_dir, store_batch_size=10)
    err = io.StringIO()

    def failing(s: Settings) -> Store:
        return _FailingStore(open_store(s), 10)

    first = asyncio.run(
        backfill(
            settings,
            StoreKind.DUCKDB,
            err=err,
            drain_seconds=0.5,
            batch_events=10,
            store_factory=failing,
        )
    )
    assert not first.complete
    assert (data_dir / "backfill-duckdb.json").exists()
    second = asyncio.run(backfill(settings, StoreKind.DUCKDB, err=err, batch_events=10))
    assert second.complete
    assert "resuming after ledger event 30" in err.getvalue()
    assert store_keys(data_dir) == keys


@pytest.mark.slow
def test_commands_beside_a_running_exporter(tmp_path: Path) -> None:
    """With an exporter on the data dir: query --url works, the ledger openers refuse,
    dead-letters still reads, and query without --url says to use --url."""
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    local = json.loads(
        run_cli(
            "query", "payments", "--at", AT, "--format", "json", "--data-dir", str(data_dir)
        ).stdout
    )
    with running_exporter(data_dir, tmp_path / "exporter.log") as exporter:
        remote = run_cli("query", "payments", "--at", AT, "--format", "json", "--url", exporter.url)
        assert remote.returncode == 0, remote.stderr
        assert f"answered by the exporter at {exporter.url}" in remote.stderr
        assert json.loads(remote.stdout) == local
        for args in (
            ("replay", str(path)),
            ("export",),
            ("backfill", "--to", "duckdb"),
            ("query", "payments"),
        ):
            refused = run_cli(*args, "--data-dir", str(data_dir))
            assert refused.returncode == 1, args
            assert "in use by another exporter process" in refused.stderr
        letters = run_cli("dead-letters", "--format", "json", "--data-dir", str(data_dir))
        assert letters.returncode == 0 and json.loads(letters.stdout) == []
        assert exporter.terminate() == 0, exporter.log()
    unreachable = run_cli("query", "payments", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach an exporter" in unreachable.stderr


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("replay", ("FILE", "--data-dir", "--no-deliver", "--drain-timeout")),
        ("export", ("--since", "--until", "--output", "--data-dir")),
        ("dead-letters", ("--reason", "--format", "--limit", "--width", "--data-dir")),
        (
            "query",
            (
                "--window",
                "--at",
                "--limit",
                "--metric",
                "--format",
                "--url",
                "--token",
                "--timeout",
                "--data-dir",
            ),
        ),
        ("flux", ("--file", "--format")),
        ("backfill", ("--to", "--restart", "--drain-timeout", "--data-dir")),
    ],
)
def test_help_explains_every_option(command: str, options: tuple[str, ...]) -> None:
    """``COMMAND --help`` exits 0 and lists each option."""
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert [option for option in options if option not in result.stdout] == []


_FLUX_CSV = (
    "#datatype,string,long,dateTime:RFC3339,double,string,string\r\n"
    "#group,false,false,false,false,true,true\r\n"
    "#default,_result,,,,,\r\n"
    ",result,table,_time,_value,_field,network\r\n"
    ",,0,2026-01-01T00:00:01Z,1.5,amount,eip155:8453\r\n"
    ",,0,2026-01-01T00:00:02Z,12.25,amount,eip155:8453\r\n"
    ",,1,2026-01-01T00:00:03Z,0.01,fee,eip155:137\r\n"
    "\r\n"
)


class _FluxHandler(http.server.BaseHTTPRequestHandler):
    """Answers ``POST /api/v2/query`` with fixed annotated CSV, recording the request."""

    seen: ClassVar[list[tuple[str, str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        self.seen.append((self.path, self.headers.get("Authorization", ""), body))
        if "fail" in body:
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"code":"invalid","message":"compilation failed: bad"}')
            return
        payload = _FLUX_CSV.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/csv; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        """Quiet."""


def test_flux_prints_each_result_table(tmp_path: Path) -> None:
    """flux sends the query with the token and prints one aligned table per result table."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FluxHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "EXPORTER_INFLUX_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "EXPORTER_INFLUX_TOKEN": "flux-token",
        "EXPORTER_INFLUX_ORG": "acme",
        "EXPORTER_DATA_DIR": str(tmp_path / "data"),
    }
    try:
        query_file = tmp_path / "q.flux"
        query_file.write_text('from(bucket: "payments") |> range(start: -1h)')
        result = run_cli("flux", "--file", str(query_file), **env)
        assert result.returncode == 0, result.stderr
        path, auth, body = _FluxHandler.seen[-1]
        assert path.startswith("/api/v2/query") and "org=acme" in path
        assert auth == "Token flux-token"
        assert 'from(bucket: \\"payments\\")' in body or 'from(bucket: "payments")' in body
        text = result.stdout
        assert text.splitlines()[0] == "table 0:"
        assert "table 1:" in text
        first = text.split("\n\n")[0].splitlines()
        assert first[1].split() == ["_time", "_value", "_field", "network"]
        assert first[3].split()[1] == "1.5" and first[4].split()[1] == "12.25"
        assert first[3].index("1.5") + 3 == first[4].index("12.25") + 5  # right-aligned

        as_json = json.loads(run_cli("flux", "x", "--format", "json", **env).stdout)
        assert [len(table) for table in as_json] == [2, 1]
        assert as_json[1][0] == {
            "_time": "2026-01-01T00:00:03Z",
            "_value": 0.01,
            "_field": "fee",
            "network": "eip155:137",
        }

        refused = run_cli("flux", "fail", **env)
        assert refused.returncode == 1
        assert "400" in refused.stderr and "compilation failed" in refused.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_export_output_is_private_never_follows_a_link_and_never_overwrites(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", event_lines(history()))
    assert run_cli("replay", str(path), "--data-dir", str(data_dir)).returncode == 0
    out = tmp_path / "export.ndjson"
    assert run_cli("export", "--output", str(out), "--data-dir", str(data_dir)).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o600
    again = run_cli("export", "--output", str(out), "--data-dir", str(data_dir))
    assert again.returncode == 2 and "--force" in again.stderr
    out.chmod(0o644)
    forced = run_cli("export", "--output", str(out), "--force", "--data-dir", str(data_dir))
    assert forced.returncode == 0 and out.stat().st_mode & 0o777 == 0o600
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link.ndjson"
    link.symlink_to(target)
    for extra in ((), ("--force",)):
        refused = run_cli("export", "--output", str(link), *extra, "--data-dir", str(data_dir))
        assert refused.returncode == 2 and "symbolic link" in refused.stderr, refused.stderr
    assert target.read_text() == "keep me"
