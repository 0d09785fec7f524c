"""The Flux checker: valid queries pass, each class of mistake fails with a message naming it,
line numbers are the query's own, and it cannot be silently skipped in CI."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import fluxcheck
import pytest
from fluxcheck import (
    GRAFANA_PREAMBLE,
    PARAMS_PREAMBLE,
    assert_flux_valid,
    check_flux,
    collect_flux,
)

FEES_BY_NETWORK = """\
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "fee_micro")
    |> group(columns: ["network"])
    |> sum()
"""

VALID_PARAMS_QUERIES = {
    "fees_by_network": FEES_BY_NETWORK,
    "settlement_p95": """\
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r._field == "settlement_ms")
    |> filter(fn: (r) => r.network == params.network)
    |> group()
    |> quantile(q: 0.95, method: "estimate_tdigest")
""",
    "volume_per_window": """\
import "date"

from(bucket: params.bucket)
    |> range(start: date.truncate(t: params.start, unit: 1d), stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "amount_micro")
    |> aggregateWindow(every: params.every, fn: sum, createEmpty: false)
""",
    "top_payers": """\
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "amount_micro" or r._field == "payer")
    |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
    |> group(columns: ["payer"])
    |> sum(column: "amount_micro")
    |> group()
    |> top(n: params.limit, columns: ["amount_micro"])
""",
    "relative_range": 'from(bucket: "payments") |> range(start: -1h) |> count()',
    "since_epoch": "from(bucket: params.bucket) |> range(start: 0) |> count()",
}

GRAFANA_PANEL = """\
from(bucket: v.defaultBucket)
    |> range(start: v.timeRangeStart, stop: v.timeRangeStop)
    |> filter(fn: (r) => r._measurement == "payment" and r._field == "fee_micro")
    |> aggregateWindow(every: v.windowPeriod, fn: sum, createEmpty: false)
    |> yield(name: "fees")
"""

BASE = "from(bucket: params.bucket)\n    |> range(start: params.start, stop: params.stop)\n"

BROKEN: dict[str, tuple[str, str]] = {
    # name: (query, a substring the error must contain)
    "unknown function": (BASE + "    |> rnage(start: -1h)\n", "undefined identifier rnage"),
    "unknown aggregate fn": (
        BASE + "    |> aggregateWindow(every: 1h, fn: summ)\n",
        "undefined identifier summ",
    ),
    "unknown parameter": (
        'from(bucket: "payments") |> range(begin: -1h)',
        "unexpected argument begin",
    ),
    "missing parameter": ('from(bucket: "payments") |> range()', "missing required argument start"),
    "string for duration": (
        BASE + '    |> aggregateWindow(every: "1h", fn: sum)\n',
        "expected duration but found string (argument every)",
    ),
    "string for range start": (
        'from(bucket: "payments") |> range(start: "yesterday")',
        "string is not Timeable (argument start of range)",
    ),
    "string for range stop": (
        'from(bucket: "payments") |> range(start: -1h, stop: "now")',
        "string is not Timeable (argument stop of range)",
    ),
    "string through a function into range": (
        'f = (s) => from(bucket: "payments") |> range(start: s)\nf(s: "yesterday")',
        "string is not Timeable (argument s)",
    ),
    "bool for int": (BASE + "    |> limit(n: true)\n", "expected int but found bool (argument n)"),
    "syntax error": (
        BASE + '    |> filter(fn: (r) => r._field == "fee_micro"\n',
        "expected RPAREN",
    ),
    "syntax error in an expression": (
        BASE + "    |> filter(fn: (r) => r._value > )\n",
        "invalid token for primary expression",
    ),
    "unknown import": ('import "nosuch"\n\n' + BASE, "invalid import path nosuch"),
    "unknown package member": (
        'import "strings"\n\nx = strings.toUpperr(v: "a")\n',
        "missing label toUpperr",
    ),
    "undeclared params field": (
        'from(bucket: "payments") |> range(start: params.nope)',
        "record is missing label nope",
    ),
    "params field of the wrong type in range": (
        'from(bucket: "payments") |> range(start: params.network)',
        "string is not Timeable (argument start of range)",
    ),
    "params field of the wrong type": (
        BASE + "    |> aggregateWindow(every: params.start, fn: sum)\n",
        "expected duration but found time (argument every)",
    ),
}


def test_valid_queries_pass() -> None:
    """Realistic queries over the schema, parameterised through ``params``, have no errors."""
    assert check_flux(VALID_PARAMS_QUERIES) == {name: [] for name in VALID_PARAMS_QUERIES}
    assert_flux_valid(VALID_PARAMS_QUERIES)


@pytest.fixture(scope="module")
def checked() -> dict[str, list[str]]:
    """The valid and the broken queries, checked together in one run."""
    broken = {name: query for name, (query, _) in BROKEN.items()}
    return check_flux({**VALID_PARAMS_QUERIES, **broken})


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_query_fails_naming_the_problem(name: str, checked: dict[str, list[str]]) -> None:
    """Each class of mistake is an error whose message names it."""
    expected = BROKEN[name][1]
    assert any(expected in error for error in checked[name]), checked[name]


def test_one_run_checks_each_query_on_its_own(checked: dict[str, list[str]]) -> None:
    """In one run valid queries stay valid among broken ones, and only broken ones fail."""
    assert {name for name, errs in checked.items() if errs} == set(BROKEN)


def test_thirty_queries_take_a_moment() -> None:
    """Node start and WASM load are paid once per run, not per query."""
    queries = {f"q{i}": FEES_BY_NETWORK.replace("sum()", f"limit(n: {i + 1})") for i in range(30)}
    started = time.monotonic()
    assert check_flux(queries) == {name: [] for name in queries}
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"checking {len(queries)} queries took {elapsed:.1f}s"


def test_params_must_be_declared() -> None:
    """Without the preamble ``params`` is undefined: the preamble is what makes it pass."""
    assert check_flux({"q": FEES_BY_NETWORK}, preamble="")["q"] == [
        "line 1, column 14: undefined identifier params",
        "line 2, column 21: undefined identifier params",
        "line 2, column 41: undefined identifier params",
    ]


def test_grafana_panels_use_the_v_record() -> None:
    """Grafana's ``v`` record type-checks with its preamble and not with ``params``."""
    assert check_flux({"panel": GRAFANA_PANEL}, GRAFANA_PREAMBLE) == {"panel": []}
    without_v = check_flux({"panel": GRAFANA_PANEL}, PARAMS_PREAMBLE)["panel"]
    assert "line 1, column 14: undefined identifier v" in without_v
    wrong = GRAFANA_PANEL.replace("v.windowPeriod", "v.defaultBucket")
    assert check_flux({"panel": wrong}, GRAFANA_PREAMBLE)["panel"] == [
        "line 4, column 31: expected duration but found string (argument every)"
    ]


def test_line_numbers_are_the_querys_own() -> None:
    """The preamble, inserted after the imports, shifts no reported line or column."""
    plain = BASE + "    |> aggregateWindow(every: 1h, fn: summ)\n"
    with_imports = 'import "date"\nimport "strings"\n' + plain
    errors = check_flux({"plain": plain, "with_imports": with_imports})
    assert errors == {
        "plain": ["line 3, column 39: undefined identifier summ"],
        "with_imports": ["line 5, column 39: undefined identifier summ"],
    }
    range_error = check_flux({"q": 'import "date"\n\nfrom(bucket: "p")\n  |> range(start: "x")'})
    assert range_error == {
        "q": [
            "line 4, column 19: string is not Timeable (argument start of range): "
            "range() start and stop need a time or a duration"
        ]
    }


def test_a_broken_preamble_is_reported_as_such() -> None:
    """An error in the preamble is reported as the preamble's, before what it breaks."""
    unclosed = "params = {start: 2026-01-01T00:00:00Z"
    errors = check_flux({"q": FEES_BY_NETWORK}, preamble=unclosed)["q"]
    assert errors[0] == "preamble line 1: expected RBRACE, got EOF", errors


def test_assert_flux_valid_lists_every_error() -> None:
    """The assertion helper names each invalid query and its errors."""
    with pytest.raises(AssertionError) as raised:
        assert_flux_valid({"ok": FEES_BY_NETWORK, "bad": BROKEN["unknown function"][0]})
    expected = "1 invalid Flux query:\nbad:\n  line 3, column 8: undefined identifier rnage"
    assert expected in str(raised.value)


def test_collect_flux_reads_a_directory(tmp_path: Path) -> None:
    """Every ``*.flux`` file under a directory is collected by relative path and can be checked."""
    (tmp_path / "analytics").mkdir()
    (tmp_path / "fees.flux").write_text(FEES_BY_NETWORK, encoding="utf-8")
    broken = BROKEN["unknown aggregate fn"][0]
    (tmp_path / "analytics" / "broken.flux").write_text(broken, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not flux", encoding="utf-8")
    queries = collect_flux(tmp_path)
    assert queries == {
        "analytics/broken.flux": broken,
        "fees.flux": FEES_BY_NETWORK,
    }
    assert check_flux(queries) == {
        "analytics/broken.flux": ["line 3, column 39: undefined identifier summ"],
        "fees.flux": [],
    }


def test_no_queries_need_no_node() -> None:
    """Nothing to check is an empty answer."""
    assert check_flux({}) == {}


@pytest.mark.parametrize("missing", ["node", "package"])
def test_missing_checker_skips_locally_and_fails_in_ci(
    missing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without Node or the npm package: skip with how to install, but fail under CI."""
    if missing == "node":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        monkeypatch.setattr(fluxcheck, "PACKAGE_DIR", tmp_path / "absent")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"npm ci --prefix tests/flux"):
        check_flux({"q": FEES_BY_NETWORK})
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI must run this test"):
        check_flux({"q": FEES_BY_NETWORK})
