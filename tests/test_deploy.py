"""Deployment files: Prometheus config valid, every compose and provisioning variable
documented, the compose file accepted by ``docker-compose config`` and wired for Grafana, and
run as an operator needs it on day 90: state in named volumes, restarts, required secrets kept
off every command line, open-file limits, health checks that follow the configured port; and
the image built from a lock file that pins every runtime dependency with hashes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from _exporter_process import run_cli
from conftest import require_tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from exporter.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
"""A compose (or provisioning) variable; ``$${...}`` is escaped for the container's shell."""

SECRETS = {
    "EXPORTER_INGEST_TOKEN": "ingest-token-for-tests",
    "INFLUXDB_TOKEN": "influxdb-token-for-tests",
    "INFLUXDB_PASSWORD": "influxdb-password-for-tests",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password-for-tests",
}
"""The variables the compose file requires (no default), with values an operator would set."""

STATE = {
    "influxdb": "/var/lib/influxdb2",
    "exporter": "/data",
    "prometheus": "/prometheus",
    "grafana": "/var/lib/grafana",
}
"""Each stateful service and the directory holding its state inside its image."""

ONE_SHOT = {"tests"}
"""Services that run once and exit: no restart policy."""


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


def docker_compose_config(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of the compose file with ``.env.example`` and only ``env``
    (plus PATH) as the shell environment, with both profiles enabled."""
    tool = require_tool("docker-compose")
    return subprocess.run(
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
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **env},
    )


def test_compose_file_is_accepted_by_docker_compose() -> None:
    result = docker_compose_config(SECRETS, "--services")
    assert result.returncode == 0, result.stdout + result.stderr
    services = set(result.stdout.split())
    assert services == {"influxdb", "exporter", "prometheus", "grafana", "demo", "tests"}


def test_compose_refuses_to_start_without_each_secret() -> None:
    """``cp .env.example .env && docker compose up`` stops at the first missing secret and
    says which one and where to set it; no secret has a default in the compose file."""
    example = (ROOT / ".env.example").read_text()
    for name in SECRETS:
        assert re.search(rf"^{name}=$", example, re.M), f"{name} has a value in .env.example"
        others = {k: v for k, v in SECRETS.items() if k != name}
        result = docker_compose_config(others, "--quiet")
        assert result.returncode != 0, f"the stack starts without {name}"
        assert f"set {name}" in result.stderr and ".env" in result.stderr, result.stderr
    text = (ROOT / "docker-compose.yml").read_text()
    for name in SECRETS:
        uses = re.findall(rf"\$\{{{name}(:?[-?])?", text)
        assert uses and set(uses) == {":?"}, f"{name} is not required everywhere: {uses}"


def test_every_stateful_service_keeps_its_state_in_a_named_volume() -> None:
    config = compose()
    declared = set(config["volumes"])
    for service, directory in STATE.items():
        mounts = [str(m).split(":") for m in config["services"][service]["volumes"]]
        sources = [source for source, target, *_ in mounts if target == directory]
        assert sources, f"{service}: nothing mounted at {directory}"
        assert sources[0] in declared, f"{service}: {sources[0]} is not a named volume"
    # InfluxDB's setup writes its CLI configuration (with the token) next to its data.
    assert "influxdb-config" in declared


def test_long_running_services_restart_and_raise_the_open_file_limit() -> None:
    for name, service in compose()["services"].items():
        if name in ONE_SHOT:
            assert "restart" not in service, name
            continue
        assert service.get("restart") == "unless-stopped", name
        nofile = service["ulimits"]["nofile"]
        assert nofile["soft"] >= 65536 and nofile["hard"] >= nofile["soft"], name


def _command_lines(service: Mapping[str, Any]) -> Iterator[str]:
    """Every string that ends up in a process's argument list for ``service``."""
    for key in ("command", "entrypoint"):
        value = service.get(key, [])
        yield from [value] if isinstance(value, str) else map(str, value)
    test = service.get("healthcheck", {}).get("test", [])
    yield from [test] if isinstance(test, str) else map(str, test)


def test_no_secret_is_on_any_command_line() -> None:
    """Secrets reach services through their environment only: a command line is visible
    to every local user (``ps``) and in ``docker inspect``."""
    for name, service in compose()["services"].items():
        for argument in _command_lines(service):
            found = set(VARIABLE.findall(argument)) & set(SECRETS)
            assert not found, f"{name}: {sorted(found)} on a command line"
            assert "--token" not in argument, f"{name}: a token flag on the command line"
    demo = compose()["services"]["demo"]
    assert demo["environment"]["EXPORTER_INGEST_TOKEN"].startswith("${EXPORTER_INGEST_TOKEN:?")


class _AuthorizationRecorder(BaseHTTPRequestHandler):
    """Answers every POST 202 and records its Authorization header; GET /healthz 200."""

    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(self.headers.get("Authorization", ""))
        self._answer(202, b'{"accepted": 1}')

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200 if self.path == "/healthz" else 404, b"{}")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads what it needs from ``seen``."""


@contextmanager
def recording_server() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server on a free port: its base URL and the Authorization headers seen."""

    class Recorder(_AuthorizationRecorder):
        seen: list[str] = []

    handler = Recorder
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_simulator_takes_the_token_from_its_environment() -> None:
    """The demo service's way of passing the token: EXPORTER_INGEST_TOKEN, no flag."""
    token = SECRETS["EXPORTER_INGEST_TOKEN"]
    with recording_server() as (url, seen):
        result = run_cli(
            "simulate",
            "--url",
            url,
            "--rate",
            "50",
            "--duration",
            "0.3",
            EXPORTER_INGEST_TOKEN=token,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen and set(seen) == {f"Bearer {token}"}
    assert json.loads(result.stdout)["errors"] == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_health_check() -> list[str]:
    """The runtime image's HEALTHCHECK command (the Dockerfile's exec form)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^HEALTHCHECK [^\n]*\\\n\s+CMD (\[.*\])$", dockerfile, re.M)
    assert found, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    command = json.loads(found.group(1))
    assert isinstance(command, list)
    return [str(part) for part in command]


def test_exporter_health_checks_follow_the_configured_port() -> None:
    """The compose and the image health checks, run as the container runs them, probe
    EXPORTER_LISTEN's port: healthy while it answers /healthz, unhealthy when nothing does."""
    compose_test = compose()["services"]["exporter"]["healthcheck"]["test"]
    assert compose_test[0] == "CMD"
    for command in (compose_test[1:], image_health_check()):
        assert command[0] == "python" and "9402" not in " ".join(command), command
        with recording_server() as (url, _):
            port = url.rpartition(":")[2]
            env = {"PATH": os.environ.get("PATH", ""), "EXPORTER_LISTEN": f"0.0.0.0:{port}"}
            healthy = subprocess.run([sys.executable, *command[1:]], env=env, timeout=30)
        env["EXPORTER_LISTEN"] = f"0.0.0.0:{_free_port()}"
        unhealthy = subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30
        )
        assert healthy.returncode == 0, command
        assert unhealthy.returncode != 0, command


def test_other_health_checks_read_the_port_from_the_service_configuration() -> None:
    services = compose()["services"]
    grafana = " ".join(services["grafana"]["healthcheck"]["test"])
    assert "$${GF_SERVER_HTTP_PORT:-3000}" in grafana
    influx = " ".join(services["influxdb"]["healthcheck"]["test"])
    assert "$${INFLUXD_HTTP_BIND_ADDRESS:-:8086}" in influx and "localhost:8086" not in influx
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert service.get("healthcheck"), f"{name}: no health check"


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


def test_the_exporters_compose_defaults_keep_influxdb_alone_with_flux(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store settings compose passes through, as .env.example leaves them, load to
    InfluxDB alone over the v2 API with Flux analytics; an empty analytics source is unset."""
    result = docker_compose_config(SECRETS)
    assert result.returncode == 0, result.stdout + result.stderr
    env = yaml.safe_load(result.stdout)["services"]["exporter"]["environment"]
    assert env["EXPORTER_ANALYTICS_SOURCE"] == ""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EXPORTER_DATA_DIR", "/nonexistent-compose-data")
    settings = load_settings()
    assert [kind.value for kind in settings.resolved_stores] == ["influxdb"]
    assert settings.influx_api.value == "v2"
    assert settings.resolved_analytics_source.value == "flux"
