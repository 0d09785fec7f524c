"""Deployment files: Prometheus config valid, every compose variable documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent


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
    compose = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", compose))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used, "docker-compose.yml uses no variables: the pattern is wrong"
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


def test_compose_scrapes_the_exporter_service() -> None:
    config = (ROOT / "provisioning" / "prometheus" / "prometheus.yml").read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"^  exporter:$", compose, re.M)
    assert '"exporter:9402"' in config
