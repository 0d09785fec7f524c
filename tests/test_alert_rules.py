"""Prometheus alert rules: valid, loaded by prometheus.yml, on real metrics, and each one
unit-tested with ``promtool test rules`` (a case where it fires and one where it stays quiet)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import require_tool
from promql_helpers import unknown_metric_references

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "provisioning" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "facilitator-alerts.yml"
RULE_TESTS = ROOT / "tests" / "fixtures" / "prometheus" / "facilitator-alerts.test.yml"

REQUIRED_ALERTS = {
    "FacilitatorExporterDown": "critical",
    "FacilitatorEventsRejected": "warning",
    "FacilitatorStoreBacklogGrowing": "warning",
    "FacilitatorStoreWritesFailing": "critical",
    "FacilitatorStoreLagHigh": "warning",
    "FacilitatorStoreCredentialsRefused": "critical",
    "FacilitatorStoreRecordsRejected": "warning",
    "FacilitatorAnalyticsRefreshFailing": "warning",
    "FacilitatorAnalyticsStale": "warning",
    "FacilitatorHealthDegraded": "warning",
    "FacilitatorHealthCritical": "critical",
    "FacilitatorErrorRatioHigh": "warning",
    "FacilitatorErrorRatioCritical": "critical",
    "FacilitatorSettlementSlow": "warning",
    "FacilitatorPendingPaymentsStuck": "warning",
    "FacilitatorJoinTimeouts": "warning",
}
"""Every alert the stack must have, with its severity."""


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the rules file."""
    config = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in config["groups"] for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args``."""
    return subprocess.run(
        [require_tool("promtool"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


def test_prometheus_config_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    loaded = {p for pattern in config["rule_files"] for p in PROMETHEUS_DIR.glob(pattern)}
    assert RULES in loaded
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_every_required_alert_exists_with_severity_and_text() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == set(REQUIRED_ALERTS)
    for name, severity in REQUIRED_ALERTS.items():
        assert rules[name]["labels"]["severity"] == severity, name
        assert rules[name]["annotations"]["summary"].strip(), name
        assert rules[name]["annotations"]["description"].strip(), name
        assert rules[name].get("for"), f"{name} fires on a single evaluation"


def test_rules_use_only_metrics_the_exporter_exposes() -> None:
    for rule in alert_rules():
        assert unknown_metric_references(rule["expr"]) == [], rule["alert"]


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    config = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert (RULE_TESTS.parent / config["rule_files"][0]).resolve() == RULES
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in config["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(REQUIRED_ALERTS), f"never fires in a test: {set(REQUIRED_ALERTS) - fires}"
    assert quiet == set(REQUIRED_ALERTS), f"never quiet in a test: {set(REQUIRED_ALERTS) - quiet}"


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    config = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    config["rule_files"] = [str(RULES)]
    first = config["tests"][0]["alert_rule_test"][0]
    first["exp_alerts"] = [{"exp_labels": {"severity": "critical"}}]
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = promtool("test", "rules", str(broken))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
