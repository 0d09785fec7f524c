"""Helpers for tests that run the exporter as a subprocess: start, stop, HTTP, metrics.

Not a test module. ``conftest`` is importable as a plain module because pytest puts
``tests/`` on ``sys.path`` (rootdir-relative test directory without ``__init__.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

START_TIMEOUT = 20.0
"""Seconds an exporter may take to answer /healthz after it was spawned."""

STOP_TIMEOUT = 20.0
"""Seconds an exporter may take to exit after SIGTERM (its own shutdown timeout is 15 s)."""

CLI_TIMEOUT = 60.0
"""Seconds any one-shot command may take (a bound against hangs; replays and backfills
of many events need most of it)."""

LabelSet = frozenset[tuple[str, str]]
"""A sample's labels, hashable."""

# Requests to the loopback exporter never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without any ``EXPORTER_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env.update(extra)
    return env


def exporter_command(*args: str) -> list[str]:
    """The argv that runs the exporter's command line with ``args``."""
    return [sys.executable, "-m", "exporter", *args]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the command line with ``args`` and ``EXPORTER_*`` variables from ``env``."""
    return subprocess.run(
        exporter_command(*args),
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def http_request(
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """GET (or POST when ``body`` is given) ``url``; returns status and body, any status."""
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), bytes(error.read())


def try_get(url: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """Like :func:`http_request` GET, but ``None`` when nothing answers yet."""
    try:
        return http_request(url, timeout=timeout)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def post_json(url: str, payload: object, timeout: float = 10.0) -> tuple[int, Any]:
    """POST ``payload`` as ``application/json``; returns status and decoded JSON answer."""
    status, raw = http_request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout
    )
    return status, json.loads(raw)


def sample_values(exposition: str, sample_name: str) -> dict[LabelSet, float]:
    """Every sample named ``sample_name`` in a text exposition, by label set."""
    values: dict[LabelSet, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == sample_name:
                values[frozenset(sample.labels.items())] = sample.value
    return values


def labels(**pairs: str) -> LabelSet:
    """A :data:`LabelSet` from keyword arguments."""
    return frozenset(pairs.items())


@dataclass
class ExporterProcess:
    """A running ``facilitator-exporter serve`` subprocess on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        """Base URL of the exporter."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_url(self) -> str:
        """The ingest endpoint."""
        return self.url + "/v1/events"

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        """The current /metrics exposition."""
        status, body = http_request(self.url + "/metrics")
        assert status == 200, body
        return body.decode()

    def metric(self, sample_name: str) -> dict[LabelSet, float]:
        """The samples named ``sample_name`` at /metrics."""
        return sample_values(self.metrics_text(), sample_name)

    def readyz(self) -> tuple[int, Any]:
        """Status and JSON body of /readyz."""
        status, body = http_request(self.url + "/readyz")
        return status, json.loads(body)

    def wait_caught_up(self, timeout: float = 15.0) -> None:
        """Poll /readyz until the ledger's store backlog is empty."""

        def caught_up() -> bool:
            status, body = self.readyz()
            return status == 200 and body["ledger"]["backlog"] == 0

        wait_until(caught_up, timeout, 0.05, "the store to catch up with the ledger")

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the exporter and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"exporter did not exit {timeout}s after SIGTERM; log:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the exporter (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)


def spawn(
    args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the exporter's command line with stdout and stderr going to ``log_path``."""
    with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            exporter_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else clean_env(),
        )


def start_exporter(
    data_dir: Path,
    log_path: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> ExporterProcess:
    """Spawn ``serve`` on a free loopback port and wait for /healthz to answer 200."""
    port = free_port()
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), *extra_args]
    process = ExporterProcess(spawn(args, log_path, env), port, data_dir, log_path)

    def healthy() -> bool:
        if process.proc.poll() is not None:
            raise AssertionError(
                f"exporter exited with {process.proc.returncode} before serving; "
                f"log:\n{process.log()}"
            )
        answer = try_get(process.url + "/healthz")
        return answer is not None and answer[0] == 200

    try:
        wait_until(healthy, timeout, 0.05, f"exporter on port {port} to answer /healthz")
    except BaseException:
        process.kill()
        raise
    return process


@contextlib.contextmanager
def running_exporter(
    data_dir: Path,
    log_path: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[ExporterProcess]:
    """:func:`start_exporter`, killed on exit if the test did not stop it."""
    process = start_exporter(data_dir, log_path, extra_args, env)
    try:
        yield process
    finally:
        process.kill()
