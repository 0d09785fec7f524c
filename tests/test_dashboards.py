"""Provisioned Grafana dashboards, checked offline.

Each dashboard in ``grafana/dashboards/`` must validate against Grafana's published dashboard
JSON schema (a copy in ``tests/fixtures/grafana/``, see its README for source and licence), use only
data sources provisioned in ``provisioning/grafana/datasources/`` by pinned uid, give every
panel a description and a unit, query only metrics and labels the exporter really exposes
(PromQL, checked by ``promtool check rules`` as generated recording rules) and only the
InfluxDB schema the exporter really writes (Flux, type-checked with Grafana's ``v`` record).
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
from promql_helpers import PROM_IDENTIFIER, exported_metrics, unknown_metric_references

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

VARIABLE_SAMPLES = {"network": "eip155:8453|eip155:84532"}
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


def test_every_panel_has_a_description_a_unit_and_a_pinned_datasource() -> None:
    sources = provisioned_datasources()
    for uid, board in dashboards().items():
        nested = [p for row in board["panels"] for p in row.get("panels", [])]
        ids = [panel["id"] for panel in board["panels"] + nested]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        for panel in panels(board):
            where = f"{uid}/{panel['title']}"
            assert panel.get("description", "").strip(), f"{where}: no description"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert panel["datasource"]["uid"] in sources, f"{where}: unprovisioned datasource"
            assert panel.get("targets"), f"{where}: no query"


def test_every_datasource_reference_is_provisioned_with_its_type() -> None:
    sources = provisioned_datasources()
    assert set(sources.values()) == {"prometheus", "influxdb"}
    for uid, board in dashboards().items():
        text = json.dumps(board)
        assert "${DS_" not in text and "__inputs" not in board, f"{uid}: import placeholders"
        refs = [panel["datasource"] for panel in panels(board)]
        refs += [target["datasource"] for _, target in targets(board)]
        refs += [var["datasource"] for var in board["templating"]["list"] if "datasource" in var]
        for ref in refs:
            assert sources.get(ref["uid"]) == ref["type"], f"{uid}: {ref} is not provisioned"


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
    variable = dashboards()[OVERVIEW_UID]["templating"]["list"][0]
    found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
    assert found is not None, variable["query"]
    metric, label = found.groups()
    assert label in exported_metrics()[metric]


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
    for var in board["templating"]["list"]:
        queries[f"variable {var['name']}"] = substitute(var["query"], board)
    return queries


def test_payments_dashboard_queries_influxdb_over_the_dashboard_range() -> None:
    board = dashboards()[PAYMENTS_UID]
    assert [var["name"] for var in board["templating"]["list"]] == ["network"]
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
        for column in re.findall(r"\br\.(\w+)\s*(?:==|=~|!=)", query):
            assert column.startswith("_") or column in tags, f"{name}: {column} is not a tag"
    assert schema["payment"][0] == {"network", "status"}


def readme_flux_examples() -> dict[str, str]:
    """The Flux blocks of the README's "Dashboards and alerts" section, by position."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Dashboards and alerts\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```flux\n(.*?)```", section, re.S)
    return {f"README example {i}": block for i, block in enumerate(blocks, 1)}


def test_readme_flux_examples_type_check_against_the_schema() -> None:
    examples = readme_flux_examples()
    assert len(examples) >= 3
    schema = influx_schema()
    fields = frozenset().union(*(f for _, f in schema.values()))
    for name, query in examples.items():
        assert set(re.findall(r'_measurement == "(\w+)"', query)) <= set(schema), name
        assert set(re.findall(r'_field == "(\w+)"', query)) <= fields, name
    assert_flux_valid(examples, PARAMS_PREAMBLE)
