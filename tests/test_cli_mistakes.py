"""Every command answers a mistake or an unavailable dependency with one line and its
exit code, never a traceback; commands that only read never create a data directory.

Most cases call ``main([...])`` in-process; a few run the installed command as an
operator would, end to end.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
from _exporter_process import run_cli

from exporter.cli.main import main
from exporter.config import Durability
from exporter.ledger import Ledger

SIMULATE_GIVES_UP_WITHIN = 5.0
"""``simulate`` must say that nothing listens at its URL at least this fast."""


class Run(Protocol):
    """The ``run`` fixture: a command line in-process, with ``EXPORTER_*`` variables."""

    def __call__(self, *argv: str, **env: str) -> Outcome: ...


@dataclass(frozen=True)
class Outcome:
    """What one command line did."""

    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``EXPORTER_*`` variable from the caller, and the default data directory (``data``)
    inside this test's directory, so that one created by mistake is seen."""
    for name in [name for name in os.environ if name.startswith("EXPORTER_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv, **env)``: the command line in-process, with ``EXPORTER_*`` variables."""

    def invoke(*argv: str, **env: str) -> Outcome:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse refusing the command line
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return invoke


def refused(outcome: Outcome, code: int, *texts: str) -> None:
    """``outcome`` exited ``code`` with one line on stderr holding every one of ``texts``."""
    assert "Traceback" not in outcome.stderr
    assert outcome.code == code, outcome.stderr
    assert outcome.stderr.endswith("\n") and outcome.stderr.count("\n") == 1, outcome.stderr
    for text in texts:
        assert text in outcome.stderr, (text, outcome.stderr)


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_ledger(data_dir: Path) -> None:
    """An empty ledger in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    Ledger(data_dir / "ledger.sqlite3", Durability.PROCESS).close()


def uncreatable(tmp_path: Path) -> Path:
    """A data directory that cannot be created: its parent is a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return blocker / "data"


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("argv", "texts"),
    [
        ((), ("the following arguments are required: COMMAND",)),
        (("nonsense",), ("invalid choice: 'nonsense'",)),
        (("serve", "--bogus"), ("unrecognized arguments: --bogus",)),
        (("check-config", "--ping", "extra"), ("unrecognized arguments: extra",)),
        (("backfill", "--to", "postgres"), ("argument --to: invalid choice",)),
        (("query", "nonsense"), ("invalid choice: 'nonsense'",)),
        (("query", "payments", "--window", "2d"), ("argument --window: invalid choice",)),
    ],
)
def test_command_line_mistakes_are_one_line(
    run: Run, argv: tuple[str, ...], texts: tuple[str, ...]
) -> None:
    """argparse's refusal is one line naming the mistake and where help is, exit 2."""
    outcome = run(*argv)
    refused(outcome, 2, *texts, "--help)")


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "command",
    [
        "serve",
        "check-config",
        "replay x.ndjson",
        "export",
        "dead-letters",
        "query payments",
        "backfill --to duckdb",
        "recover",
        "flux x",
    ],
)
def test_malformed_json_setting_is_one_line_naming_it(run: Run, command: str) -> None:
    """A JSON-valued setting that is not JSON: exit 2 naming the variable, for every
    command that reads the settings."""
    outcome = run(*command.split(), EXPORTER_ANALYTICS_REFRESH_SECONDS="{1h: 30")
    refused(outcome, 2, "EXPORTER_ANALYTICS_REFRESH_SECONDS is not valid JSON")
    assert not Path("data").exists()


def test_invalid_settings_are_one_line_each_naming_the_variable(run: Run) -> None:
    """Several refused settings: one line for each, naming its variable."""
    outcome = run("check-config", EXPORTER_DURABILITY="sometimes", EXPORTER_MAX_BODY_BYTES="0")
    assert "Traceback" not in outcome.stderr
    assert outcome.code == 2
    lines = outcome.stderr.splitlines()
    assert len(lines) == 2, outcome.stderr
    assert "EXPORTER_DURABILITY" in lines[0] and "EXPORTER_MAX_BODY_BYTES" in lines[1]


# --------------------------------------------------------------------------- serve


def test_serve_demo_rate_without_demo_is_refused(run: Run) -> None:
    """``--demo-rate`` would be ignored without ``--demo``."""
    refused(run("serve", "--demo-rate", "5"), 2, "--demo-rate applies only with --demo")
    assert not Path("data").exists()


@pytest.mark.parametrize("rate", ["0", "-3", "nan", "fast"])
def test_serve_demo_rate_must_be_positive(run: Run, rate: str) -> None:
    """A demo rate that sends nothing (or is not a number) is refused."""
    refused(run("serve", "--demo", "--demo-rate", rate), 2, "argument --demo-rate: must be")


def test_serve_demo_needs_a_fixed_port(run: Run) -> None:
    """``--demo`` cannot find an exporter on port 0."""
    refused(run("serve", "--demo", "--listen", "127.0.0.1:0"), 2, "--demo needs a fixed port")


def test_serve_names_a_data_dir_it_cannot_create(run: Run, tmp_path: Path) -> None:
    """A data directory that cannot be created is named as such, with the way out, not
    reported as an address that cannot be listened on."""
    data_dir = uncreatable(tmp_path)
    outcome = run("serve", "--data-dir", str(data_dir))
    refused(outcome, 1, f"cannot create the data directory {data_dir}", "--data-dir")
    assert "listen" not in outcome.stderr


def test_serve_names_an_address_in_use(tmp_path: Path) -> None:
    """End to end: an address another process holds is named, with the way out."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        result = run_cli("serve", "--listen", listen, "--data-dir", str(tmp_path / "data"))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert f"facilitator-exporter: serve: cannot listen on {listen}" in result.stderr
    assert "--listen or EXPORTER_LISTEN" in result.stderr


# --------------------------------------------------------------------------- simulate


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rate", "0"),
        ("--rate", "-1"),
        ("--rate", "inf"),
        ("--duration", "-1"),
        ("--batch-size", "0"),
        ("--concurrency", "0"),
        ("--concurrency", "two"),
    ],
)
def test_simulate_refuses_values_that_send_nothing(run: Run, option: str, value: str) -> None:
    """Rates, durations and sizes out of range are refused before anything is sent."""
    refused(run("simulate", option, value), 2, f"argument {option}: must be")


def test_simulate_fails_fast_naming_the_url(run: Run) -> None:
    """Nothing listens: exit 1 within a few seconds, one line naming the URL."""
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    outcome = run("simulate", "--url", url, "--duration", "30")
    assert time.monotonic() - started < SIMULATE_GIVES_UP_WITHIN
    refused(outcome, 1, f"no exporter answers at {url}", "facilitator-exporter serve")
    assert outcome.stdout == ""


@pytest.mark.parametrize(
    ("host", "reached"), [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1")]
)
def test_simulate_takes_its_url_from_exporter_listen(run: Run, host: str, reached: str) -> None:
    """Without ``--url`` the exporter of EXPORTER_LISTEN is the target (on loopback when
    it listens on every address)."""
    port = closed_port()
    outcome = run("simulate", EXPORTER_LISTEN=f"{host}:{port}")
    refused(outcome, 1, f"no exporter answers at http://{reached}:{port}")


def test_simulate_refuses_a_malformed_exporter_listen(run: Run) -> None:
    """EXPORTER_LISTEN without a port cannot give a URL."""
    refused(run("simulate", EXPORTER_LISTEN="localhost"), 2, "EXPORTER_LISTEN")


@pytest.mark.parametrize("url", ["localhost:9402", "ftp://127.0.0.1:9402", "http://:80"])
def test_simulate_refuses_a_url_that_is_not_http(run: Run, url: str) -> None:
    """``--url`` must be an http(s) URL with a host."""
    refused(run("simulate", "--url", url), 2, "--url must be an http:// or https:// URL")


def test_simulate_refuses_a_blank_signing_secret(run: Run) -> None:
    """A blank secret would make every signature forgeable."""
    refused(run("simulate", "--signing-secret", " "), 2, "--signing-secret must not be empty")


def test_simulate_end_to_end_without_an_exporter() -> None:
    """End to end: the installed command prints the one line, no traceback."""
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_cli("simulate", "--url", url)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and url in result.stderr


# --------------------------------------------------------------------------- replay


def test_replay_names_missing_files(run: Run) -> None:
    """Files that are not there are named, nothing is created."""
    refused(run("replay", "nope.ndjson"), 2, "no such file: nope.ndjson")
    assert not Path("data").exists()


def test_replay_names_a_data_dir_it_cannot_create(run: Run, tmp_path: Path) -> None:
    """replay may create the data directory; when it cannot, it says which and why."""
    events = tmp_path / "events.ndjson"
    events.write_text("")
    data_dir = uncreatable(tmp_path)
    refused(
        run("replay", str(events), "--data-dir", str(data_dir)),
        1,
        f"replay: cannot create the data directory {data_dir}",
    )


def test_replay_drain_timeout_without_delivery_is_refused(run: Run, tmp_path: Path) -> None:
    """``--drain-timeout`` would be ignored with ``--no-deliver``."""
    events = tmp_path / "events.ndjson"
    events.write_text("")
    outcome = run("replay", str(events), "--no-deliver", "--drain-timeout", "5")
    refused(outcome, 2, "--drain-timeout does not apply with --no-deliver")


@pytest.mark.parametrize("command", ["replay x.ndjson", "backfill --to duckdb", "recover"])
def test_drain_timeout_cannot_be_negative(run: Run, command: str) -> None:
    """A negative drain time is refused by every command that takes one."""
    refused(
        run(*command.split(), "--drain-timeout", "-1"),
        2,
        "argument --drain-timeout: must be 0 or above",
    )


# --------------------------------------------------------------------------- read-only commands


@pytest.mark.parametrize(
    "command", ["export", "dead-letters", "query payments", "recover", "backfill --to duckdb"]
)
def test_commands_that_read_refuse_a_missing_data_dir(
    run: Run, command: str, tmp_path: Path
) -> None:
    """A mistyped ``--data-dir`` is an error naming it; nothing is created."""
    typo = tmp_path / "dta"
    outcome = run(*command.split(), "--data-dir", str(typo))
    refused(outcome, 2, f"data directory {typo} does not exist", "--data-dir")
    assert not typo.exists()


def test_query_refuses_a_data_dir_without_a_store(run: Run, tmp_path: Path) -> None:
    """An existing directory without the store: named, and no empty store is created."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    refused(
        run("query", "payments", "--data-dir", str(data_dir)),
        2,
        f"no store at {data_dir / 'store.duckdb'}",
    )
    assert list(data_dir.iterdir()) == []


def test_export_names_an_output_it_cannot_write(run: Run, tmp_path: Path) -> None:
    """``--output`` in a directory that does not exist is named, exit 2."""
    make_ledger(tmp_path / "data")
    output = tmp_path / "nonexistent" / "dir" / "x.ndjson"
    outcome = run("export", "--output", str(output))
    refused(outcome, 2, f"cannot write --output {output}", "No such file or directory")


def test_export_output_end_to_end(tmp_path: Path) -> None:
    """End to end: ``export --output /nonexistent/dir/x`` prints one line, no traceback."""
    make_ledger(tmp_path / "data")
    result = run_cli(
        "export", "--output", "/nonexistent/dir/x", "--data-dir", str(tmp_path / "data")
    )
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "/nonexistent/dir/x" in result.stderr


@pytest.mark.parametrize("since", ["yesterday", "2026-01-01T00:00:00"])
def test_export_refuses_an_instant_it_cannot_read(run: Run, tmp_path: Path, since: str) -> None:
    """``--since`` that is neither epoch ms nor RFC 3339 with an offset: exit 2."""
    make_ledger(tmp_path / "data")
    refused(run("export", "--since", since), 2, "--since")


# --------------------------------------------------------------------------- dead-letters


def test_dead_letters_reason_must_be_a_real_reason(run: Run, tmp_path: Path) -> None:
    """An unknown reason would match nothing: refused, listing the real ones."""
    make_ledger(tmp_path / "data")
    outcome = run("dead-letters", "--reason", "bogus")
    refused(outcome, 2, "argument --reason: invalid choice: 'bogus'", "'conflict'", "'store'")


def test_dead_letters_accepts_every_real_reason(run: Run, tmp_path: Path) -> None:
    """Each reason the exporter stores is accepted (and none is stored yet)."""
    make_ledger(tmp_path / "data")
    for reason in (
        "invalid",
        "malformed",
        "conflict",
        "too_large",
        "unsupported_media_type",
        "store",
    ):
        outcome = run("dead-letters", "--reason", reason)
        assert (outcome.code, outcome.stderr) == (0, "dead-letters: none\n"), reason


@pytest.mark.parametrize(("option", "value"), [("--limit", "0"), ("--width", "-1")])
def test_dead_letters_refuses_sizes_out_of_range(run: Run, option: str, value: str) -> None:
    """A limit of nothing, a negative width: refused."""
    refused(run("dead-letters", option, value), 2, f"argument {option}: must be")


# --------------------------------------------------------------------------- query


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (("realtime", "--window", "7d"), "--window"),
        (("payments", "--limit", "3"), "--limit"),
        (("health", "--limit", "3"), "--limit"),
        (("top/payers", "--metric", "fees"), "--metric"),
        (("payments", "--url", "http://127.0.0.1:9", "--data-dir", "x"), "--data-dir"),
        (("payments", "--token", "t"), "--token"),
        (("payments", "--timeout", "5"), "--timeout"),
    ],
)
def test_query_refuses_options_it_would_ignore(
    run: Run, argv: tuple[str, ...], option: str
) -> None:
    """An option the analytic (or the way of asking) does not take is refused, exit 2."""
    refused(run("query", *argv), 2, f"{option} does not apply")


def test_query_health_takes_its_window(run: Run, tmp_path: Path) -> None:
    """Health is computed over a window (its error rate): ``--window 7d`` applies."""
    outcome = run("query", "health", "--window", "7d", "--data-dir", str(tmp_path / "data"))
    assert "does not apply" not in outcome.stderr
    refused(outcome, 2, "does not exist")  # refused only for the missing data directory


def test_query_names_an_exporter_it_cannot_reach(run: Run) -> None:
    """``--url`` where nothing listens: exit 1 naming the URL."""
    url = f"http://127.0.0.1:{closed_port()}"
    refused(run("query", "payments", "--url", url), 1, f"cannot reach an exporter at {url}")


def test_query_refuses_a_url_that_is_not_one(run: Run) -> None:
    """``--url`` without a scheme: exit 2 naming it."""
    refused(
        run("query", "payments", "--url", "localhost:9402"),
        2,
        "--url must be an http:// or https:// URL, got 'localhost:9402'",
    )


def test_query_refuses_an_instant_it_cannot_read(run: Run) -> None:
    """``--at`` that is not an instant: exit 2."""
    refused(run("query", "payments", "--at", "noon"), 2, "--at")


# --------------------------------------------------------------------------- flux


def test_flux_names_a_missing_file(run: Run) -> None:
    """``--file`` that is not there: exit 2 naming it."""
    refused(
        run("flux", "--file", "missing.flux"),
        2,
        "cannot read --file missing.flux",
        "No such file or directory",
    )


def test_flux_missing_file_end_to_end() -> None:
    """End to end: the installed command prints the one line, no traceback."""
    result = run_cli("flux", "--file", "missing.flux")
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing.flux" in result.stderr


@pytest.mark.parametrize("argv", [(), ("x", "--file", "q.flux")])
def test_flux_needs_exactly_one_source(run: Run, argv: tuple[str, ...]) -> None:
    """Neither a query nor a file, or both: exit 2."""
    refused(run("flux", *argv), 2, "give either a query or --file")


def test_flux_needs_influxdb(run: Run) -> None:
    """Flux against the embedded store: exit 2 naming the settings to set."""
    refused(run("flux", "x"), 2, "not InfluxDB", "EXPORTER_INFLUX_URL")


def test_flux_needs_the_v2_api(run: Run) -> None:
    """Flux against InfluxDB over the v1 API (1.x runs no Flux): exit 2 saying so."""
    outcome = run(
        "flux", "x", EXPORTER_INFLUX_URL="http://127.0.0.1:8086", EXPORTER_INFLUX_API="v1"
    )
    refused(outcome, 2, "Flux runs on InfluxDB 2.x only", "InfluxQL")


# --------------------------------------------------------------------------- backfill, recover


def test_backfill_to_influxdb_needs_its_settings(run: Run, tmp_path: Path) -> None:
    """``--to influxdb`` without EXPORTER_INFLUX_*: exit 2 naming them."""
    make_ledger(tmp_path / "data")
    refused(run("backfill", "--to", "influxdb"), 2, "EXPORTER_INFLUX_URL")


def test_backfill_names_a_data_dir_without_a_ledger(run: Run, tmp_path: Path) -> None:
    """An existing directory without a ledger: named, nothing created in it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    refused(
        run("backfill", "--to", "duckdb", "--data-dir", str(data_dir)),
        2,
        f"no ledger at {data_dir / 'ledger.sqlite3'}",
    )
    assert list(data_dir.iterdir()) == []


def test_recover_with_nothing_to_recover_creates_nothing(run: Run, tmp_path: Path) -> None:
    """An intact (empty) data directory: nothing to do, exit 0."""
    make_ledger(tmp_path / "data")
    outcome = run("recover")
    assert outcome.code == 0 and "Traceback" not in outcome.stderr
    assert "nothing to do" in outcome.stderr


# --------------------------------------------------------------------------- help


COMMANDS = (
    "serve",
    "check-config",
    "simulate",
    "replay",
    "export",
    "dead-letters",
    "query",
    "flux",
    "backfill",
    "recover",
)

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_cites_only_documents_that_exist(run: Run, command: str) -> None:
    """``--help`` exits 0, and every document it cites is in the repository."""
    outcome = run(*command.split(), "--help")
    assert outcome.code == 0, outcome.stderr
    assert re.search(r"\bD[E]SIGN\b|section \d", outcome.stdout) is None, outcome.stdout
    for cited in re.findall(r"[\w./-]+\.md\b", outcome.stdout):
        assert (REPOSITORY / cited).is_file(), cited
