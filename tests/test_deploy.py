"""Deployment files: Prometheus config valid, every compose and provisioning variable
documented, the compose file accepted by ``docker-compose config`` and wired for Grafana."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def documented_variables() -> set[str]:
    """The variables .env.example sets."""
    return set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))


def compose() -> dict[str, Any]:
    """docker-compose.yml as data."""
    config = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(config, dict)
    return config


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    config = ROOT / "provisioning" / "prometheus" / "prometheus.yml"
    result = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_compose_variable_is_in_env_example() -> None:
    used = set(VARIABLE.findall((ROOT / "docker-compose.yml").read_text()))
    documented = documented_variables()
    assert used, "docker-compose.yml uses no variables: the pattern is wrong"
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


def test_every_provisioning_variable_is_in_env_example_and_reaches_grafana() -> None:
    files = sorted((ROOT / "provisioning").rglob("*.yml"))
    used = {name for path in files for name in VARIABLE.findall(path.read_text())}
    assert {"INFLUXDB_ORG", "INFLUXDB_BUCKET", "INFLUXDB_TOKEN"} <= used
    assert used <= documented_variables(), f"not in .env.example: {used - documented_variables()}"
    # Grafana expands them from its own environment: compose must pass each one.
    grafana_env = compose()["services"]["grafana"]["environment"]
    assert used <= set(grafana_env), f"not passed to grafana: {used - set(grafana_env)}"


def test_compose_file_is_accepted_by_docker_compose() -> None:
    tool = require_tool("docker-compose")
    result = subprocess.run(
        [
            tool,
            "--project-directory",
            str(ROOT),
            "--file",
            str(ROOT / "docker-compose.yml"),
            "--env-file",
            str(ROOT / ".env.example"),
            "--profile",
            "demo",
            "--profile",
            "test",
            "config",
            "--services",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = set(result.stdout.split())
    assert services == {"influxdb", "exporter", "prometheus", "grafana", "demo", "tests"}


def test_compose_runs_pinned_grafana_11_with_provisioning_and_rules() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:11\.\d+\.\d+", grafana["image"])
    assert "./provisioning/grafana:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD"
    )
    assert all(port.startswith("127.0.0.1:") for port in grafana["ports"])
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert "./provisioning/prometheus/rules:/etc/prometheus/rules:ro" in prometheus["volumes"]
    assert services["influxdb"]["image"] == "influxdb:2.7"


def test_compose_scrapes_the_exporter_service() -> None:
    config = (ROOT / "provisioning" / "prometheus" / "prometheus.yml").read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"^  exporter:$", compose, re.M)
    assert '"exporter:9402"' in config
