"""Provisioned Grafana dashboards, checked offline.

Each dashboard in ``grafana/dashboards/`` must validate against Grafana's published dashboard
JSON schema (a copy in ``tests/fixtures/grafana/``, see its README for source and licence), reach
their data sources only through datasource variables whose defaults are the uids provisioned in
``provisioning/grafana/datasources/`` (so they import into any Grafana and provision unchanged),
select the exporter's scrape job through a ``job`` variable, give every panel a description and a
unit, query only metrics and labels the exporter really exposes (PromQL, checked by ``promtool
check rules`` as generated recording rules) and only the InfluxDB schema the exporter really
writes (Flux, type-checked with Grafana's ``v`` record), over the dashboard's time range only.
Panel titles name only series their queries produce; histograms keep every bin; daily bars
stand at their day's start; money is summed as floats (no int64 wrap); quantiles are exact.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import require_tool
from fluxcheck import GRAFANA_PREAMBLE, PARAMS_PREAMBLE, assert_flux_valid
from promql_helpers import (
    PROM_IDENTIFIER,
    SCRAPE_LABELS,
    exported_metrics,
    unknown_metric_references,
)

from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
)
from exporter.store.influx.store import point_line

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
DATASOURCES = ROOT / "provisioning" / "grafana" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDER = ROOT / "provisioning" / "grafana" / "dashboards" / "dashboards.yml"
SCHEMA = ROOT / "tests" / "fixtures" / "grafana" / "dashboard.jsonschema.json"

OVERVIEW_UID = "facilitator-overview"
PAYMENTS_UID = "facilitator-payments"

SCHEMA_ADDITIONS: dict[str, dict[str, Any]] = {
    "VariableModel": {"includeAll": {"type": "boolean"}, "allValue": {"type": "string"}},
}
"""Properties Grafana 11 has that the stored schema build lacks (present in the same project's
Grafana 11.6 TypeScript types, ``VariableModel.includeAll`` / ``allValue``); nothing else is
loosened."""

GRAFANA_MACROS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
"""Grafana's interval macros, as values a query would get on a one-hour dashboard."""

VARIABLE_SAMPLES = {"network": "eip155:8453|eip155:84532", "job": "facilitator-exporter"}
"""A value of each dashboard variable as Grafana substitutes it: several networks selected
(``${network:regex}`` and ``=~"$network"`` both receive an alternation)."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``."""
    value = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(value, dict), path
    return value


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``."""
    value = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(value, dict), path
    return value


def dashboards() -> dict[str, dict[str, Any]]:
    """Every provisioned dashboard, by uid."""
    found = [load_json(path) for path in sorted(DASHBOARD_DIR.glob("*.json"))]
    return {str(board["uid"]): board for board in found}


def panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of ``board`` that shows data (rows' children included, rows themselves not)."""
    for panel in board.get("panels", []):
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def targets(board: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (panel, query target) pair of ``board``."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield panel, target


def provisioned_datasources() -> dict[str, str]:
    """Provisioned data source uid -> plugin type."""
    config = load_yaml(DATASOURCES)
    return {str(ds["uid"]): str(ds["type"]) for ds in config["datasources"]}


def substitute(query: str, board: Mapping[str, Any]) -> str:
    """``query`` with Grafana's macros and the dashboard's variables replaced by sample values."""
    declared = {var["name"] for var in board["templating"]["list"]}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        if name in GRAFANA_MACROS:
            return GRAFANA_MACROS[name]
        assert name in declared, f"{board['uid']}: ${name} is not a variable of the dashboard"
        assert name in VARIABLE_SAMPLES, f"no sample value for ${name}"
        return VARIABLE_SAMPLES[name]

    return _VARIABLE.sub(value, query)


def datasource_variables(board: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The dashboard's datasource variables: name -> (plugin type, default uid)."""
    return {
        str(var["name"]): (str(var["query"]), str(var["current"]["value"]))
        for var in board["templating"]["list"]
        if var["type"] == "datasource"
    }


def query_variables(board: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The dashboard's query variables, by name."""
    return {str(var["name"]): var for var in board["templating"]["list"] if var["type"] == "query"}


def resolve(ref: Mapping[str, Any], board: Mapping[str, Any]) -> tuple[str, str]:
    """(type, default uid) a datasource reference resolves to; it must name a variable."""
    found = re.fullmatch(r"\$\{(\w+)\}", str(ref["uid"]))
    assert found, f"{board['uid']}: {ref} pins a uid instead of a datasource variable"
    variables = datasource_variables(board)
    assert found[1] in variables, f"{board['uid']}: {ref} names no datasource variable"
    plugin, uid = variables[found[1]]
    assert plugin == ref["type"], f"{board['uid']}: {ref} is a {plugin} variable"
    return plugin, uid


def grafana_schema() -> dict[str, Any]:
    """The stored Grafana dashboard schema with :data:`SCHEMA_ADDITIONS` applied."""
    schema = load_json(SCHEMA)
    extended = copy.deepcopy(schema)
    for definition, extra in SCHEMA_ADDITIONS.items():
        properties = extended["definitions"][definition]["properties"]
        assert not set(extra) & set(properties), f"{definition} already has {set(extra)}"
        properties.update(extra)
    return extended


def influx_schema() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Measurement -> (tag keys, field keys) as the exporter writes them (every field set)."""
    records: list[StoreRecord] = [
        PaymentRecord("k", 0, "n", "settled", "p", "a", "b", 1, 1, 1.5, 1.5, "t", "e"),
        BatchRecord("k", 0, "n", "settled", "b", 2, 1, 1, 1, "t"),
        RevenueRecord("k", 0, "n", "premium", 1, "p"),
        WebsocketRecord("k", 0, 1),
    ]
    schema: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for record in records:
        series, fields, _ = point_line(record).split(" ")
        measurement, *tags = series.split(",")
        tag_keys = frozenset(tag.split("=")[0] for tag in tags)
        field_keys = frozenset(field.split("=")[0] for field in fields.split(","))
        schema[measurement] = (tag_keys, field_keys)
    return schema


# ------------------------------------------------------------------------------ the files


def test_both_dashboards_are_provisioned_from_the_mounted_directory() -> None:
    boards = dashboards()
    assert {OVERVIEW_UID, PAYMENTS_UID} <= set(boards)
    provider = load_yaml(DASHBOARD_PROVIDER)["providers"]
    assert [p["type"] for p in provider] == ["file"]
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    mount = f"./grafana/dashboards:{provider[0]['options']['path']}:ro"
    assert mount in compose, "the compose file does not mount the dashboards the provider reads"


def test_dashboards_validate_against_grafanas_schema() -> None:
    schema = grafana_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for uid, board in dashboards().items():
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(board)
        ]
        assert not errors, f"{uid}:\n" + "\n".join(errors)


def test_schema_check_rejects_a_broken_dashboard() -> None:
    board = copy.deepcopy(dashboards()[OVERVIEW_UID])
    next(panels(board))["gridPos"]["w"] = 30  # wider than Grafana's 24 columns
    assert not jsonschema.Draft7Validator(grafana_schema()).is_valid(board)


def test_every_panel_has_a_description_a_unit_and_a_datasource_variable() -> None:
    for uid, board in dashboards().items():
        nested = [p for row in board["panels"] for p in row.get("panels", [])]
        ids = [panel["id"] for panel in board["panels"] + nested]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        for panel in panels(board):
            where = f"{uid}/{panel['title']}"
            assert panel.get("description", "").strip(), f"{where}: no description"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            resolve(panel["datasource"], board)
            assert panel.get("targets"), f"{where}: no query"


def test_every_datasource_reference_is_a_variable_defaulting_to_the_provisioned_uid() -> None:
    """Imported into any Grafana the dashboards ask for a data source of each type; under the
    compose provisioning they open on the provisioned ones without a question."""
    sources = provisioned_datasources()
    assert set(sources.values()) == {"prometheus", "influxdb"}
    for uid, board in dashboards().items():
        text = json.dumps(board)
        assert "${DS_" not in text and "__inputs" not in board, f"{uid}: import placeholders"
        for provisioned in sources:
            assert text.count(provisioned) <= 1, f"{uid}: {provisioned} pinned outside a default"
        refs = [panel["datasource"] for panel in panels(board)]
        refs += [target["datasource"] for _, target in targets(board)]
        refs += [var["datasource"] for var in query_variables(board).values()]
        for ref in refs:
            plugin, default = resolve(ref, board)
            assert sources.get(default) == plugin, f"{uid}: {ref} defaults to {default}"
        types = {plugin for plugin, _ in datasource_variables(board).values()}
        assert len(types) == len(datasource_variables(board)), f"{uid}: two variables per type"


def test_a_pinned_datasource_uid_is_refused() -> None:
    board = copy.deepcopy(dashboards()[OVERVIEW_UID])
    with pytest.raises(AssertionError, match="pins a uid"):
        resolve({"type": "prometheus", "uid": "x402-prometheus"}, board)
    with pytest.raises(AssertionError, match="is a prometheus variable"):
        resolve({"type": "influxdb", "uid": "${prometheus}"}, board)


def test_influxdb_datasource_is_flux_with_credentials_from_the_environment() -> None:
    config = load_yaml(DATASOURCES)
    influx = next(ds for ds in config["datasources"] if ds["type"] == "influxdb")
    assert influx["jsonData"]["version"] == "Flux"
    assert influx["jsonData"]["organization"] == "${INFLUXDB_ORG}"
    assert influx["jsonData"]["defaultBucket"] == "${INFLUXDB_BUCKET}"
    assert influx["secureJsonData"]["token"] == "${INFLUXDB_TOKEN}"


def test_dashboards_have_time_range_and_refresh_defaults() -> None:
    for uid, board in dashboards().items():
        assert board["time"]["from"].startswith("now-") and board["time"]["to"] == "now", uid
        assert re.fullmatch(r"\d+[smh]", board["refresh"]), uid
        assert board["refresh"] in board["timepicker"]["refresh_intervals"], uid


def test_variable_substitution_refuses_undeclared_variables() -> None:
    board = dashboards()[OVERVIEW_UID]
    assert substitute('x{network=~"$network"}[$__rate_interval]', board) == (
        'x{network=~"eip155:8453|eip155:84532"}[1m]'
    )
    with pytest.raises(AssertionError, match="not a variable"):
        substitute('x{chain="$chain"}', board)


# ------------------------------------------------------------------- overview (PromQL)


def overview_promql() -> dict[str, str]:
    """Every PromQL expression of the overview dashboard, substituted, by panel and refId."""
    board = dashboards()[OVERVIEW_UID]
    return {
        f"p{panel['id']}_{target['refId']}": substitute(target["expr"], board)
        for panel, target in targets(board)
    }


def test_overview_queries_prometheus_only() -> None:
    board = dashboards()[OVERVIEW_UID]
    for panel, target in targets(board):
        assert target["datasource"]["type"] == "prometheus", panel["title"]
        assert target.get("expr"), panel["title"]


def test_overview_uses_only_metrics_and_labels_the_exporter_exposes() -> None:
    exprs = overview_promql()
    problems = {name: unknown_metric_references(expr) for name, expr in exprs.items()}
    assert not {name: found for name, found in problems.items() if found}
    used = {n for expr in exprs.values() for n in PROM_IDENTIFIER.findall(expr)}
    for wanted in (
        "facilitator_payments_total",
        "facilitator_settlement_duration_seconds_bucket",
        "facilitator_revenue_projected_monthly_usd",
        "facilitator_health_status",
        "exporter_analytics_last_success_timestamp_seconds",
        "exporter_store_write_errors_total",
        "exporter_ledger_backlog_events",
        "exporter_events_rejected_total",
    ):
        assert wanted in used, f"the overview does not show {wanted}"
    for name, variable in query_variables(dashboards()[OVERVIEW_UID]).items():
        found = re.fullmatch(r'label_values\((\w+)(?:\{job="\$job"\})?, (\w+)\)', variable["query"])
        assert found is not None, variable["query"]
        metric, label = found.groups()
        assert label == name and label in exported_metrics()[metric] | SCRAPE_LABELS, name


def test_overview_selects_the_exporter_job_through_a_variable() -> None:
    """Every series the overview reads is selected by ``job="$job"``, never a fixed job name,
    so the dashboard works under whatever job name a Prometheus scrapes the exporter."""
    board = dashboards()[OVERVIEW_UID]
    job = query_variables(board)["job"]
    assert job["current"]["value"] == "facilitator-exporter" and not job["multi"]
    scrape = load_yaml(ROOT / "provisioning" / "prometheus" / "prometheus.yml")
    assert job["current"]["value"] in [c["job_name"] for c in scrape["scrape_configs"]]
    exprs = [t["expr"] for _, t in targets(board)]
    exprs += [v["query"] for n, v in query_variables(board).items() if n != "job"]
    for expr in exprs:
        assert "facilitator-exporter" not in expr, expr
        for metric in PROM_IDENTIFIER.findall(expr):
            selectors = re.findall(rf"\b{metric}\{{([^}}]*)\}}", expr)
            assert selectors and all('job="$job"' in m for m in selectors), (metric, expr)


def test_metric_reference_check_catches_made_up_names() -> None:
    assert unknown_metric_references("rate(facilitator_payments_total[5m])") == []
    assert unknown_metric_references("rate(facilitator_payment_total[5m])") == [
        "metric facilitator_payment_total"
    ]
    assert unknown_metric_references('facilitator_pending_payments{chain="x"}') == [
        "label facilitator_pending_payments{chain}"
    ]
    assert unknown_metric_references("sum by (chain) (exporter_ledger_backlog_events)") == [
        "grouping label chain"
    ]


def promtool_check_rules(
    rules: Mapping[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``promtool check rules`` on ``rules`` (record name -> expr) as one rule group."""
    promtool = require_tool("promtool")
    group = {
        "name": "dashboard-promql",
        "rules": [{"record": f"dashboard:{n}", "expr": e} for n, e in rules.items()],
    }
    path = tmp_path / "dashboard-promql.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False), encoding="utf-8")
    return subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_overview_promql_passes_promtool(tmp_path: Path) -> None:
    exprs = overview_promql()
    result = promtool_check_rules(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_promtool_check_rejects_broken_promql(tmp_path: Path) -> None:
    result = promtool_check_rules({"broken": "sum by (network (rate(x[1m]))"}, tmp_path)
    assert result.returncode != 0


# -------------------------------------------------------------------- payments (Flux)


def payments_flux() -> dict[str, str]:
    """Every Flux query of the payments dashboard (variable query included), substituted."""
    board = dashboards()[PAYMENTS_UID]
    queries = {
        f"{panel['title']}/{target['refId']}": substitute(target["query"], board)
        for panel, target in targets(board)
    }
    for name, var in query_variables(board).items():
        queries[f"variable {name}"] = substitute(var["query"], board)
    return queries


def test_payments_dashboard_queries_influxdb_over_the_dashboard_range() -> None:
    board = dashboards()[PAYMENTS_UID]
    assert [var["name"] for var in board["templating"]["list"]] == ["influxdb", "network"]
    for panel, target in targets(board):
        query = target["query"]
        assert target["datasource"]["type"] == "influxdb", panel["title"]
        assert "range(start: v.timeRangeStart, stop: v.timeRangeStop)" in query, panel["title"]
        assert "${network:regex}" in query, f"{panel['title']}: ignores the network variable"
        if panel["type"] == "timeseries":
            assert "every: v.windowPeriod" in query or "every: 1d" in query, panel["title"]
    windowed = [t for _, t in targets(board) if "every: v.windowPeriod" in t["query"]]
    assert len(windowed) >= 3, "volume, fees and payments over time use v.windowPeriod"


def test_payments_flux_type_checks_with_grafanas_v_record() -> None:
    queries = payments_flux()
    assert len(queries) >= 12
    assert_flux_valid(queries, GRAFANA_PREAMBLE)


def test_payments_flux_uses_the_schema_the_exporter_writes() -> None:
    schema = influx_schema()
    tags = frozenset().union(*(t for t, _ in schema.values()))
    fields = frozenset().union(*(f for _, f in schema.values()))
    for name, query in payments_flux().items():
        for measurement in re.findall(r'_measurement == "(\w+)"', query):
            assert measurement in schema, f"{name}: no measurement {measurement}"
        for field in re.findall(r'_field == "(\w+)"', query):
            assert field in fields, f"{name}: no field {field}"
        made = {"le"} if "histogram(" in query else set()  # histogram()'s upper bound column
        for column in re.findall(r"\br\.(\w+)\s*(?:==|=~|!=)", query):
            assert column.startswith("_") or column in tags | made, f"{name}: {column} is not a tag"
    assert schema["payment"][0] == {"network", "status"}


def readme_flux_examples() -> dict[str, str]:
    """The Flux blocks of the "Dashboards and alerts" section of docs/operations.md."""
    readme = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = readme.split("\n## Dashboards and alerts\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```flux\n(.*?)```", section, re.S)
    return {f"docs/operations.md example {i}": block for i, block in enumerate(blocks, 1)}


def test_readme_flux_examples_type_check_against_the_schema() -> None:
    examples = readme_flux_examples()
    assert len(examples) >= 3
    schema = influx_schema()
    fields = frozenset().union(*(f for _, f in schema.values()))
    for name, query in examples.items():
        assert set(re.findall(r'_measurement == "(\w+)"', query)) <= set(schema), name
        assert set(re.findall(r'_field == "(\w+)"', query)) <= fields, name
    assert_flux_valid(examples, PARAMS_PREAMBLE)


# ------------------------------------------------------------- what the panels claim

TITLE_SERIES: dict[str, str] = {
    "p50": r"quantile\(0\.5\b|quantile\(q: 0\.5\b",
    "median": r"quantile\(0\.5\b|quantile\(q: 0\.5\b",
    "p95": r"quantile\(0\.95\b|_p95_",
    "p99": r"quantile\(0\.99\b|_p99_",
    "error ratio": r"_error_ratio\b|status=\"failed\"",
    "success ratio": r"status=\"success\"",
    "backlog": r"_backlog_",
    "lag": r"_lag_seconds\b",
    "staleness": r"_last_success_timestamp_seconds\b",
    "volume": r"_volume_|\"amount_micro\"",
    "fees": r"_fees_|\"fee_micro\"",
    "revenue": r"_revenue_|\"fee_micro\"",
    "growth": r"_growth_",
    "pending": r"_pending_",
    "gas": r"_gas_|\"gas_used\"",
    "websocket": r"_websocket_",
    "health": r"_health_",
    "rejected": r"_rejected_",
    "write errors": r"_write_errors_",
    "failure": r"status == \"failed\"",
}
"""Words a panel title may use, each with what a query must read for the panel to show it."""


def title_claims(title: str, queries: list[str]) -> list[str]:
    """The series words of ``title`` that none of ``queries`` produces."""
    text = "\n".join(queries)
    lowered = title.lower()
    return [
        word
        for word, pattern in TITLE_SERIES.items()
        if re.search(rf"\b{word}\b", lowered) and not re.search(pattern, text)
    ]


def flux_queries(board: Mapping[str, Any]) -> dict[str, str]:
    """Every Flux query of ``board`` by panel title and refId (unsubstituted)."""
    return {
        f"{panel['title']}/{target['refId']}": target["query"]
        for panel, target in targets(board)
        if "query" in target
    }


def all_dashboard_flux() -> dict[str, str]:
    """Every Flux query of every dashboard."""
    return {f"{uid}: {n}": q for uid, b in dashboards().items() for n, q in flux_queries(b).items()}


def test_panel_titles_name_only_series_their_targets_produce() -> None:
    for uid, board in dashboards().items():
        for panel in panels(board):
            queries = [t.get("expr") or t.get("query") or "" for t in panel["targets"]]
            missing = title_claims(panel["title"], queries)
            assert not missing, f"{uid}/{panel['title']}: no query produces {missing}"


def test_title_check_catches_a_series_no_target_produces() -> None:
    assert title_claims("Store backlog and lag", ["max(exporter_ledger_backlog_events)"]) == ["lag"]
    assert title_claims("Error ratio and settlement p95", ["facilitator_error_ratio"]) == ["p95"]
    assert title_claims("Store backlog", ["max(exporter_ledger_backlog_events)"]) == []


def test_dashboard_flux_reads_only_the_dashboard_time_range() -> None:
    """No panel reads history beyond the range Grafana asks for."""
    for name, query in all_dashboard_flux().items():
        ranges = re.findall(r"range\(([^)]*)\)", query)
        assert ranges, name
        assert set(ranges) == {"start: v.timeRangeStart, stop: v.timeRangeStop"}, (name, ranges)


def test_every_histogram_has_an_infinite_bin_and_keeps_its_first_bin() -> None:
    """histogram() counts cumulatively and drops values above its last bound; difference()
    turns the cumulative counts into per-bin counts but leaves the first row null."""
    histograms = {n: q for n, q in all_dashboard_flux().items() if "histogram(" in q}
    assert histograms, "the payment size distribution is a histogram"
    for name, query in histograms.items():
        bins = re.search(r"histogram\(bins: \[([^\]]*)\]", query)
        assert bins and bins[1].split(", ")[-1] == 'float(v: "+Inf")', f"{name}: no +Inf bin"
        if "difference(" in query:
            kept = re.search(r'duplicate\(column: "_value", as: "(\w+)"\)\s*\|> difference', query)
            assert kept, f"{name}: the first bin's cumulative count is lost to difference()"
            fallback = rf"if exists r\._value then r\._value else r\.{kept[1]}\b"
            assert re.search(fallback, query), f"{name}: the first bin does not use {kept[1]}"
            assert "else 0" not in query, f"{name}: a null bin is drawn as 0"


def test_every_aggregate_window_stamps_each_window_at_its_start() -> None:
    """aggregateWindow() stamps a window with its _stop by default: a day would be drawn at the
    next midnight and the last bar at now. Daily bars also stand at their UTC midnight (the
    first window starts at the range start)."""
    windowed = 0
    for name, query in all_dashboard_flux().items():
        for call in re.findall(r"aggregateWindow\(([^)]*)\)", query):
            windowed += 1
            assert 'timeSrc: "_start"' in call, f"{name}: {call}"
            if "every: 1d" in call:
                assert "date.truncate(t: r._time, unit: 1d)" in query, name
    assert windowed >= 4


def test_revenue_by_day_counts_fees_as_the_api_does_and_says_so() -> None:
    board = dashboards()[PAYMENTS_UID]
    [panel] = [p for p in panels(board) if "by day" in p["title"].lower()]
    [target] = panel["targets"]
    fields = set(re.findall(r'_field == "(\w+)"', target["query"]))
    measurements = set(re.findall(r'_measurement == "(\w+)"', target["query"]))
    assert fields == {"fee_micro"} and measurements == {"payment"}, target["query"]
    assert 'r.status == "settled"' in target["query"]
    assert "revenueByDay" in panel["description"] and "fees" in panel["description"]
    assert "not included" in panel["description"], "say what the panel leaves out"


def test_quantiles_are_nearest_rank_as_the_api_computes_them() -> None:
    """quantile() defaults to a t-digest estimate; exact_selector returns the value at
    index ceil(q * n) - 1 of the sorted values, which is the contract's nearest rank."""
    for name, query in all_dashboard_flux().items():
        for call in re.findall(r"quantile\(([^)]*)\)", query):
            assert 'method: "exact_selector"' in call, f"{name}: {call}"
    for uid, board in dashboards().items():
        for panel in panels(board):
            if "median" in (panel["title"] + panel["description"]).lower():
                honest = ("nearest-rank", "estimated")
                assert any(w in panel["description"] for w in honest), f"{uid}/{panel['title']}"


def test_dashboard_money_is_summed_as_floats() -> None:
    """An int64 sum of micro-units wraps silently past 2^63 (9.2 trillion units); a float sum
    does not wrap (it rounds beyond 2^53 micro-units, 9 billion units)."""
    aggregates = re.compile(r"\b(?:sum|reduce|aggregateWindow|mean|top)\(")
    for name, query in all_dashboard_flux().items():
        if not re.search(r'_field == "\w+_micro"', query):
            continue
        first = aggregates.search(query)
        if first is None:
            continue
        converted = query.find("float(v: r.")
        assert 0 <= converted < first.start() or re.search(
            r"reduce\([^|]*float\(v: r\.\w+_micro\)", query, re.S
        ), f"{name}: integer micro-units reach an aggregate"
