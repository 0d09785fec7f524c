"""Deployment files: Prometheus config valid, every compose and provisioning variable
documented, the compose file accepted by ``docker-compose config`` and wired for Grafana,
and the image built from a lock file that pins every runtime dependency with hashes."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml
from conftest import require_tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def runtime_requirements() -> list[Requirement]:
    """The ``[project] dependencies`` of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def lock_pins() -> dict[str, tuple[str, int]]:
    """requirements.lock as {canonical name: (pinned version, number of hashes)}."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, int]] = {}
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)(.*)", line)
        if match:
            name, version, rest = match.groups()
            pins[canonicalize_name(name)] = (version, rest.count("--hash=sha256:"))
    return pins


def runtime_closure() -> set[str]:
    """Every distribution the installed runtime dependencies need, with their extras."""
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(canonicalize_name(r.name), frozenset(r.extras)) for r in runtime_requirements()]
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            markers = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(m) for m in markers):
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return {name for name, _ in seen}


def test_the_lock_pins_every_declared_dependency_within_its_range() -> None:
    pins = lock_pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock: regenerate it (README.md)"
        version = pins[name][0]
        assert requirement.specifier.contains(version), f"lock pins {name}=={version}"


def test_the_lock_covers_every_runtime_dependency_with_hashes() -> None:
    pins = lock_pins()
    missing = runtime_closure() - set(pins)
    assert not missing, f"not in requirements.lock (regenerate it, README.md): {sorted(missing)}"
    unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"pinned without a hash: {unhashed}"


def test_the_lock_names_no_local_index() -> None:
    text = (ROOT / "requirements.lock").read_text()
    assert not re.search(r"^--(extra-)?index-url|^--find-links|file://", text, re.M)


def test_duckdb_is_pinned_to_one_major_version_and_apscheduler_below_4() -> None:
    by_name = {str(canonicalize_name(r.name)): r.specifier for r in runtime_requirements()}
    duckdb = by_name["duckdb"]
    majors = {v.split(".")[0] for v in ("1.9.9", "2.0.0", "2.99.0", "3.0.0") if duckdb.contains(v)}
    assert len(majors) == 1, f"duckdb {duckdb} spans file formats of several major versions"
    assert by_name["apscheduler"].contains("3.11.3")
    assert not by_name["apscheduler"].contains("4.0.0")


def test_the_image_installs_the_lock_with_hashes_then_the_package_alone() -> None:
    steps = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith(("RUN pip", "COPY"))
    ]
    runtime = steps[: steps.index("RUN pip install --no-deps .") + 1]
    assert "RUN pip install --require-hashes -r requirements.lock" in runtime
    assert runtime.index("COPY requirements.lock ./") < runtime.index(
        "RUN pip install --require-hashes -r requirements.lock"
    )
    assert [step for step in runtime if step.startswith("RUN pip")] == [
        "RUN pip install --require-hashes -r requirements.lock",
        "RUN pip install --no-deps .",
    ]
